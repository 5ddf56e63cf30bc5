"""Stage-2 training-step throughput: pairs/s, peak GPU memory and model-FLOP utilisation.

One optimizer step of UniME stage 2 (DESIGN §4.2) on a random Qwen2-VL model: LoRA r16 on the
language model (`training.lora.add_lora`), gradient checkpointing, query = a 336x336 image + a
20-token instruction, target = a 20-token text, hard-negative InfoNCE
(`training.losses.hard_negative_infonce_loss`, k 8, tau 0.02, beta 0.1), AdamW on the LoRA weights.
Without `--gradcache-chunk-size` the whole batch is one graph (`training.gradcache.embed` for queries and for
targets); with it, `training.gradcache.gradcache_step` runs over chunks of that many pairs.
Inputs are preprocessed once and kept on the device, so only the step itself is timed.

    python benchmarks/train_step.py                                 # tiny model on CPU, seconds
    python benchmarks/train_step.py --size 2b --device cuda --dtype bfloat16 --batch-size 1024 \
        --gradcache-chunk-size 64 --json train.json --profile train_profile.txt
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `python benchmarks/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    add_common_arguments,
    apply_common_arguments,
    build_generation_model,
    build_processor,
    environment,
    forward_flops,
    make_images,
    make_texts,
    median_seconds,
    move_batch,
    print_table,
    synchronize,
    unime_from_generation_model,
    write_json,
)
from training.gradcache import embed, gradcache_step  # noqa: E402
from training.lora import add_lora  # noqa: E402
from training.losses import hard_negative_infonce_loss  # noqa: E402

DISTINCT_IMAGES = 64  # images repeat beyond this; pixel content does not change the compute


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_repeats=3)
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: tiny 8, 2b 64)")
    parser.add_argument("--gradcache-chunk-size", type=int, default=None, help="GradCache chunk; default: no GradCache")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--instruction-tokens", type=int, default=20)
    parser.add_argument("--target-tokens", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of one extra step here")
    parser.add_argument("--profile-rows", type=int, default=40)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    if args.batch_size is None:
        args.batch_size = 8 if args.size == "tiny" else 64
    for name in ("batch_size", "gradcache_chunk_size", "lora_rank", "image_size", "instruction_tokens", "target_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def make_chunks(processor, args):
    """Query and target processor batches on the device, `chunk` pairs each (one chunk without GradCache)."""
    tokenizer = processor.tokenizer
    instructions = make_texts(tokenizer, args.batch_size, args.instruction_tokens, args.instruction_tokens, args.seed)
    queries = [f"<|image_1|> {text}" for text in instructions]
    targets = make_texts(tokenizer, args.batch_size, args.target_tokens, args.target_tokens, args.seed + 1)
    distinct = make_images(min(args.batch_size, DISTINCT_IMAGES), args.image_size, args.seed)
    images = [distinct[i % len(distinct)] for i in range(args.batch_size)]
    chunk = args.gradcache_chunk_size or args.batch_size
    query_chunks, target_chunks = [], []
    for start in range(0, args.batch_size, chunk):
        rows = slice(start, start + chunk)
        query = processor(text=queries[rows], images=images[rows], prompt_style="instruction")
        target = processor(text=targets[rows], prompt_style="instruction")
        query_chunks.append(move_batch(query, args.device, DTYPES[args.dtype]))
        target_chunks.append(move_batch(target, args.device, DTYPES[args.dtype]))
    return query_chunks, target_chunks


def step_flops(backbone, query_chunks, target_chunks, lora_weights, args, vision_backward):
    """Model FLOPs (MFU numerator) and executed FLOPs (HFU numerator) of one step; see README.

    Model: vision forward + 3 x language-model forward (the usual 6·N·T convention for the part that
    backpropagates; the frozen vision tower needs no backward). Executed: what actually runs. Frozen
    weights get input gradients only (1x forward for linear layers, 2x for attention), LoRA weights
    the full 6·N·T; checkpointing adds one more forward of every checkpointed layer that backward
    reaches, GradCache one more forward of everything. `vision_backward`: whether backward ran
    through the vision tower (it does not when no vision weight trains: `training.vision_features`).
    """
    parts = [forward_flops(backbone, chunk) for chunk in (*query_chunks, *target_chunks)]
    total = {key: sum(part[key] for part in parts) for key in parts[0]}
    tokens = sum(int(chunk["attention_mask"].sum()) for chunk in (*query_chunks, *target_chunks))
    lora = 2.0 * lora_weights * tokens
    vision = total["vision_linear"] + total["vision_attention"]
    language = total["language_linear"] + total["language_attention"]
    model = vision + 3.0 * language
    executed = vision + language + total["language_linear"] + 2.0 * total["language_attention"] + 3.0 * lora
    if vision_backward:
        executed += total["vision_linear"] + 2.0 * total["vision_attention"]
    if not args.no_gradient_checkpointing:
        executed += language + lora + (vision if vision_backward else 0.0)
    if args.gradcache_chunk_size is not None:  # pass 1 re-runs the LM; the vision features are reused
        executed += language + lora
    return {"model": model, "executed": executed, "language_tokens": tokens}


def watch_vision_backward(backbone):
    """Hook on the vision tower's output; `flags` gets whether it carried an autograd graph."""
    flags = []

    def hook(module, inputs, output):
        flags.append(torch.is_grad_enabled() and output.requires_grad)

    return flags, backbone.visual.merger.register_forward_hook(hook)


def build_model(processor, args):
    generation_model = build_generation_model(args.size, len(processor.tokenizer), args.device, DTYPES[args.dtype],
                                              args.attn, args.seed)
    model = unime_from_generation_model(generation_model, processor)
    del generation_model  # the LM head is not part of the UniME model
    if not args.no_gradient_checkpointing:
        # transformers 5.24 renamed gradient_checkpointing_enable (kept as a deprecated alias); 5.17 may lack the new name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_step(model, optimizer, query_chunks, target_chunks, args):
    """A zero-argument function running one optimizer step; returns the loss tensor."""
    loss_fn = functools.partial(hard_negative_infonce_loss, temperature=0.02, num_hard_negatives=8,
                                false_negative_margin=0.1)

    def plain_step():
        with record_function("query_forward"):
            query = embed(model, query_chunks[0])  # what the stage-2 trainer runs
        with record_function("target_forward"):
            target = embed(model, target_chunks[0])
        with record_function("loss"):
            loss, _ = loss_fn(query, target)
        with record_function("backward"):
            loss.backward()
        return loss.detach()

    def gradcache_train_step():
        with record_function("gradcache_step"):
            loss, _ = gradcache_step(model, query_chunks, target_chunks, loss_fn)
        return loss

    forward_backward = plain_step if args.gradcache_chunk_size is None else gradcache_train_step

    def step():
        loss = forward_backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def write_profile(step, args):
    """Run one step under torch.profiler and write the top ops by self time and by total time."""
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(args.device)
    averages = profiler.key_averages()
    self_key, total_key = ("self_device_time_total", "device_time_total") if cuda else \
        ("self_cpu_time_total", "cpu_time_total")
    text = (f"# one stage-2 step, {environment(args)}\n\n## top ops by {self_key}\n"
            f"{averages.table(sort_by=self_key, row_limit=args.profile_rows)}\n\n"
            f"## top ops and phases (query_forward, backward, gradcache_step, ...) by {total_key}\n"
            f"{averages.table(sort_by=total_key, row_limit=args.profile_rows)}\n")
    Path(args.profile).write_text(text, encoding="utf-8")
    print(f"wrote {args.profile}")


def run(args):
    processor = build_processor(args.size, args.tokenizer_dir)
    model = build_model(processor, args)
    query_chunks, target_chunks = make_chunks(processor, args)
    backbone = model.backbone
    model = add_lora(model, rank=args.lora_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_weights = sum(p.numel() for p in trainable)
    vision_flags, _ = watch_vision_backward(backbone)
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    step = make_step(model, optimizer, query_chunks, target_chunks, args)
    record = {"batch_size": args.batch_size, "gradcache_chunk_size": args.gradcache_chunk_size,
              "gradient_checkpointing": not args.no_gradient_checkpointing, "lora_rank": args.lora_rank,
              "lora_weights": lora_weights}
    cuda = args.device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        seconds, loss = median_seconds(step, args.device, args.warmup, args.repeats)
    except torch.cuda.OutOfMemoryError:
        record["status"] = "out of memory"
        return record, None
    vision_backward = any(vision_flags)
    flops = step_flops(backbone, query_chunks, target_chunks, lora_weights, args, vision_backward)
    record.update(vision_backward=vision_backward, language_tokens_per_pair=flops["language_tokens"] / args.batch_size,
                  model_tflop_per_step=flops["model"] / 1e12, executed_tflop_per_step=flops["executed"] / 1e12)
    record.update(status="ok", loss=float(loss), seconds_per_step=seconds, pairs_per_s=args.batch_size / seconds,
                  model_tflops=flops["model"] / seconds / 1e12, executed_tflops=flops["executed"] / seconds / 1e12)
    record["mfu_percent"] = 100.0 * record["model_tflops"] / args.peak_tflops
    record["hfu_percent"] = 100.0 * record["executed_tflops"] / args.peak_tflops
    if cuda:
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(args.device) / 2**30
    return record, step


def main(argv=None):
    args = parse_args(argv)
    record, step = run(args)
    memory = f"{record['peak_memory_gib']:.1f}" if "peak_memory_gib" in record else "n/a (cpu)"
    headers = ["batch", "gradcache chunk", "pairs/s", "peak GiB", "model TFLOP/s", "MFU %", "HFU %", "status"]
    if record["status"] == "ok":
        row = [args.batch_size, args.gradcache_chunk_size or "none", f"{record['pairs_per_s']:.1f}", memory,
               f"{record['model_tflops']:.3g}", f"{record['mfu_percent']:.2g}", f"{record['hfu_percent']:.2g}", "ok"]
    else:
        row = [args.batch_size, args.gradcache_chunk_size or "none", "", "", "", "", "", record["status"]]
    print_table(headers, [row])
    write_json(args.json, {"benchmark": "train_step", "environment": environment(args), "result": record})
    if args.profile is not None and step is not None:
        write_profile(step, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
