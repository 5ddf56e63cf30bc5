"""Check, on 2 CPU ranks (gloo), that the stage-1 trainer's step under DDP equals one process.

Run by tests/test_stage1.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/scripts/stage1_ddp.py WORK_DIR OUT.json

Every rank builds the same seeded tiny Qwen2-VL UniME model (float64, LoRA without dropout, non-zero
LoRA B) inside `UniMEDistillationTrainer`, wraps it in DDP with the trainer's own accelerator and runs
`trainer.training_step` on its shard of one global batch (unequal shards: 3 and 2 sentence pairs,
so 6 and 4 texts). The reference is plain autograd on an unwrapped copy: the whole batch (10 texts)
in one processor call, `distillation_loss`, `backward`. Rank 0 writes the worst differences over
ranks to OUT.json. A control step without the gather (each rank distils its own shard) must
not match, which shows the comparison can fail.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from unittest.mock import patch

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.distillation import DistillationConfig, DistillationDataCollator, UniMEDistillationTrainer  # noqa: E402
from training.losses import distillation_loss  # noqa: E402
from training.demo.tiny_models import tiny_unime  # noqa: E402

SHARDS = (3, 2)
KD = {"kd_temperature": 0.1, "kd_direction": "forward", "kd_mask_diagonal": True}


def pair_rows():
    """5 rows of (sent0, sent1) with fixed random unit teacher embeddings [D=7]."""
    generator = torch.Generator().manual_seed(0)
    teacher = F.normalize(torch.randn(2, sum(SHARDS), 7, generator=generator, dtype=torch.float64), dim=-1)
    table = datasets.Dataset.from_dict({
        "sent0": [f"a dog number {i} runs in the park" for i in range(sum(SHARDS))],
        "sent1": [f"in the park, dog {i} is running" for i in range(sum(SHARDS))],
        "teacher_sent0": teacher[0].tolist(),
        "teacher_sent1": teacher[1].tolist(),
    }).with_format("torch")
    return [table[i] for i in range(len(table))]


def collate64(collator, rows):
    batch = collator(rows)
    batch["teacher_embeddings"] = batch["teacher_embeddings"].double()
    return batch


def lora_gradients(model):
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return gradients


def main(work_dir: str, output_path: str) -> None:
    rank = int(os.environ["RANK"])
    args = DistillationConfig(output_dir=str(Path(work_dir) / f"rank{rank}"), use_cpu=True, ddp_backend="gloo",
                              report_to=[], lora_rank=4, lora_dropout=0.0, save_merged_model=False, **KD)
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEDistillationTrainer(model=model.double(), args=args, processor=processor)
    torch.manual_seed(1)  # the same non-zero LoRA B on every rank, so every adapter weight gets a gradient
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    reference_model = copy.deepcopy(trainer.model).train()
    trainer.model.train()
    ddp_model = trainer.accelerator.prepare_model(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    collator = DistillationDataCollator(processor)

    rows = pair_rows()
    batch = collate64(collator, rows)
    teacher = batch.pop("teacher_embeddings")
    reference_loss = distillation_loss(reference_model(**batch).embeddings, teacher,
                                       temperature=KD["kd_temperature"])
    reference_loss.backward()
    reference = lora_gradients(reference_model)

    start = sum(SHARDS[:rank])
    loss = trainer.training_step(ddp_model, collate64(collator, rows[start:start + SHARDS[rank]]))
    gradients = lora_gradients(trainer.model)
    kd_rows = trainer._stats_sums["kd_rows"]  # texts in the KD matrix of this step (logged stat)
    # Control: without the cross-rank gather each rank distils only its own shard, which must not match.
    with patch("training.distillation.gather_with_grad", lambda tensor: tensor):
        trainer.training_step(ddp_model, collate64(collator, rows[start:start + SHARDS[rank]]))
    control = lora_gradients(trainer.model)
    result = {
        "loss_max_abs_diff": abs(loss.item() - reference_loss.item()),
        "grad_max_abs_diff": max((gradients[k] - reference[k]).abs().max().item() for k in reference),
        "grad_max_abs": max(g.abs().max().item() for g in reference.values()),
        "no_gather_grad_max_abs_diff": max((control[k] - reference[k]).abs().max().item() for k in reference),
        "num_gradients": len(gradients),
        "kd_rows": kd_rows,
        "ddp_wrapped": type(ddp_model).__name__,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        merged = dict(result, world_size=dist.get_world_size())
        for key in ("loss_max_abs_diff", "grad_max_abs_diff"):
            merged[key] = max(r[key] for r in gathered)
        merged["no_gather_grad_max_abs_diff"] = min(r["no_gather_grad_max_abs_diff"] for r in gathered)
        merged["kd_rows"] = [r["kd_rows"] for r in gathered]
        with open(output_path, "w") as file:
            json.dump(merged, file, indent=2)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # Some 2-process gloo runs abort during interpreter teardown; the result is already on disk.
    os._exit(0)
