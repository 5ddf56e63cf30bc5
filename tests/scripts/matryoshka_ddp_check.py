"""Check, on 2 CPU ranks (gloo), that a stage-2 step with a Matryoshka loss under DDP equals one process.

Run by tests/test_matryoshka.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/scripts/matryoshka_ddp_check.py WORK_DIR OUT.json

As tests/scripts/stage2_ddp_check.py (same pairs, unequal shards of 5 and 3, float64, LoRA without
dropout, one `trainer.training_step` with GradCache chunks of 2 and one without), with
`matryoshka_dims=[4, 12, 32]` and weights `[0.5, 1.0, 2.0]`. The reference is plain autograd on an
unwrapped copy over the whole global batch with the Matryoshka sum written out as a loop here.
Rank 0 writes the worst differences over ranks to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage2_ddp_check import LOSS, SHARDS, lora_gradients, to_float64, write_pairs  # noqa: E402
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer  # noqa: E402
from training.losses import hard_negative_infonce_loss  # noqa: E402
from training.mmeb_data import MMEBCollator, load_mmeb_train  # noqa: E402
from training.demo.tiny_models import tiny_unime  # noqa: E402

DIMS, WEIGHTS = [4, 12, 32], [0.5, 1.0, 2.0]


def reference_step(model, rows, collator):
    batch = to_float64({key: value for key, value in collator(rows).items() if key != "num_skipped"})
    query = model(**batch["query"]).embeddings
    target = model(**batch["target"]).embeddings
    loss = 0.0
    for dim, weight in zip(DIMS, WEIGHTS):
        term, _ = hard_negative_infonce_loss(F.normalize(query[:, :dim], dim=-1), F.normalize(target[:, :dim], dim=-1),
                                             temperature=LOSS["contrastive_temperature"],
                                             num_hard_negatives=LOSS["num_hard_negatives"],
                                             false_negative_margin=LOSS["false_negative_margin"])
        loss = loss + weight * term
    loss.backward()
    return loss.detach(), lora_gradients(model)


def main(work_dir: str, output_path: str) -> None:
    rank = int(os.environ["RANK"])
    work_dir = Path(work_dir) / f"rank{rank}"
    train = load_mmeb_train(write_pairs(work_dir))
    args = HardNegativeConfig(output_dir=str(work_dir / "out"), use_cpu=True, ddp_backend="gloo", report_to=[],
                              lora_rank=4, lora_dropout=0.0, gradcache_chunk_size=2, image_size=28,
                              save_merged_model=False, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, **LOSS)
    torch.manual_seed(0)
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEHardNegativeTrainer(model=model.double(), args=args, processor=processor, train_dataset=train)
    torch.manual_seed(1)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    reference_model = copy.deepcopy(trainer.model).train()
    trainer.model.train()
    ddp_model = trainer.accelerator.prepare_model(trainer.model)
    trainer.current_gradient_accumulation_steps = 1

    rows = [train[i] for i in range(len(train))]
    start = sum(SHARDS[:rank])
    local_rows = rows[start:start + SHARDS[rank]]
    plain = MMEBCollator(processor, image_root=work_dir, image_size=28)
    chunked = MMEBCollator(processor, image_root=work_dir, image_size=28, chunk_size=2)

    ref_loss, reference = reference_step(reference_model, rows, plain)
    results = {}
    for name, collator, chunk_size in (("gradcache", chunked, 2), ("no_gradcache", plain, None)):
        trainer.args.gradcache_chunk_size = chunk_size
        loss = trainer.training_step(ddp_model, to_float64(collator(local_rows)))
        gradients = lora_gradients(trainer.model)
        results[name] = {
            "loss": loss.item(),
            "loss_max_abs_diff": abs(loss.item() - ref_loss.item()),
            "grad_max_abs_diff": max((gradients[k] - reference[k]).abs().max().item() for k in reference),
            "grad_max_abs": max(g.abs().max().item() for g in reference.values()),
            "num_gradients": len(gradients),
        }
    results["reference_loss"] = ref_loss.item()

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = dict(gathered[0])
        for name in ("gradcache", "no_gradcache"):
            for key in ("loss_max_abs_diff", "grad_max_abs_diff"):
                merged[name][key] = max(result[name][key] for result in gathered)
        merged["world_size"] = dist.get_world_size()
        with open(output_path, "w") as file:
            json.dump(merged, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # Some 2-process gloo runs abort during interpreter teardown; the result is already on disk.
    os._exit(0)
