"""Cross-rank gathering of embeddings that keeps the autograd graph (DESIGN §4.2, fix 1).

The released UniME loss gathers with plain `dist.all_gather`, whose outputs carry no gradient, so
the local shard's graph is lost (REFERENCE §7.1, pitfall 1). `gather_with_grad` is the one place
this project gathers features for a loss; the losses in `training.losses` take the gathered batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world_info() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    r"""All-gather `[b_local, ...]` shards from every rank into `[B_global, ...]`, keeping gradients.

    Rows are ordered by rank (rank 0's shard first), so row i of gathered queries still matches
    row i of gathered targets. Ranks may hold different numbers of rows (a short last batch): sizes
    are gathered first and shards padded to the largest, gathered, then trimmed. The trailing
    dimensions and dtype must be the same on every rank. Without an initialised process group, or
    with world size 1, the tensor is returned unchanged.

    Gradient semantics (as open_clip's `gather_features(..., gather_with_grad=True)`): the gather
    is `torch.distributed.nn.functional.all_gather`, whose backward *sums* over ranks the gradient
    each rank computed for a shard and hands rank r the sum for its own shard. Let every rank compute
    the same global loss L on the gathered batch, and let x_r be rank r's shard with Jacobian
    J_r = dx_r / dtheta. Backward on rank r then yields

    .. math::
        \frac{\partial L}{\partial x_r}\Big|_{\text{rank } r} = W \frac{\partial L}{\partial x_r},
        \qquad g_r = W J_r^\top \frac{\partial L}{\partial x_r}

    and DDP's gradient averaging gives

    .. math::
        \frac{1}{W} \sum_r g_r = \sum_r J_r^\top \frac{\partial L}{\partial x_r} = \frac{dL}{d\theta},

    the single-process gradient of L on the full batch. So the loss must NOT be scaled by the world
    size (the reference multiplies by it because its gather keeps at most the local gradient, which
    gives 1/W of the right value after averaging). The same holds for GradCache: the cached
    embedding gradients already include the factor W that DDP's averaging removes.

    The backward is itself a collective: every rank must backpropagate through the gathered tensor
    (or none may), otherwise the ranks hang.

    Args:
        tensor: `[b_local, ...]` local shard, e.g. L2-normalised embeddings `[b_local, dim]`. May
            or may not require grad (teacher embeddings do not).

    Returns:
        `[B_global, ...]` with `B_global = sum of b_local over ranks`.

    Example::

        query = gather_with_grad(local_query_embeddings)    # [B_global, d]
        target = gather_with_grad(local_target_embeddings)  # [B_global, d]
        loss, stats = hard_negative_infonce_loss(query, target)
        loss.backward()  # on every rank; DDP averages to the full-batch gradient
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"gather_with_grad expects a torch.Tensor, got {type(tensor).__name__}")
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    if tensor.ndim == 0:
        raise ValueError("gather_with_grad expects a tensor with a batch dimension [b_local, ...], got a scalar")
    sizes = _gather_batch_sizes(tensor)
    padded = _pad_rows(tensor, max(sizes))
    shards = _all_gather_autograd(padded)
    return torch.cat([shard[:size] for shard, size in zip(shards, sizes)], dim=0)


def _gather_batch_sizes(tensor: torch.Tensor) -> list[int]:
    """Every rank's `b_local`, in rank order."""
    _, world_size = world_info()
    # On the tensor's device: NCCL only moves CUDA tensors.
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    return [int(size.item()) for size in sizes]


def _pad_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zero-pad `[b, ...]` to `[num_rows, ...]`; collectives need the same shape on every rank."""
    missing = num_rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))], dim=0)


def _all_gather_autograd(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with warnings.catch_warnings():
        # Recent torch marks this public function deprecated in favour of a private module
        # (torch.distributed._functional_collectives); keep the public API until that one is public.
        warnings.filterwarnings("ignore", message=r".*nn\.functional\.all_gather is deprecated", category=FutureWarning)
        return dist_nn.all_gather(tensor)
