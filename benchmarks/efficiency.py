"""Counted efficiency: executed vs model vs minimum FLOPs of a stage-2 step, processed vs real tokens of encode.

Counts, not timings: `torch.utils.flop_counter.FlopCounterMode` records every matmul that runs
(forward, backward, checkpoint recomputation, GradCache's extra pass) on CPU, so the figures do not
depend on the machine. Eager attention, float32, random weights, LoRA r16 on the language model.

`--size 2b` uses Qwen2-VL-2B's layer shapes at *reduced depth*: each count is taken with 1 and with
2 layers (language model and vision tower alike) and extrapolated linearly to 28 language-model and
32 vision layers, part by part (what does not depend on depth, like the patch embedding, the merger
and the loss, stays as counted). `--size tiny` counts the tiny test model as it is.

Training modes (one step over `--pairs` query/target pairs, query = a 336x336 image + instruction,
target = a text, hard-negative InfoNCE):
- `plain`: one graph for the batch, no checkpointing;
- `plain + memory saving`: the same with gradient checkpointing;
- `GradCache`: chunks of `--chunk` pairs; "before" with checkpointing, as the paper config ran it.
"before" is the code path without the frozen-vision lever (`training.vision_features`): the backbone
runs its vision tower itself, as it did before that lever existed; "after" is the current code.

Encode: language-model tokens processed (batch x longest item, per batch) over real tokens, on a mix
of texts and images (`--encode-items`), for fixed-size batches sorted as `encode` did before
(`fixed_size_batches`) and for `modeling_unime.batching.plan_batches`.

    python benchmarks/efficiency.py                 # tiny model, seconds
    python benchmarks/efficiency.py --size 2b       # Qwen2-VL-2B shapes, a few minutes on CPU
"""

import argparse
import collections
import contextlib
import functools
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `python benchmarks/efficiency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_processor, make_texts, print_table, qwen2_vl_2b_config, write_json  # noqa: E402
from benchmarks.train_step import make_chunks  # noqa: E402
from modeling_unime import UniMEConfig, UniMEModel  # noqa: E402
from modeling_unime.batching import MODALITY_ORDER, estimate_tokens, modality, plan_batches  # noqa: E402
from training import gradcache  # noqa: E402
from training.demo.tiny_models import tiny_backbone_config  # noqa: E402
from training.lora import add_lora  # noqa: E402
from training.losses import hard_negative_infonce_loss  # noqa: E402

FULL_DEPTH = {"language": 28, "vision": 32}  # Qwen2-VL-2B
MODES = (("plain", False, False), ("plain + memory saving", True, False), ("GradCache", None, True))
PHASES = ("vision_fwd", "vision_bwd", "lm_fwd", "lm_bwd", "pass1_vision", "pass1_lm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "2b"), default="tiny")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per training step")
    parser.add_argument("--chunk", type=int, default=1, help="GradCache chunk, in pairs")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--instruction-tokens", type=int, default=20)
    parser.add_argument("--target-tokens", type=int, default=20)
    parser.add_argument("--encode-items", type=int, default=300)
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--only", choices=("training", "encode"), default=None, help="count one part only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name in ("pairs", "chunk", "image_size", "instruction_tokens", "target_tokens", "encode_items"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------ counting
class PhaseMeter:
    """One FlopCounterMode over a step, booking FLOPs by phase (`fwd`, `pass1`, `bwd`) and part.

    Attribution is by time, not by module name (torch's module tracking is not reliable inside
    backward): hooks on the vision tower switch the part to vision while it runs forward; in
    backward, the language model's backward runs first and the vision tower's last, from the moment
    the vision output's gradient is complete (a tensor hook on it). That ordering holds when only
    the queries carry images, as in this benchmark (autograd runs later-created nodes first).
    """

    def __init__(self, vision_tower):
        self.counter = FlopCounterMode(display=False)
        self.booked = collections.defaultdict(int)
        self.phase, self.label, self.last = "fwd", "fwd_lm", 0
        self.handles = [vision_tower.register_forward_pre_hook(self._enter_vision),
                        vision_tower.register_forward_hook(self._leave_vision)]

    def switch(self, label):
        total = self.counter.get_total_flops()
        self.booked[self.label] += total - self.last
        self.last, self.label = total, label

    def set_phase(self, phase):
        self.phase = phase
        self.switch(f"{phase}_lm")

    def _enter_vision(self, module, args):
        self.switch(f"{self.phase}_vision")

    def _leave_vision(self, module, args, output):
        self.switch(f"{self.phase}_lm")
        features = output.pooler_output
        if features.requires_grad:  # backward will reach the tower: book from then on to vision
            features.register_hook(lambda gradient: self.switch("bwd_vision"))

    def phases(self):
        self.switch(self.label)
        for handle in self.handles:
            handle.remove()
        return {"vision_fwd": self.booked["fwd_vision"], "lm_fwd": self.booked["fwd_lm"],
                "vision_bwd": self.booked["bwd_vision"], "lm_bwd": self.booked["bwd_lm"],
                "pass1_vision": self.booked["pass1_vision"], "pass1_lm": self.booked["pass1_lm"]}


@contextlib.contextmanager
def vision_lever(enabled):
    """`enabled=False`: the code path before the frozen-vision lever (the backbone runs its own
    vision tower on `pixel_values`, inside every forward)."""
    if enabled:
        yield
        return
    original = gradcache.with_image_features
    gradcache.with_image_features = lambda model, batch: batch
    try:
        yield
    finally:
        gradcache.with_image_features = original


def set_checkpointing(unime, on):
    if on:
        unime.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        unime.activation_checkpointing_disable()


def count_plain_step(model, query, target, loss_fn, meter):
    with meter.counter:
        loss, _ = loss_fn(gradcache.embed(model, query), gradcache.embed(model, target))
        meter.set_phase("bwd")
        loss.backward()
        meter.set_phase("fwd")


def count_gradcache_step(model, query_chunks, target_chunks, loss_fn, meter):
    """`gradcache_step` with phases: vision features (fwd) | pass 1 + loss | per chunk fwd, bwd."""
    original_pass1, original_pass2 = gradcache.embed_no_grad, gradcache.backward_chunks

    def pass1(*args, **kwargs):  # what ran before (the vision feature precompute) is fwd
        meter.set_phase("pass1")
        return original_pass1(*args, **kwargs)

    def pass2(*args, **kwargs):
        meter.set_phase("fwd")
        return original_pass2(*args, **kwargs)

    def backward(surrogate):
        meter.set_phase("bwd")
        surrogate.backward()
        meter.set_phase("fwd")

    gradcache.embed_no_grad, gradcache.backward_chunks = pass1, pass2
    try:
        with meter.counter:
            gradcache.gradcache_step(model, query_chunks, target_chunks, loss_fn, backward=backward)
    finally:
        gradcache.embed_no_grad, gradcache.backward_chunks = original_pass1, original_pass2


def build_model(size, depth, vocab_size, seed):
    """UniME Qwen2-VL with LoRA r16 (dropout 0), eager attention, float32; `depth` layers in each tower
    for `2b` (`None`: the tiny model as it is)."""
    if size == "tiny":
        config = tiny_backbone_config("qwen2_vl", vocab_size)
    else:
        config = qwen2_vl_2b_config()
        config.text_config.num_hidden_layers = depth
        config.vision_config.depth = depth
    torch.manual_seed(seed)
    backbone = transformers.AutoModel.from_config(config, attn_implementation="eager")
    model = UniMEModel(UniMEConfig(backbone_config=backbone.config), backbone=backbone)
    return add_lora(model, rank=16, dropout=0.0).train()


def count_training(args, processor, depth):
    """Counted FLOPs per phase, per mode, before and after: `{(mode, "before"|"after"): {phase: flops}}`."""
    model = build_model(args.size, depth, len(processor.tokenizer), args.seed)
    unime = model.base_model.model
    loss_fn = functools.partial(hard_negative_infonce_loss, temperature=0.02, num_hard_negatives=8,
                                false_negative_margin=0.1)
    shape = dict(batch_size=args.pairs, instruction_tokens=args.instruction_tokens, target_tokens=args.target_tokens,
                 seed=args.seed, image_size=args.image_size, device="cpu", dtype="float32")
    plain_chunks = make_chunks(processor, SimpleNamespace(**shape, gradcache_chunk_size=None))
    gradcache_chunks = make_chunks(processor, SimpleNamespace(**shape, gradcache_chunk_size=args.chunk))
    results = {}
    for mode, checkpointing, uses_gradcache in MODES:
        for when in ("before", "after"):
            # Before: GradCache ran with checkpointing (the paper config); after: off under GradCache.
            on = (when == "before") if checkpointing is None else checkpointing
            set_checkpointing(unime, on)
            meter = PhaseMeter(unime.backbone.visual)
            with vision_lever(when == "after"):
                if uses_gradcache:
                    count_gradcache_step(model, *gradcache_chunks, loss_fn, meter)
                else:
                    count_plain_step(model, plain_chunks[0][0], plain_chunks[1][0], loss_fn, meter)
            model.zero_grad(set_to_none=True)
            results[(mode, when)] = meter.phases()
    set_checkpointing(unime, False)
    return results


def extrapolate(one, two, depth):
    """Linear in depth: `one` counted with 1 layer, `two` with 2 -> the count with `depth` layers."""
    return one + (two - one) * (depth - 1)


def training_table(args, processor):
    """Per mode and before/after: TFLOP per pair by phase, executed, model, minimum (at full depth for 2b)."""
    if args.size == "tiny":
        counted = count_training(args, processor, None)
    else:
        one, two = count_training(args, processor, 1), count_training(args, processor, 2)
        counted = {}
        for key in one:
            counted[key] = {}
            for phase in PHASES:
                part = "vision" if "vision" in phase else "language"
                counted[key][phase] = extrapolate(one[key][phase], two[key][phase], FULL_DEPTH[part])
    per_pair = {}
    for key, phases in counted.items():
        tflop = {phase: value / args.pairs / 1e12 for phase, value in phases.items()}
        tflop["gradcache_pass1"] = tflop.pop("pass1_vision") + tflop.pop("pass1_lm")
        per_pair[key] = tflop
    once = per_pair[("plain", "after")]  # each item's vision forward once and its LM forward once
    vision, language, language_backward = once["vision_fwd"], once["lm_fwd"], once["lm_bwd"]
    model_flops = vision + 3 * language
    minimum = {"plain": vision + language + language_backward,
               "plain + memory saving": vision + 2 * language + language_backward,  # + the LM recompute
               "GradCache": vision + 2 * language + language_backward}  # + the LM's no-graph pass
    rows = []
    for (mode, when), phases in per_pair.items():
        executed = sum(phases.values())
        rows.append({"mode": mode, "when": when, **phases, "executed": executed, "model": model_flops,
                     "minimum": minimum[mode], "executed_over_model": executed / model_flops,
                     "executed_over_minimum": executed / minimum[mode]})
    return rows


# ------------------------------------------------------------------------------------ encode
def encode_mix(processor, count, seed):
    """`(index, text, image)` entries: 1/2 texts of 32-415 tokens, 1/3 images of 196-4,920 patches
    (sides multiples of 28 pixels, as Qwen2-VL resizes them), 1/6 image + text. Blank images: only
    their sizes matter for the counts."""
    rng = random.Random(seed)
    texts = make_texts(processor.tokenizer, count, 32, 415, seed)
    entries = []
    for index in range(count):
        kind = index % 6
        image = None
        if kind >= 3:
            while True:
                height, width = 28 * rng.randint(1, 60), 28 * rng.randint(1, 60)
                if 196 <= (height // 14) * (width // 14) <= 4920 and max(height, width) / min(height, width) < 4:
                    break
            image = Image.new("RGB", (width, height))
        entries.append((index, texts[index] if kind < 3 or kind == 5 else None, image))
        if kind == 5:
            entries[-1] = (index, texts[index][:200], image)
    return entries


def fixed_size_batches(entries, batch_size):
    """How `encode` batched before `plan_batches`: sorted by (modality, image area, characters), then
    consecutive slices of `batch_size` items cut where the modality changes."""
    def key(entry):
        index, text, image = entry
        area = 0 if image is None else image.width * image.height
        return MODALITY_ORDER[modality(text, image)], area, len(text or ""), index

    batches, batch = [], []
    for entry in sorted(entries, key=key):
        if batch and (len(batch) == batch_size or modality(*batch[-1][1:]) != modality(*entry[1:])):
            batches.append(batch)
            batch = []
        batch.append(entry)
    return batches + [batch] if batch else batches


def encode_table(args, processor):
    """Processed / real language-model tokens per batch size, before and after."""
    entries = encode_mix(processor, args.encode_items, args.seed)
    lengths = dict(zip((e[0] for e in entries), estimate_tokens(processor, entries)))
    real = sum(lengths.values())
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        row = {"batch_size": batch_size, "real_tokens": real}
        for when, batches in (("before", fixed_size_batches(entries, batch_size)),
                              ("after", plan_batches(entries, [lengths[e[0]] for e in entries], batch_size))):
            processed = sum(len(batch) * max(lengths[e[0]] for e in batch) for batch in batches)
            row[f"{when}_processed"], row[f"{when}_batches"] = processed, len(batches)
            row[f"{when}_ratio"] = processed / real
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ output
def print_training(rows, args):
    scope = ("Qwen2-VL-2B layer shapes, counted at depth 1 and 2 and extrapolated to 28 LM / 32 vision layers"
             if args.size == "2b" else "tiny Qwen2-VL as is")
    unit, factor = ("TFLOP", 1) if args.size == "2b" else ("MFLOP", 1e6)
    print(f"training: {unit} per pair ({scope}; {args.pairs} pairs, GradCache chunk {args.chunk}, LoRA r16, "
          "eager attention; bwd includes checkpoint recomputation)")
    headers = ["mode", "code", "vision fwd", "vision bwd", "LM fwd", "LM bwd", "GradCache pass 1", "executed",
               "model", "minimum", "executed/model", "executed/minimum"]
    body = [[r["mode"], r["when"], *(f"{r[k] * factor:.2f}" for k in ("vision_fwd", "vision_bwd", "lm_fwd", "lm_bwd",
                                                                        "gradcache_pass1", "executed", "model",
                                                                        "minimum")),
             f"{r['executed_over_model']:.2f}", f"{r['executed_over_minimum']:.2f}"] for r in rows]
    print_table(headers, body)


def print_encode(rows, args):
    print(f"\nencode: language-model tokens processed / real on {args.encode_items} items "
          f"({rows[0]['real_tokens']:,} real tokens)")
    headers = ["batch size", "before: processed/real", "before: batches", "after: processed/real", "after: batches"]
    print_table(headers, [[r["batch_size"], f"{r['before_ratio']:.2f}", r["before_batches"],
                           f"{r['after_ratio']:.3f}", r["after_batches"]] for r in rows])


def main(argv=None):
    args = parse_args(argv)
    processor = build_processor(args.size, args.tokenizer_dir)
    training = training_table(args, processor) if args.only != "encode" else []
    encoding = encode_table(args, processor) if args.only != "training" else []
    if training:
        print_training(training, args)
    if encoding:
        print_encode(encoding, args)
    write_json(args.json, {"benchmark": "efficiency", "size": args.size, "pairs": args.pairs, "chunk": args.chunk,
                           "training_tflop_per_pair": training, "encode": encoding})
    return 0


if __name__ == "__main__":
    sys.exit(main())
