"""A tiny UniME training run, the same on one process and under `accelerate launch` (FSDP, 2 CPU ranks).

Run by tests/test_sharded.py:

    python tests/scripts/sharded_train.py OUTPUT_DIR --per_device 8
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml --num_processes 2 \
        --mixed_precision no tests/scripts/sharded_train.py OUTPUT_DIR --per_device 4 --resume_stage 2

Stage 1 trains `UniMEDistillationTrainer` on 16 sentence pairs with fixed random teacher embeddings;
stage 2 trains `UniMEHardNegativeTrainer` with GradCache (chunks of 2, so ranks run several chunks with
gradient sync off) on 16 MMEB-format pairs of small images. Both: a tiny random Qwen2-VL in float64
(so "equal" means float64 rounding), LoRA r4 without dropout, non-zero initial LoRA B (so every
adapter weight moves), AdamW at a constant lr of 1e-2, 2 steps of a global batch of 8: one process
with `--per_device 8`, or two with `--per_device 4`. accelerate's seeded sampler draws the same
permutation in both, and its batch sharding hands rank r the r-th half of each global batch.
Checkpoints every step; the merged model is saved at the end.

For each stage, the main process writes to OUTPUT_DIR/stageN/run (and .../resumed):
`initial_trainable.safetensors` and `final_trainable.safetensors` (the LoRA weights before training
and after it, gathered whole), `run.json` (world size, the model's wrapper class, the distributed
type, the logged losses, parameters held by rank 0 versus in the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.demo.tiny_models import tiny_unime  # noqa: E402
from training.distillation import DistillationConfig, DistillationDataCollator, UniMEDistillationTrainer  # noqa: E402
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer  # noqa: E402
from training.mmeb_data import MMEBCollator, load_mmeb_train  # noqa: E402

NUM_ROWS = 16
# One token each, so every sent0 has 7 tokens and every sent1 9 on every split of the batch: the tiny
# model's embeddings move by ~2e-8 (float64) with the amount of left padding, which is not what we test.
COLOURS = "red green blue black white brown pink gray gold silver orange purple yellow violet navy olive".split()
COMMON = dict(report_to=[], disable_tqdm=True, learning_rate=1e-2, lr_scheduler_type="constant", lora_rank=4,
              lora_dropout=0.0, logging_steps=1, save_strategy="steps", save_steps=1, seed=0,
              dataloader_num_workers=0, use_cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true")


class Float64(object):
    """Wrap a collator: floating-point tensors (pixels, teacher embeddings) become float64."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        return _to_float64(self.collator(rows))


def _to_float64(batch):
    if isinstance(batch, list):
        return [_to_float64(item) for item in batch]
    if isinstance(batch, dict):
        return {key: _to_float64(value) for key, value in batch.items()}
    if torch.is_tensor(batch) and batch.is_floating_point():
        return batch.double()
    return batch


def stage1(args, output_dir):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(2, NUM_ROWS, 6, generator=generator), dim=-1)
    table = datasets.Dataset.from_dict({
        "sent0": [f"a {colour} dog runs in the park" for colour in COLOURS],
        "sent1": [f"in the park, a {colour} dog is running" for colour in COLOURS],
        "teacher_sent0": teacher[0].tolist(),
        "teacher_sent1": teacher[1].tolist(),
    }).with_format("torch")
    model, processor = tiny_unime("qwen2_vl")
    config = DistillationConfig(output_dir=str(output_dir), kd_temperature=0.1, **args)
    return UniMEDistillationTrainer(model=model.double(), args=config, processor=processor, train_dataset=table,
                                    data_collator=Float64(DistillationDataCollator(processor)))


def stage2(args, output_dir):
    data = output_dir / f"data{os.environ.get('RANK', '0')}"  # one per rank: no rank reads a half-written file
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_ROWS):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / f"image_{i}.png")
        records.append({"qry": "<|image_1|> Represent the given image.", "qry_image_path": f"image_{i}.png",
                        "pos_text": f"picture number {i} of the set", "pos_image_path": ""})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    model, processor = tiny_unime("qwen2_vl")
    config = HardNegativeConfig(output_dir=str(output_dir), gradcache_chunk_size=2, image_size=28,
                                contrastive_temperature=0.05, num_hard_negatives=3, false_negative_margin=0.05,
                                **args)
    collator = Float64(MMEBCollator(processor, image_root=data, image_size=28, chunk_size=2))
    return UniMEHardNegativeTrainer(model.double(), config, processor=processor,
                                    train_dataset=load_mmeb_train(data / "pairs.jsonl"), data_collator=collator)


def enable_fsdp_on_cpu():
    """Let accelerate's FSDP branch run on CPU processes (gloo).

    accelerate 1.16 turns `ACCELERATE_USE_FSDP` (set by `accelerate launch` from fsdp.yaml) into
    `DistributedType.FSDP` only for accelerator devices (`MULTI_GPU`, `MULTI_XPU`, ...); on CPU the
    processes stay `MULTI_CPU` and the model silently gets plain DDP. This applies the assignments that branch
    makes, for `MULTI_CPU`; everything after it (fully_shard, the sharded
    optimizer, state-dict gathering, checkpoints) is accelerate's and torch's own FSDP2 code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, mixed_precision=None, cpu=False, *args, fsdp_plugin=None, **kwargs):
        original_init(self, mixed_precision, cpu, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def train(stage, args, output_dir, resume=False):
    """Build the stage's trainer, train it (from the latest checkpoint in `output_dir` if `resume`)
    and, on the main process, write its results to `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = (stage1 if stage == 1 else stage2)(args, output_dir)
    # Every rank draws the same non-zero LoRA B, so every adapter weight gets a gradient in step 1.
    generator = torch.Generator().manual_seed(1)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    trainer.train(resume_from_checkpoint=True if resume else None)
    # What this rank holds: a sharded parameter is a DTensor whose local shard is a part of it.
    local = sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters())
    full = sum(p.numel() for p in trainer.model.parameters())
    sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    state = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank gathers
    if trainer.is_world_process_zero():
        save_file(initial, str(output_dir / "initial_trainable.safetensors"))
        lora = {name: tensor.detach().contiguous() for name, tensor in state.items() if "lora_" in name}
        save_file(lora, str(output_dir / "final_trainable.safetensors"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        run = {"world_size": trainer.accelerator.num_processes, "model_class": type(trainer.model).__name__,
               "distributed_type": str(trainer.accelerator.distributed_type), "losses": losses,
               "local_parameters": local, "full_parameters": full, "sharded_tensors": sharded}
        (output_dir / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--per_device", type=int, default=8)
    parser.add_argument("--resume_stage", type=int, default=None, choices=(1, 2),
                        help="for this stage, also resume a copy of checkpoint-1 in stageN/resumed to the end")
    options = parser.parse_args()
    torch.set_num_threads(1)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_fsdp_on_cpu()
    args = dict(COMMON, ddp_backend="gloo" if launched else None, max_steps=2,
                per_device_train_batch_size=options.per_device)
    for stage in options.stages:
        out = options.output_dir / f"stage{stage}"
        trainer = train(stage, args, out / "run")
        if stage == options.resume_stage:
            if trainer.is_world_process_zero():
                shutil.copytree(out / "run" / "checkpoint-1", out / "resumed" / "checkpoint-1")
            trainer.accelerator.wait_for_everyone()
            train(stage, dict(args, save_merged_model=False), out / "resumed", resume=True)


if __name__ == "__main__":
    main()
