r"""GradCache (Gao et al., 2021): exact gradients of a contrastive batch too large to backprop at once.

A contrastive loss couples every row of the batch, so the batch cannot be split like an ordinary
one. GradCache splits the *encoder* work and keeps the loss on the full batch:

1. `embed_no_grad`: embed every chunk without an autograd graph (its activations are freed at
   once), recording each chunk's RNG state.
2. `embedding_gradients`: gather the embeddings of all ranks, compute the loss on the full batch
   and its gradient with respect to this rank's embeddings. Cheap: they are only `[B, D]`.
3. `backward_chunks`: re-embed each chunk with autograd under its recorded RNG state (the same
   dropout masks, hence the same embeddings) and backpropagate the cached gradient into the
   parameters. Under DDP every chunk but the last runs in `no_sync`, so gradients are all-reduced
   once per step.

Since d(loss)/d(theta) = sum over chunks of J_chunk^T d(loss)/d(embeddings_chunk), the parameter
gradients equal those of one backward over the whole batch (tests/test_gradcache.py checks it).

Trade-off (as sentence-transformers documents for `CachedMultipleNegativesRankingLoss`): peak
memory is that of one chunk, so the contrastive batch is bounded only by the `[B, D]` embeddings,
but the language model encodes every item twice (a forward without graph, then a forward with it),
so a step is slower than plain backprop; sentence-transformers reports from about 20% (large
chunks) to 2.4x (very small chunks). The frozen vision tower runs once per item: its features are
computed before pass 1 and fed to both passes (`training.vision_features`). Gradient checkpointing
on top would add a third language-model forward for no memory gain the chunk does not already
give, so leave it off under GradCache (lower the chunk size instead).

Distributed: every rank computes the same loss on the gathered embeddings; the gradient for this
rank's slice is multiplied by the world size because DDP *averages* parameter gradients over ranks
(the same bookkeeping as `training.distributed.gather_with_grad`, whose backward sums over ranks).

Reference: Gao, Zhang, Han, Callan, 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup" (arXiv 2101.06983); code luyug/GradCache `grad_cache.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from .distributed import gather_with_grad, world_info
from .vision_features import with_image_features


class RandContext:
    """Capture the CPU (and CUDA, for the given tensors' devices) RNG state now; replay it in `with`.

    Entering forks the RNG, so the state outside the `with` block is restored on exit: pass 2
    replays pass 1's randomness without disturbing the training run's RNG stream.
    """

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork = None

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc_info):
        self._fork.__exit__(*exc_info)
        self._fork = None


def embed(model: torch.nn.Module, chunk: Mapping) -> torch.Tensor:
    """Embeddings `[chunk_size, D]` of one processor batch (a UniME model, possibly wrapped).

    A frozen vision tower runs under `torch.no_grad()` (see `training.vision_features`), so
    backward never reaches (nor recomputes) it; the embeddings are unchanged.
    """
    return model(**with_image_features(model, chunk)).embeddings


def chunk_rows(chunk: Mapping) -> int:
    """Number of items in a processor batch."""
    return int(chunk["input_ids"].shape[0])


def embed_no_grad(model, chunks: Sequence[Mapping], prepare: Callable[[Mapping], Mapping] | None = None
                  ) -> tuple[torch.Tensor, list[RandContext]]:
    """Pass 1: embed every chunk without autograd.

    Args:
        prepare: `chunk -> chunk` on the model's device, called just before the chunk's forward (so
            one chunk's inputs at a time are there); default: chunks are used as given.

    Returns:
        `(embeddings, rand_states)`: `[N, D]` embeddings of all chunks in order, and one
        `RandContext` per chunk holding the RNG state its forward started from.
    """
    prepare = prepare or _as_given
    embeddings, rand_states = [], []
    for chunk in chunks:
        chunk = prepare(chunk)
        rand_states.append(RandContext(*[value for value in chunk.values() if torch.is_tensor(value)]))
        with torch.no_grad():
            embeddings.append(embed(model, chunk))
    return torch.cat(embeddings), rand_states


def _as_given(chunk: Mapping) -> Mapping:
    return chunk


def cache_image_features(model, chunk: Mapping, prepare: Callable[[Mapping], Mapping] | None = None) -> Mapping:
    """What GradCache keeps of a chunk for its two passes: the chunk on the model's device with its frozen
    vision tower's features in place of the pixels (`with_image_features`), computed once; or, when the
    vision tower trains, the chunk as given, moved by `prepare` again at each pass, so that the pixels of
    one chunk at a time are on the device."""
    prepared = with_image_features(model, (prepare or _as_given)(chunk))
    return chunk if prepared.get("pixel_values") is not None else prepared


def embedding_gradients(
    loss_fn: Callable, query: torch.Tensor, target: torch.Tensor, loss_scale: float = 1.0
) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
    """Loss on the gathered batch and its gradient w.r.t. this rank's embeddings.

    Args:
        loss_fn: `(query [B, D], target [B, D]) -> (loss, aux)` on the global batch.
        query, target: `[b_local, D]` embeddings of this rank (no graph needed).
        loss_scale: factor on the gradient (e.g. 1 / gradient-accumulation steps).

    Returns:
        `(loss, aux, query_grad, target_grad)`: the detached unscaled loss, `loss_fn`'s aux
        output, and `[b_local, D]` gradients of `loss_scale * loss`, times the world size (see
        the module docstring).
    """
    rank, world_size = world_info()
    all_query = gather_with_grad(query.detach()).requires_grad_()
    all_target = gather_with_grad(target.detach()).requires_grad_()
    with torch.enable_grad():
        loss, aux = loss_fn(all_query, all_target)
        query_grad, target_grad = torch.autograd.grad(loss * loss_scale, [all_query, all_target])
    if world_size > 1:
        owner = gather_with_grad(torch.full((query.shape[0],), rank, device=query.device))
        local = owner == rank
        query_grad, target_grad = query_grad[local] * world_size, target_grad[local] * world_size
    return loss.detach(), aux, query_grad, target_grad


def backward_chunks(
    model,
    chunks: Sequence[Mapping],
    gradients: Sequence[torch.Tensor],
    rand_states: Sequence[RandContext],
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    prepare: Callable[[Mapping], Mapping] | None = None,
) -> None:
    """Pass 2: re-embed each chunk with autograd under its RNG state and backprop its cached gradient.

    Args:
        gradients: `[chunk_size, D]` cached d(loss)/d(embeddings) per chunk.
        backward: `surrogate -> None`; default `surrogate.backward()`. The trainer passes
            `accelerator.backward` (mixed-precision loss scaling, DeepSpeed).
        no_sync: context-manager factory wrapping every chunk but the last (DDP `no_sync`).
        prepare: see `embed_no_grad`.
    """
    backward = backward or torch.Tensor.backward
    prepare = prepare or _as_given
    for index, (chunk, gradient, rand_state) in enumerate(zip(chunks, gradients, rand_states, strict=True)):
        is_last = index == len(chunks) - 1
        with contextlib.nullcontext() if is_last or no_sync is None else no_sync():
            with rand_state:
                embeddings = embed(model, prepare(chunk))
            # d(surrogate)/d(embeddings) is the cached gradient, so this backward sends exactly it
            # into the parameters.
            surrogate = torch.sum(embeddings * gradient.to(embeddings.dtype))
            backward(surrogate)


def gradcache_step(
    model,
    query_chunks: Sequence[Mapping],
    target_chunks: Sequence[Mapping],
    loss_fn: Callable,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_scale: float = 1.0,
    prepare: Callable[[Mapping], Mapping] | None = None,
) -> tuple[torch.Tensor, object]:
    """One GradCache forward/backward over a contrastive batch given as processor-batch chunks.

    Accumulates into the parameters' `.grad` the gradient of `loss_scale * loss_fn(Q, T)`, where
    Q and T are the embeddings of all query and target chunks of all ranks. Query and target
    chunks may have different sizes. `loss_fn` is any `(Q [B, D], T [B, D]) -> (loss, aux)`
    (e.g. a Matryoshka sum over prefix dimensions); nothing here depends on its form.

    `prepare` (`chunk -> chunk`, e.g. the Trainer's move to the device) is applied to one chunk at a time,
    just before it is used, so that the device holds the pixels of one chunk, not of the whole batch
    (`cache_image_features`); without it, chunks are used where they are.

    Returns:
        `(loss, aux)`: the detached, unscaled loss and `loss_fn`'s aux output (e.g. stats).
    """
    if not query_chunks or not target_chunks:
        raise ValueError("gradcache_step needs at least one query chunk and one target chunk")
    # The frozen vision tower's output is the same in both passes: compute it once per chunk.
    query_chunks = [cache_image_features(model, chunk, prepare) for chunk in query_chunks]
    target_chunks = [cache_image_features(model, chunk, prepare) for chunk in target_chunks]
    if prepare is not None:  # chunks holding cached features are on the device already
        prepare = _unless_cached(prepare)
    query, query_states = embed_no_grad(model, query_chunks, prepare)
    target, target_states = embed_no_grad(model, target_chunks, prepare)
    if query.shape[0] != target.shape[0]:
        raise ValueError(f"{query.shape[0]} queries but {target.shape[0]} targets; they must pair up row by row")
    loss, aux, query_grad, target_grad = embedding_gradients(loss_fn, query, target, loss_scale)
    gradients = [*query_grad.split([chunk_rows(c) for c in query_chunks]),
                 *target_grad.split([chunk_rows(c) for c in target_chunks])]
    backward_chunks(model, [*query_chunks, *target_chunks], gradients, [*query_states, *target_states],
                    backward, no_sync, prepare)
    return loss, aux


def _unless_cached(prepare: Callable[[Mapping], Mapping]) -> Callable[[Mapping], Mapping]:
    return lambda chunk: chunk if chunk.get("mm_encoder_outputs") is not None else prepare(chunk)
