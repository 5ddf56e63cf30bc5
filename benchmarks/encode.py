"""Encode throughput: UniME's official recipe vs `UniMEModel.encode` on the same inputs.

The official recipe (deepglint/UniME `self_evaluate/retrieval_self.py`) runs the backbone's
`*ForConditionalGeneration` model with `output_hidden_states=True`, so it computes the LM head's
logits for every position and keeps every layer's hidden states, then takes `hidden_states[-1][:, -1]`
under left padding. `UniMEModel.encode` runs the base model only and pools the last real token.
Both paths share one set of random weights (the UniME model wraps the generation model's base model).

Workloads (counts for `--size 2b`; `--size tiny` scales them down): 64 texts of 10-40 tokens,
64 texts of 200-400 tokens, 16 images of 448x448. Each workload is one batch unless `--batch-size`.

    python benchmarks/encode.py                                   # tiny model on CPU, seconds
    python benchmarks/encode.py --size 2b --device cuda --dtype bfloat16 --attn sdpa --json encode.json

Exit status 1 if the two paths' embeddings disagree beyond the tolerance (`--tolerance`).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `python benchmarks/encode.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    add_common_arguments,
    build_generation_model,
    build_processor,
    apply_common_arguments,
    environment,
    forward_flops,
    make_images,
    make_texts,
    median_seconds,
    move_batch,
    print_table,
    throughput,
    unime_from_generation_model,
    write_json,
)

# The released evaluation code's Qwen2-VL user turns, written out independently of modeling_unime.
OFFICIAL_TEXT_CONTENT = "{}\nSummary above sentence in one word:"
OFFICIAL_IMAGE_CONTENT = [{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Workload:
    name: str
    modality: str  # "text" or "image"
    counts: dict  # size -> number of items
    min_tokens: int = 0
    max_tokens: int = 0
    image_size: int = 0


WORKLOADS = (
    Workload("short_text", "text", {"tiny": 8, "2b": 64}, min_tokens=10, max_tokens=40),
    Workload("long_text", "text", {"tiny": 8, "2b": 64}, min_tokens=200, max_tokens=400),
    Workload("image", "image", {"tiny": 4, "2b": 16}, image_size=448),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_repeats=5)
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                        help="comma-separated subset of " + ", ".join(w.name for w in WORKLOADS))
    parser.add_argument("--items", type=int, default=None, help="items per workload (default: 64/64/16, tiny 8/8/4)")
    parser.add_argument("--batch-size", type=int, default=None, help="items per forward (default: whole workload)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max abs difference allowed between the two paths' embeddings "
                             "(default: 1e-5 float32, 2e-2 bfloat16, 5e-3 float16)")
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    names = {w.name for w in WORKLOADS}
    unknown = set(args.workloads.split(",")) - names
    if unknown:
        raise ValueError(f"--workloads: unknown {sorted(unknown)}; expected a subset of {sorted(names)}")
    for name in ("items", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def official_prompts(backbone_processor, texts, modality):
    """The official prompt strings: the chat template rendered around the released user turn.

    Rendered once with a marker and filled per item, so both paths pay the same string cost.
    """
    def render(content):
        messages = [{"role": "user", "content": content}]
        return backbone_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    if modality == "image":
        return [render(OFFICIAL_IMAGE_CONTENT)] * len(texts)
    template = render([{"type": "text", "text": OFFICIAL_TEXT_CONTENT.format("\0")}])
    return [template.replace("\0", text) for text in texts]


def official_encode(generation_model, backbone_processor, items, modality, batch_size):
    """Embeddings the released way: `[N, D]` float32 on CPU, in item order."""
    device, dtype = generation_model.device, generation_model.dtype
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = official_prompts(backbone_processor, chunk, modality)
        batch = backbone_processor(text=prompts, images=chunk if modality == "image" else None,
                                   padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            output = generation_model(**move_batch(batch, device, dtype), output_hidden_states=True)
        outputs.append(F.normalize(output.hidden_states[-1][:, -1].float(), dim=-1).cpu())
    return torch.cat(outputs)


def workload_items(workload, args, tokenizer):
    count, seed = args.items or workload.counts[args.size], args.seed
    if workload.modality == "image":
        return make_images(count, workload.image_size, seed)
    return make_texts(tokenizer, count, workload.min_tokens, workload.max_tokens, seed)


def processor_kwargs(items, modality):
    return {"images": items} if modality == "image" else {"text": items}


def run_workload(workload, args, generation_model, model, processor):
    """Time both paths on one workload; return its JSON record."""
    items = workload_items(workload, args, processor.tokenizer)
    batch_size = args.batch_size or len(items)
    backbone_processor = processor.backbone_processor()
    batch = processor(**processor_kwargs(items, workload.modality))
    flops = sum(forward_flops(model.backbone, batch).values())
    tokens = batch["attention_mask"].sum(dim=1).float()

    def preprocess():
        return processor(**processor_kwargs(items, workload.modality))

    def official():
        return official_encode(generation_model, backbone_processor, items, workload.modality, batch_size)

    def unime():
        return model.encode(items, processor=processor, batch_size=batch_size, show_progress_bar=False)

    timing = dict(device=args.device, warmup=args.warmup, repeats=args.repeats)
    preprocess_seconds, _ = median_seconds(preprocess, **timing)
    official_seconds, official_embeddings = median_seconds(official, **timing)
    unime_seconds, unime_embeddings = median_seconds(unime, **timing)

    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[DTYPES[args.dtype]]
    max_abs_diff = (official_embeddings - unime_embeddings).abs().max().item()
    min_cosine = (official_embeddings * unime_embeddings).sum(dim=-1).min().item()
    record = {"workload": workload.name, "items": len(items), "batch_size": batch_size,
              "mean_tokens": tokens.mean().item(), "max_tokens": int(tokens.max().item()),
              "gflops_per_item": flops / len(items) / 1e9,
              "preprocess_items_per_s": len(items) / preprocess_seconds,
              "max_abs_diff": max_abs_diff, "min_cosine": min_cosine, "tolerance": tolerance,
              "agree": max_abs_diff <= tolerance}
    for name, seconds in (("official", official_seconds), ("unime", unime_seconds)):
        record[name] = {"seconds": seconds, "items_per_s": len(items) / seconds,
                        **throughput(flops, seconds, args.peak_tflops)}
    record["speedup"] = official_seconds / unime_seconds
    return record


def print_results(records):
    headers = ["workload", "items", "tokens", "path", "items/s", "TFLOP/s", "% peak", "speedup", "max|diff|",
               "agree"]
    rows = []
    for r in records:
        for name in ("official", "unime"):
            unime = name == "unime"
            rows.append([r["workload"], r["items"], f"{r['mean_tokens']:.0f}", name,
                         f"{r[name]['items_per_s']:,.1f}", f"{r[name]['tflops']:.3g}",
                         f"{r[name]['peak_percent']:.2g}", f"{r['speedup']:.2f}x" if unime else "",
                         f"{r['max_abs_diff']:.1e}" if unime else "", str(r["agree"]) if unime else ""])
    print_table(headers, rows)
    print("preprocessing only (CPU): " + ", ".join(
        f"{r['workload']} {r['preprocess_items_per_s']:,.0f} items/s" for r in records))


def main(argv=None):
    args = parse_args(argv)
    processor = build_processor(args.size, args.tokenizer_dir)
    generation_model = build_generation_model(args.size, len(processor.tokenizer), args.device,
                                              DTYPES[args.dtype], args.attn, args.seed)
    model = unime_from_generation_model(generation_model, processor)
    selected = args.workloads.split(",")
    records = [run_workload(w, args, generation_model, model, processor) for w in WORKLOADS if w.name in selected]
    print_results(records)
    write_json(args.json, {"benchmark": "encode", "environment": environment(args), "workloads": records})
    return 0 if all(r["agree"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
