"""UniME training losses: stage-1 distillation (DESIGN §4.1), stage-2 hard-negative InfoNCE (§4.2),
and the Matryoshka wrapper that applies either to nested prefixes of the embeddings.

Both losses take embeddings of the whole (already gathered) batch. Gathering across ranks lives in
`training.distributed.gather_with_grad`, so each formula can be checked on one process.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

KD_DIRECTIONS = ("forward", "reverse")


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 0.02,
    mask_diagonal: bool = True,
    direction: str = "forward",
) -> torch.Tensor:
    r"""Textual discriminative knowledge distillation loss (UniME stage 1, paper Eq. 2).

    The student mimics the teacher's *batch-wise similarity distribution*: for every row i,

    .. math::
        S_s = e_s e_s^\top / \tau, \quad S_t = e_t e_t^\top / \tau, \quad
        P_s[i] = \mathrm{softmax}(S_s[i]), \quad P_t[i] = \mathrm{softmax}(S_t[i])

        L_{forward} = \frac{1}{N} \sum_i \mathrm{KL}(P_t[i] \,\|\, P_s[i]), \qquad
        L_{reverse} = \frac{1}{N} \sum_i \mathrm{KL}(P_s[i] \,\|\, P_t[i])

    With ``mask_diagonal`` the self-similarity j = i is removed from both distributions (each row is
    a distribution over the other N - 1 texts); unmasked, the diagonal 1/tau dominates every row.
    The paper prints KL(P_s || P_t) ("reverse"); "forward" is the conventional distillation direction
    and our default (DESIGN §4.1). Only the N x N similarity matrices are compared, so the student
    and teacher dimensions may differ.

    Args:
        student: `[N, d_s]` L2-normalised student embeddings (carry the gradient).
        teacher: `[N, d_t]` L2-normalised teacher embeddings of the same N texts, same order.
        temperature: tau > 0 dividing the cosine similarities.
        mask_diagonal: drop each row's self-similarity from both distributions (needs N >= 2).
        direction: "forward" for KL(teacher || student), "reverse" for KL(student || teacher).

    Returns:
        Scalar tensor: the mean over rows of the row-wise KL divergence, computed in at least float32.

    References:
        Gu et al., 2025, "Breaking the Modality Barrier: Universal Embedding Learning with
        Multimodal LLMs" (arXiv 2504.17432), §3.2.1, Eq. 2.

    Example::

        >>> student = F.normalize(torch.randn(8, 64), dim=-1)
        >>> teacher = F.normalize(torch.randn(8, 128), dim=-1)
        >>> distillation_loss(student, teacher, temperature=0.02).shape
        torch.Size([])
    """
    _check_temperature(temperature)
    if direction not in KD_DIRECTIONS:
        raise ValueError(f"direction must be one of {KD_DIRECTIONS}, got {direction!r}")
    _check_embeddings("student", student)
    _check_embeddings("teacher", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must embed the same texts: got {student.shape[0]} student rows "
            f"and {teacher.shape[0]} teacher rows"
        )
    num_rows = student.shape[0]
    min_rows = 2 if mask_diagonal else 1
    if num_rows < min_rows:
        raise ValueError(
            f"distillation_loss needs at least {min_rows} rows (mask_diagonal={mask_diagonal}), "
            f"got {num_rows}"
        )
    dtype = _compute_dtype(student, teacher)
    log_p_student = F.log_softmax(_similarity_logits(student.to(dtype), temperature, mask_diagonal), -1)
    log_p_teacher = F.log_softmax(_similarity_logits(teacher.to(dtype), temperature, mask_diagonal), -1)
    if direction == "forward":
        return _mean_row_kl(log_p_teacher, log_p_student)
    return _mean_row_kl(log_p_student, log_p_teacher)


def _similarity_logits(embeddings: torch.Tensor, temperature: float, mask_diagonal: bool) -> torch.Tensor:
    """`[N, d]` -> `[N, N]` scaled self-similarities, or `[N, N - 1]` without the diagonal."""
    logits = embeddings @ embeddings.T / temperature
    return _drop_diagonal(logits) if mask_diagonal else logits


def _drop_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """`[N, N]` -> `[N, N - 1]`: every row without its diagonal entry, the others in order.

    Removing the entries, rather than filling them with -inf, keeps the KL free of `0 * log 0` terms
    and their NaN gradients.
    """
    n = matrix.shape[0]
    return matrix.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def _mean_row_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`mean_i KL(p_i || q_i)` for row-wise log-probabilities `[N, M]` -> scalar."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


@dataclasses.dataclass(frozen=True)
class HardNegativeStats:
    """Per-step diagnostics of `hard_negative_infonce_loss` (DESIGN §4.2 "log per step").

    Attributes:
        mean_positive_similarity: mean of S_ii over the batch.
        mean_hard_negative_similarity: mean S_ij over the negative slots used in the logits, repeated
            negatives counted once per slot; nan when no row has a negative.
        false_negative_fraction: share of the B * (B - 1) off-diagonal candidates removed by the
            false-negative filter (the paper's FalseNeg%); nan when B == 1.
        rows_with_false_negatives_fraction: share of rows with at least one filtered candidate (the
            paper's Table 4 wording: "share of samples that had negatives filtered").
        rows_short_of_k: rows with 1 to k - 1 valid negatives, padded by repetition (0 when k is None).
        rows_without_negatives: rows left with no valid negative (their logits are [S_ii] only).
    """

    mean_positive_similarity: float
    mean_hard_negative_similarity: float
    false_negative_fraction: float
    rows_with_false_negatives_fraction: float
    rows_short_of_k: int
    rows_without_negatives: int

    def to_dict(self, prefix: str = "") -> dict[str, float | int]:
        """Flat `{prefix + field_name: value}` mapping for a logger."""
        return {f"{prefix}{field.name}": getattr(self, field.name) for field in dataclasses.fields(self)}


def hard_negative_infonce_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.02,
    num_hard_negatives: int | None = 8,
    false_negative_margin: float | None = 0.1,
) -> tuple[torch.Tensor, HardNegativeStats]:
    r"""Hard-negative-enhanced InfoNCE with false-negative filtering (UniME stage 2, paper Eq. 3-4).

    Row i's positive is ``target[i]``; its negatives are the other in-batch targets:

    .. math::
        S = Q T^\top, \qquad
        \mathcal{V}_i = \{ j \ne i : S_{ij} \le S_{ii} + \beta \} \quad \text{(false-negative filter, §3.3.1)}

        \mathcal{N}_i = \text{top-}k \text{ of } \mathcal{V}_i \text{ by } S_{ij}
        \quad \text{(hard negatives, Eq. 3)}

        L = \frac{1}{B} \sum_i -\log
            \frac{e^{S_{ii}/\tau}}{e^{S_{ii}/\tau} + \sum_{j \in \mathcal{N}_i} e^{S_{ij}/\tau}}
        \quad \text{(Eq. 4)}

    The negative indices are chosen without gradient; the gradient flows through the selected
    similarities. A row with fewer than k valid negatives repeats them cyclically to fill k slots
    (the paper's rule; the released code instead picks the positive or filtered entries). A row with
    none keeps the logits ``[S_ii]`` only: its loss is 0 and it still counts in the mean.

    Args:
        query: `[B, d]` L2-normalised query embeddings of the global batch.
        target: `[B, d]` L2-normalised target embeddings; row i is the positive of query i.
        temperature: tau > 0 dividing the similarities (reference default 0.02).
        num_hard_negatives: k negatives per row (paper: 8). None gives plain in-batch InfoNCE over
            all valid negatives of each row, without repetition.
        false_negative_margin: beta (paper: 0.1); candidates with S_ij > S_ii + beta are dropped.
            None disables the filter.

    Returns:
        `(loss, stats)`: the scalar loss (at least float32) and a `HardNegativeStats`.

    References:
        Gu et al., 2025, "Breaking the Modality Barrier: Universal Embedding Learning with
        Multimodal LLMs" (arXiv 2504.17432), §3.3, Eq. 3-4; code deepglint/UniME `loss.py`.

    Example::

        >>> query = F.normalize(torch.randn(16, 32), dim=-1)
        >>> target = F.normalize(torch.randn(16, 32), dim=-1)
        >>> loss, stats = hard_negative_infonce_loss(query, target, num_hard_negatives=8)
        >>> sorted(stats.to_dict("train/"))[0]
        'train/false_negative_fraction'
    """
    _check_temperature(temperature)
    _check_num_hard_negatives(num_hard_negatives)
    _check_margin(false_negative_margin)
    _check_embeddings("query", query)
    _check_embeddings("target", target)
    if query.shape != target.shape:
        raise ValueError(
            f"query and target must both be [B, d] with the same B and d, got {tuple(query.shape)} "
            f"and {tuple(target.shape)}"
        )
    if query.shape[0] == 0:
        raise ValueError("hard_negative_infonce_loss needs at least 1 row, got an empty batch")

    dtype = _compute_dtype(query, target)
    similarities = query.to(dtype) @ target.to(dtype).T
    valid = _valid_negative_mask(similarities.detach(), false_negative_margin)
    if num_hard_negatives is None:
        negative_similarities, used = similarities, valid
    else:
        negative_similarities, used = _select_hard_negatives(similarities, valid, num_hard_negatives)

    positive = similarities.diagonal()[:, None]
    negatives = negative_similarities.masked_fill(~used, -math.inf)
    logits = torch.cat([positive, negatives], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels)
    stats = _hard_negative_stats(similarities.detach(), valid, negative_similarities.detach(), used, num_hard_negatives)
    return loss, stats


def _valid_negative_mask(similarities: torch.Tensor, margin: float | None) -> torch.Tensor:
    """`[B, B]` similarities -> `[B, B]` bool: j != i and not a likely false negative of row i."""
    valid = ~torch.eye(similarities.shape[0], dtype=torch.bool, device=similarities.device)
    if margin is not None:
        threshold = similarities.diagonal()[:, None] + margin
        valid &= similarities <= threshold
    return valid


def _select_hard_negatives(
    similarities: torch.Tensor, valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k negative slots per row: `[B, B]`, `[B, B]` -> similarities `[B, k]`, used `[B, k]` bool.

    Slot s of row i holds its (s mod n_i)-th most similar valid target, n_i = number of valid ones;
    rows with n_i = 0 get no used slot.
    """
    batch_size = similarities.shape[0]
    with torch.no_grad():
        candidates = similarities.masked_fill(~valid, -math.inf)
        # Valid entries are finite, so sorted top-k lists a row's n_i valid targets first.
        ranked = candidates.topk(min(k, batch_size), dim=1).indices
        num_valid = valid.sum(dim=1, keepdim=True)
        slots = torch.arange(k, device=similarities.device)[None, :] % num_valid.clamp(min=1)
        columns = ranked.gather(1, slots)
        used = (num_valid > 0).expand(batch_size, k)
    return similarities.gather(1, columns), used


@torch.no_grad()
def _hard_negative_stats(
    similarities: torch.Tensor,
    valid: torch.Tensor,
    negative_similarities: torch.Tensor,
    used: torch.Tensor,
    k: int | None,
) -> HardNegativeStats:
    batch_size = similarities.shape[0]
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=similarities.device)
    filtered = off_diagonal & ~valid
    num_valid = valid.sum(dim=1)
    short_of_k = (num_valid > 0) & (num_valid < k) if k is not None else torch.zeros_like(num_valid, dtype=torch.bool)
    num_candidates = batch_size * (batch_size - 1)
    values = [
        similarities.diagonal().mean(),
        negative_similarities[used].mean(),  # nan when no slot is used
        filtered.double().sum() / num_candidates if num_candidates else similarities.new_tensor(math.nan),
        filtered.any(dim=1).double().mean(),
        short_of_k.sum(),
        (num_valid == 0).sum(),
    ]
    values = torch.stack([value.double() for value in values]).tolist()  # one device sync
    return HardNegativeStats(
        mean_positive_similarity=values[0],
        mean_hard_negative_similarity=values[1],
        false_negative_fraction=values[2],
        rows_with_false_negatives_fraction=values[3],
        rows_short_of_k=int(values[4]),
        rows_without_negatives=int(values[5]),
    )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: similarities / 0.02 and softmax lose too much in fp16/bf16."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_embeddings(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch_size, dim], got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape [batch_size, dim], got shape {tuple(tensor.shape)}")


def _check_temperature(temperature: object, name: str = "temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")


def _check_num_hard_negatives(num_hard_negatives: object) -> None:
    if num_hard_negatives is None:
        return
    if isinstance(num_hard_negatives, bool) or not isinstance(num_hard_negatives, numbers.Integral):
        raise TypeError(f"num_hard_negatives must be a positive int or None, got {num_hard_negatives!r}")
    if num_hard_negatives < 1:
        raise ValueError(f"num_hard_negatives must be >= 1 (or None for all negatives), got {num_hard_negatives}")


def _check_margin(margin: object) -> None:
    if margin is None:
        return
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"false_negative_margin must be a number or None, got {margin!r}")
    if not math.isfinite(margin):
        raise ValueError(f"false_negative_margin must be finite (or None to disable the filter), got {margin!r}")


def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor | tuple],
    embeddings: Sequence[torch.Tensor],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict[int, object]]:
    r"""Matryoshka representation learning (Kusupati et al., 2022): one loss on nested prefixes.

    Every tensor in ``embeddings`` is cut to its first :math:`d_m` dimensions and re-normalised, the
    stage's loss is computed on the cut batch, and the losses are summed with weights :math:`c_m`:

    .. math::
        e^{(d)} = \frac{e_{1:d}}{\lVert e_{1:d} \rVert_2}, \qquad
        L_{MRL} = \sum_{m=1}^{M} c_m \, L\big(e^{(d_m)}_1, \dots, e^{(d_m)}_k\big)

    (MRL's default is :math:`c_m = 1`). The largest :math:`d_M` is normally the full dimension D,
    so the full embedding keeps its own loss term. Each term is a function of the embeddings only,
    so GradCache stays exact when this is its loss function (it differentiates the whole sum w.r.t.
    the cached embeddings).

    Args:
        loss_fn: `(*cut_embeddings) -> loss` or `-> (loss, aux)` (e.g. `hard_negative_infonce_loss`
            with its settings bound); each `[B, d_m]` input is L2-normalised.
        embeddings: tensors `[B_i, D_i]` to cut (e.g. `(query, target)`; for stage-1 distillation
            only the student, the teacher stays whole).
        dims: strictly increasing prefix sizes `d_1 < ... < d_M`, each <= every `D_i`.
        weights: `c_m`, one non-negative number per dim; default all 1.

    Returns:
        `(loss, outputs)`: the scalar weighted sum and `{d_m: loss_fn's output at d_m}`.

    Example::

        >>> query = F.normalize(torch.randn(16, 64), dim=-1)
        >>> target = F.normalize(torch.randn(16, 64), dim=-1)
        >>> loss, per_dim = matryoshka_loss(lambda q, t: hard_negative_infonce_loss(q, t)[0],
        ...                                 (query, target), dims=[16, 32, 64])
        >>> sorted(per_dim)
        [16, 32, 64]
    """
    dims, weights = check_matryoshka(dims, weights)
    widths = {tensor.shape[-1] for tensor in embeddings}
    if dims[-1] > min(widths):
        raise ValueError(f"matryoshka dims {list(dims)} exceed the embedding dimension {min(widths)}")
    total, outputs = None, {}
    for dim, weight in zip(dims, weights):
        output = loss_fn(*(F.normalize(tensor[..., :dim], dim=-1) for tensor in embeddings))
        outputs[dim] = output
        term = weight * (output[0] if isinstance(output, tuple) else output)
        total = term if total is None else total + term
    return total, outputs


def check_matryoshka(dims: object, weights: object = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate Matryoshka settings; returns `(dims, weights)` as tuples (weights default to 1.0 each).

    Raises:
        ValueError / TypeError naming the bad entry: dims not strictly increasing positive ints,
        weights not one finite non-negative number per dim (with at least one positive).
    """
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"matryoshka_dims must be a non-empty list of ints, got {dims!r}")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"matryoshka_dims entries must be positive ints, got {dim!r} in {list(dims)}")
    if any(a >= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims must be strictly increasing, got {list(dims)}")
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must give one number per dim ({len(dims)}), got {weights!r}")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"matryoshka_weights entries must be finite numbers >= 0, got {weight!r}")
    if not any(weight > 0 for weight in weights):
        raise ValueError(f"matryoshka_weights must have at least one positive weight, got {list(weights)}")
    return tuple(int(d) for d in dims), tuple(float(w) for w in weights)


def record_matryoshka_dims(model, dims: Sequence[int]) -> None:
    """Store the trained prefix sizes in `model.config.matryoshka_dims` (a [`UniMEModel`]), so
    `encode(truncate_dim=d)`, the model card and exports know them.

    Raises:
        ValueError: the largest dim exceeds the model's embedding dimension.
    """
    hidden = model.config.text_hidden_size
    if dims[-1] > hidden:
        raise ValueError(f"matryoshka_dims {list(dims)} exceed the model's embedding dimension {hidden}")
    model.config.matryoshka_dims = [int(d) for d in dims]
