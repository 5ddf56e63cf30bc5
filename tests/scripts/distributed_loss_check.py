"""Check, on 2 CPU ranks (gloo), that gathered losses and DDP gradients equal single-process ones.

Run by tests/test_distributed.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/scripts/distributed_loss_check.py OUT.json

Every rank builds the same seeded encoder wrapped in DDP, embeds its shard of one global batch,
gathers with `gather_with_grad`, computes the loss on the global batch and backpropagates. Each rank
compares its loss and its DDP-averaged parameter gradients with a single-process computation on the
concatenated batch; rank 0 writes the worst differences over ranks to OUT.json. A control case uses
a VLM2Vec-style gather (plain `all_gather`, local tensor put back in its slot), which keeps only
the local gradient: it must NOT match, which shows the comparison can fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.distributed import gather_with_grad, world_info  # noqa: E402
from training.losses import distillation_loss, hard_negative_infonce_loss  # noqa: E402

INPUT_DIM, EMBED_DIM, TEACHER_DIM = 6, 4, 5
DTYPE = torch.float64

# (case name, loss, rows per rank, gather)
CASES = [
    ("hard_negative_equal_shards", "hard_negative", (5, 5), "gather_with_grad"),
    ("hard_negative_unequal_shards", "hard_negative", (6, 3), "gather_with_grad"),
    ("distillation_equal_shards", "distillation", (5, 5), "gather_with_grad"),
    ("distillation_unequal_shards", "distillation", (6, 3), "gather_with_grad"),
    ("control_local_slot_gather", "hard_negative", (5, 5), "local_slot"),
]


def build_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(INPUT_DIM, EMBED_DIM, dtype=DTYPE)


def make_global_batch(global_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw queries `[B, INPUT_DIM]`, raw targets `[B, INPUT_DIM]`, teacher embeddings `[B, TEACHER_DIM]`."""
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(global_size, INPUT_DIM, generator=generator, dtype=DTYPE)
    targets = queries + 0.7 * torch.randn(global_size, INPUT_DIM, generator=generator, dtype=DTYPE)
    teacher = F.normalize(torch.randn(global_size, TEACHER_DIM, generator=generator, dtype=DTYPE), dim=-1)
    return queries, targets, teacher


def local_slot_gather(tensor: torch.Tensor) -> torch.Tensor:
    """VLM2Vec's fix of the reference gather: only the local shard keeps its gradient."""
    rank, world_size = world_info()
    shards = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(shards, tensor.detach())
    shards[rank] = tensor
    return torch.cat(shards, dim=0)


GATHERS = {"gather_with_grad": gather_with_grad, "local_slot": local_slot_gather, "none": lambda tensor: tensor}


def compute_loss(loss_name, encoder, queries, targets, teacher, gather) -> tuple[torch.Tensor, dict]:
    # One forward for queries and targets: DDP expects one forward per backward.
    embeddings = F.normalize(encoder(torch.cat([queries, targets])), dim=-1)
    query_embeddings, target_embeddings = embeddings.split([len(queries), len(targets)])
    query_embeddings = gather(query_embeddings)
    if loss_name == "hard_negative":
        # margin 0 and k=8 on 9-10 rows: some candidates filtered, some rows short of k.
        target_embeddings = gather(target_embeddings)
        loss, stats = hard_negative_infonce_loss(
            query_embeddings, target_embeddings, temperature=0.1, num_hard_negatives=8, false_negative_margin=0.0
        )
        return loss, stats.to_dict()
    return distillation_loss(query_embeddings, gather(teacher), temperature=0.1), {}


def loss_and_gradients(loss_name, shard_sizes, gather_name, distributed: bool):
    rank, _ = world_info()
    queries, targets, teacher = make_global_batch(sum(shard_sizes))
    encoder = build_encoder()
    if distributed:
        start = sum(shard_sizes[:rank])
        rows = slice(start, start + shard_sizes[rank])
        queries, targets, teacher = queries[rows], targets[rows], teacher[rows]
        model = DistributedDataParallel(encoder)
    else:
        model, gather_name = encoder, "none"
    loss, stats = compute_loss(loss_name, model, queries, targets, teacher, GATHERS[gather_name])
    loss.backward()
    return loss.detach(), [parameter.grad.detach().clone() for parameter in encoder.parameters()], stats


def compare_case(loss_name, shard_sizes, gather_name) -> dict:
    distributed_loss, distributed_grads, _ = loss_and_gradients(loss_name, shard_sizes, gather_name, True)
    single_loss, single_grads, stats = loss_and_gradients(loss_name, shard_sizes, gather_name, False)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(distributed_grads, single_grads))
    return {
        "loss_distributed": distributed_loss.item(),
        "loss_single_process": single_loss.item(),
        "loss_max_abs_diff": (distributed_loss - single_loss).abs().item(),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": max(grad.abs().max().item() for grad in single_grads),
        "single_process_stats": stats,
    }


def main(output_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = world_info()
    per_rank = {name: compare_case(*case) for name, *case in CASES}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, per_rank)
    if rank == 0:
        result = {"world_size": world_size, "dtype": str(DTYPE), "cases": {}}
        for name, *_ in CASES:
            # Differences: the worst over ranks; values: rank 0's.
            result["cases"][name] = {
                key: max(rank_result[name][key] for rank_result in gathered) if key.endswith("diff") else value
                for key, value in gathered[0][name].items()
            }
        with open(output_path, "w") as file:
            json.dump(result, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Some 2-process gloo runs abort during interpreter teardown; the result is already on disk.
    os._exit(0)
