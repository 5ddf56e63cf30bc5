"""Check, on 2 CPU ranks (gloo), that the stage-2 trainer's step under DDP equals one process.

Run by tests/test_stage2.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/scripts/stage2_ddp_check.py WORK_DIR OUT.json

Every rank builds the same seeded tiny Qwen2-VL UniME model (float64, LoRA without dropout) inside
`UniMEHardNegativeTrainer`, wraps it in DDP with the trainer's own accelerator, collates its shard
of one global batch of MMEB-format pairs and runs `trainer.training_step` once with GradCache
(chunks of 2, so ranks run several chunks under `no_sync`) and once without. The reference is
plain autograd on an unwrapped copy of the model: the whole global batch, one processor call per
side, `hard_negative_infonce_loss`, `backward`. Shards are unequal (5 and 3 pairs), so the ranks
also run different numbers of chunks. A third step with 2 accumulation steps must give half the
reference gradients. Rank 0 writes the worst differences over ranks to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer  # noqa: E402
from training.losses import hard_negative_infonce_loss  # noqa: E402
from training.mmeb_data import MMEBCollator, load_mmeb_train  # noqa: E402
from training.demo.tiny_models import tiny_unime  # noqa: E402

SHARDS = (5, 3)
LOSS = {"contrastive_temperature": 0.05, "num_hard_negatives": 3, "false_negative_margin": 0.05}
COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (235, 200, 20), (130, 40, 170), (120, 120, 120)]


def write_pairs(work_dir: Path):
    """8 pairs mixing image queries, text queries, image targets and text targets."""
    (work_dir / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(sum(SHARDS)):
        Image.new("RGB", (30 + 2 * i, 28), COLOURS[i % len(COLOURS)]).save(work_dir / "img" / f"{i}.png")
        if i % 3 == 2:
            rows.append({"qry": f"Find an image of colour number {i}", "qry_image_path": "",
                         "pos_text": "<|image_1|> Represent the given image.", "pos_image_path": f"img/{i}.png"})
        else:
            rows.append({"qry": "<|image_1|> Represent the given image for classification.",
                         "qry_image_path": f"img/{i}.png", "pos_text": f"colour {i} of the palette",
                         "pos_image_path": ""})
    path = work_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def to_float64(batch):
    if isinstance(batch, list):
        return [to_float64(chunk) for chunk in batch]
    for key, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point():
            batch[key] = value.double()
    return batch


def lora_gradients(model):
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return gradients


def reference_step(model, rows, collator):
    batch = to_float64({key: value for key, value in collator(rows).items() if key != "num_skipped"})
    query = model(**batch["query"]).embeddings
    target = model(**batch["target"]).embeddings
    loss, _ = hard_negative_infonce_loss(query, target, temperature=LOSS["contrastive_temperature"],
                                         num_hard_negatives=LOSS["num_hard_negatives"],
                                         false_negative_margin=LOSS["false_negative_margin"])
    loss.backward()
    return loss.detach(), lora_gradients(model)


def trainer_step(trainer, ddp_model, rows, collator):
    batch = to_float64(collator(rows))
    loss = trainer.training_step(ddp_model, batch)
    return loss, lora_gradients(trainer.model)


def main(work_dir: str, output_path: str) -> None:
    rank = int(os.environ["RANK"])
    work_dir = Path(work_dir) / f"rank{rank}"
    train = load_mmeb_train(write_pairs(work_dir))
    args = HardNegativeConfig(output_dir=str(work_dir / "out"), use_cpu=True, ddp_backend="gloo", report_to=[],
                              lora_rank=4, lora_dropout=0.0, gradcache_chunk_size=2, image_size=28,
                              save_merged_model=False, **LOSS)
    torch.manual_seed(0)
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEHardNegativeTrainer(model=model.double(), args=args, processor=processor, train_dataset=train)
    torch.manual_seed(1)  # the same non-zero LoRA B on every rank, so every adapter weight gets a gradient
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
        loss, gradients = trainer_step(trainer, ddp_model, local_rows, collator)
        results[name] = {
            "loss": loss.item(),
            "loss_max_abs_diff": abs(loss.item() - ref_loss.item()),
            "grad_max_abs_diff": max((gradients[k] - reference[k]).abs().max().item() for k in reference),
            "grad_max_abs": max(g.abs().max().item() for g in reference.values()),
            "num_gradients": len(gradients),
        }
    # Gradient accumulation over 2 micro-batches: this micro-batch's gradients are halved. It also
    # shows the check can fail: a GradCache that forgot the world-size factor (2 here) would give
    # exactly these halved gradients in the single-step comparison above.
    trainer.args.gradcache_chunk_size = 2
    trainer.current_gradient_accumulation_steps = 2
    loss, gradients = trainer_step(trainer, ddp_model, local_rows, chunked)
    results["gradcache_accumulation_2"] = {
        "loss": loss.item(),
        "grad_max_abs_diff_vs_half_reference": max((gradients[k] - reference[k] / 2).abs().max().item()
                                                    for k in reference),
        "grad_max_abs_diff_vs_reference": max((gradients[k] - reference[k]).abs().max().item() for k in reference),
    }
    results["reference_loss"] = ref_loss.item()
    results["ddp_wrapped"] = type(ddp_model).__name__

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = dict(gathered[0])
        for name in ("gradcache", "no_gradcache"):
            for key in ("loss_max_abs_diff", "grad_max_abs_diff"):
                merged[name][key] = max(result[name][key] for result in gathered)
        accumulation = merged["gradcache_accumulation_2"]
        accumulation["grad_max_abs_diff_vs_half_reference"] = max(
            result["gradcache_accumulation_2"]["grad_max_abs_diff_vs_half_reference"] for result in gathered)
        accumulation["grad_max_abs_diff_vs_reference"] = min(
            result["gradcache_accumulation_2"]["grad_max_abs_diff_vs_reference"] for result in gathered)
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
