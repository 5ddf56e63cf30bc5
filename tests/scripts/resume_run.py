"""A tiny UniME training run that tests/test_reliability.py kills (SIGKILL) and resumes.

    python tests/scripts/resume_run.py STAGE MAX_STEPS SAVE_STEPS OUTPUT_DIR [--resume [CHECKPOINT]]
        [--stall_after STEP] [--stall_in_save STEP]

STAGE 1 trains `UniMEDistillationTrainer` on 10 sentence pairs with fixed random teacher embeddings;
STAGE 2 trains `UniMEHardNegativeTrainer` with GradCache (chunks of 2) on 10 MMEB-format pairs of
small drawn images written to `OUTPUT_DIR/data`. Both: a tiny random Qwen2-VL, LoRA r4 with dropout
0.1 (so the RNG matters), AdamW with a linear schedule, random sampling, batch 4 (3 steps per epoch,
so a resumed run skips into the middle of an epoch and crosses an epoch boundary).

`--resume` resumes from the latest checkpoint in OUTPUT_DIR (`resume_from_checkpoint=True`), or from
CHECKPOINT. `--stall_after STEP` sleeps once optimizer step STEP+1 has its gradients (before the
optimizer applies them), i.e. mid-run after checkpoint STEP: the test kills it there.
`--stall_in_save STEP` makes the safetensors write of the checkpoint of step STEP sleep after the
file is written (a kill then lands mid-save); `stalled` is written to OUTPUT_DIR when a stall begins.

A run that finishes writes its trainable parameters to `OUTPUT_DIR/final_trainable.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.distillation import DistillationConfig, UniMEDistillationTrainer  # noqa: E402
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer  # noqa: E402
from training.mmeb_data import MMEBCollator, load_mmeb_train  # noqa: E402
from training.demo.tiny_models import tiny_unime  # noqa: E402

NUM_ROWS = 10
COMMON = dict(use_cpu=True, report_to=[], disable_tqdm=True, per_device_train_batch_size=4, learning_rate=5e-3,
              lr_scheduler_type="linear", warmup_steps=1, lora_rank=4, lora_dropout=0.1, logging_steps=1,
              save_strategy="steps", save_merged_model=False, seed=0, dataloader_num_workers=0)


def stage1_trainer(args, output_dir):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(2, NUM_ROWS, 6, generator=generator), dim=-1)
    table = datasets.Dataset.from_dict({
        "sent0": [f"sentence number {i} about a dog in a park" for i in range(NUM_ROWS)],
        "sent1": [f"in a park, a dog appears in sentence {i}" for i in range(NUM_ROWS)],
        "teacher_sent0": teacher[0].tolist(),
        "teacher_sent1": teacher[1].tolist(),
    }).with_format("torch")
    model, processor = tiny_unime("qwen2_vl")
    config = DistillationConfig(output_dir=str(output_dir), **args)
    return UniMEDistillationTrainer(model=model, args=config, processor=processor, train_dataset=table)


def stage2_trainer(args, output_dir):
    data = output_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_ROWS):
        path = data / f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
        records.append({"qry": "<|image_1|> Represent the given image.", "qry_image_path": path.name,
                        "pos_text": f"picture number {i}", "pos_image_path": ""})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    model, processor = tiny_unime("qwen2_vl")
    config = HardNegativeConfig(output_dir=str(output_dir), gradcache_chunk_size=2, image_size=28, **args)
    collator = MMEBCollator(processor, image_root=data, image_size=28, chunk_size=2)
    train = load_mmeb_train(data / "pairs.jsonl")
    return UniMEHardNegativeTrainer(model, config, processor=processor, train_dataset=train, data_collator=collator)


def stall(output_dir, reason):
    (output_dir / "stalled").write_text(reason, encoding="utf-8")
    time.sleep(600)  # the test kills the process long before this ends


class StallAfterStep(TrainerCallback):
    """Stall with step `step + 1`'s gradients computed but not applied (its RNG draws already made)."""

    def __init__(self, step, output_dir):
        self.step, self.output_dir = step, output_dir

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            stall(self.output_dir, f"before optimizer step {state.global_step + 1}")


def stall_safetensors_writes(step, output_dir):
    """Make the checkpoint writes of step `step` stall after writing each safetensors file."""
    import peft.peft_model as peft_save
    import transformers.modeling_utils as modeling_utils

    for module in (peft_save, modeling_utils):
        original = module.safe_save_file

        def slow_save(tensors, filename, *args, _original=original, **kwargs):
            _original(tensors, filename, *args, **kwargs)
            if f"checkpoint-{step}" in str(filename):
                stall(output_dir, f"mid-save of {filename}")

        module.safe_save_file = slow_save


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", type=int, choices=(1, 2))
    parser.add_argument("max_steps", type=int)
    parser.add_argument("save_steps", type=int)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--resume", nargs="?", const=True, default=None)
    parser.add_argument("--stall_after", type=int, default=None)
    parser.add_argument("--stall_in_save", type=int, default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)
    args = dict(COMMON, max_steps=options.max_steps, save_steps=options.save_steps)
    build = stage1_trainer if options.stage == 1 else stage2_trainer
    trainer = build(args, options.output_dir)
    if options.stall_after is not None:
        trainer.add_callback(StallAfterStep(options.stall_after, options.output_dir))
    if options.stall_in_save is not None:
        stall_safetensors_writes(options.stall_in_save, options.output_dir)
    trainer.train(resume_from_checkpoint=options.resume)
    trainable = {name: p.detach().contiguous() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(trainable, str(options.output_dir / "final_trainable.safetensors"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (options.output_dir / "losses.json").write_text(json.dumps(losses), encoding="utf-8")


if __name__ == "__main__":
    main()
