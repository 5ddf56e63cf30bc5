"""training/losses.py against straightforward per-row loop implementations (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import HardNegativeStats, distillation_loss, hard_negative_infonce_loss

DTYPE = torch.float64


def unit_rows(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_rows, dim, generator=generator, dtype=DTYPE), dim=-1)


def matrix_as_embeddings(similarities: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, target) with query @ target.T == similarities exactly: query = I, target = S^T."""
    matrix = torch.tensor(similarities, dtype=DTYPE)
    return torch.eye(matrix.shape[0], dtype=DTYPE), matrix.T.contiguous()


def log_softmax_list(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """log softmax of a list of scalar tensors, written out with the max shift."""
    shift = max(logits, key=lambda value: value.item()).detach()
    log_normaliser = shift + torch.log(sum(torch.exp(value - shift) for value in logits))
    return [value - log_normaliser for value in logits]


# ----------------------------------------------------------------------------- reference: stage 1


def reference_distillation(student, teacher, temperature, mask_diagonal, direction):
    num_rows = student.shape[0]
    total = 0.0
    for i in range(num_rows):
        columns = [j for j in range(num_rows) if not (mask_diagonal and j == i)]
        log_p_student = log_softmax_list([student[i] @ student[j] / temperature for j in columns])
        log_p_teacher = log_softmax_list([teacher[i] @ teacher[j] / temperature for j in columns])
        if direction == "forward":
            log_p, log_q = log_p_teacher, log_p_student
        else:
            log_p, log_q = log_p_student, log_p_teacher
        total = total + sum(torch.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / num_rows


# ----------------------------------------------------------------------------- reference: stage 2


def reference_negative_columns(similarities, i, num_hard_negatives, margin):
    """Row i's negative columns: filter, sort by similarity, take k, repeat cyclically if short."""
    num_rows = similarities.shape[0]
    positive = similarities[i, i].item()
    valid = [
        j for j in range(num_rows)
        if j != i and (margin is None or similarities[i, j].item() <= positive + margin)
    ]  # fmt: skip
    valid.sort(key=lambda j: -similarities[i, j].item())
    if num_hard_negatives is None or not valid:
        return valid
    chosen = valid[:num_hard_negatives]
    return [chosen[slot % len(chosen)] for slot in range(num_hard_negatives)]


def reference_hard_negative_loss(query, target, temperature, num_hard_negatives, margin):
    num_rows = query.shape[0]
    similarities = torch.stack([torch.stack([query[i] @ target[j] for j in range(num_rows)]) for i in range(num_rows)])
    total = 0.0
    for i in range(num_rows):
        columns = reference_negative_columns(similarities.detach(), i, num_hard_negatives, margin)
        logits = [similarities[i, i] / temperature] + [similarities[i, j] / temperature for j in columns]
        total = total - log_softmax_list(logits)[0]
    return total / num_rows


def loss_and_grads(loss_fn, *inputs):
    leaves = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    loss = loss_fn(*leaves)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_same_loss_and_grads(loss_fn, reference_fn, *inputs):
    loss, grads = loss_and_grads(loss_fn, *inputs)
    expected_loss, expected_grads = loss_and_grads(reference_fn, *inputs)
    torch.testing.assert_close(loss, torch.as_tensor(expected_loss, dtype=DTYPE), rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_diagonal", [True, False])
@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_distillation_matches_loop_reference(direction, mask_diagonal, temperature):
    student, teacher = unit_rows(7, 5, seed=0), unit_rows(7, 9, seed=1)  # different dims on purpose
    assert_same_loss_and_grads(
        lambda s, t: distillation_loss(s, t, temperature, mask_diagonal, direction),
        lambda s, t: reference_distillation(s, t, temperature, mask_diagonal, direction),
        student, teacher,
    )  # fmt: skip


def test_distillation_directions_differ_and_identical_models_give_zero():
    student, teacher = unit_rows(6, 4, seed=2), unit_rows(6, 8, seed=3)
    forward = distillation_loss(student, teacher, direction="forward")
    reverse = distillation_loss(student, teacher, direction="reverse")
    assert forward > 0 and reverse > 0 and not torch.isclose(forward, reverse)
    assert distillation_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_distillation_mask_changes_the_loss():
    student, teacher = unit_rows(6, 4, seed=4), unit_rows(6, 8, seed=5)
    masked = distillation_loss(student, teacher, temperature=0.5, mask_diagonal=True)
    unmasked = distillation_loss(student, teacher, temperature=0.5, mask_diagonal=False)
    assert not torch.isclose(masked, unmasked)


@pytest.mark.parametrize("mask_diagonal", [True, False])
def test_distillation_is_finite_at_extreme_temperature(mask_diagonal):
    student, teacher = unit_rows(16, 4, seed=6), unit_rows(16, 8, seed=7)
    for dtype in (torch.float32, DTYPE):
        leaf = student.to(dtype).requires_grad_(True)
        loss = distillation_loss(leaf, teacher.to(dtype), temperature=0.001, mask_diagonal=mask_diagonal)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    expected = reference_distillation(student, teacher, 0.001, mask_diagonal, "forward")
    torch.testing.assert_close(distillation_loss(student, teacher, 0.001, mask_diagonal), expected, rtol=1e-10, atol=0)


def test_distillation_gradcheck():
    student = unit_rows(5, 3, seed=8).requires_grad_(True)
    teacher = unit_rows(5, 6, seed=9)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, temperature=0.3), (student,))


def test_distillation_upcasts_half_precision():
    student, teacher = unit_rows(6, 4, seed=10).bfloat16(), unit_rows(6, 8, seed=11).half()
    loss = distillation_loss(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(student.float(), teacher.float()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student": unit_rows(4, 3, 0), "teacher": unit_rows(5, 3, 1)}, "4 student rows and 5 teacher rows"),
        ({"student": unit_rows(1, 3, 0), "teacher": unit_rows(1, 3, 1)}, "at least 2 rows"),
        ({"student": unit_rows(0, 3, 0), "teacher": unit_rows(0, 3, 1), "mask_diagonal": False}, "at least 1 row"),
        ({"student": unit_rows(4, 3, 0)[0], "teacher": unit_rows(4, 3, 1)}, "student must have shape"),
        ({"student": unit_rows(4, 3, 0), "teacher": unit_rows(4, 3, 1), "direction": "both"}, "direction"),
        ({"student": unit_rows(4, 3, 0), "teacher": unit_rows(4, 3, 1), "temperature": 0.0}, "temperature"),
        ({"student": unit_rows(4, 3, 0), "teacher": unit_rows(4, 3, 1), "temperature": -1.0}, "temperature"),
    ],
)
def test_distillation_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(**kwargs)


def test_distillation_rejects_wrong_types():
    with pytest.raises(TypeError, match="student"):
        distillation_loss([[1.0, 0.0]], unit_rows(1, 2, 0))
    with pytest.raises(TypeError, match="teacher"):
        distillation_loss(unit_rows(2, 2, 0), torch.ones(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- hard-negative InfoNCE


HARD_NEGATIVE_SETTINGS = [
    # (batch, dim, k, margin, temperature, noise): low dims give many close pairs, so the filter
    # bites; `noise` moves targets away from their queries (larger: weaker positives, more filtered)
    (16, 4, 8, 0.1, 0.02, 0.6),
    (16, 4, 8, 0.0, 0.05, 2.0),
    (16, 4, 8, -0.3, 0.05, 2.0),  # heavy filtering: rows short of k and rows without negatives
    (12, 3, 3, 0.1, 0.1, 1.0),
    (6, 4, 8, 0.1, 0.1, 0.6),  # k > B - 1: every row repeats
    (9, 4, 1, 0.2, 0.1, 1.0),
    (16, 4, None, 0.1, 0.05, 2.0),  # plain in-batch InfoNCE over valid negatives
    (16, 4, None, None, 0.05, 0.6),
    (16, 4, 4, None, 0.05, 0.6),  # filter off
    (2, 3, 8, None, 0.1, 0.6),
    (1, 3, 8, 0.1, 0.1, 0.6),  # no candidate at all
]


def noisy_pairs(batch: int, dim: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    query = unit_rows(batch, dim, seed=batch + dim)
    return query, F.normalize(query + noise * unit_rows(batch, dim, seed=100 + batch), dim=-1)


@pytest.mark.parametrize(("batch", "dim", "k", "margin", "temperature", "noise"), HARD_NEGATIVE_SETTINGS)
def test_hard_negative_loss_matches_loop_reference(batch, dim, k, margin, temperature, noise):
    assert_same_loss_and_grads(
        lambda q, t: hard_negative_infonce_loss(q, t, temperature, k, margin),
        lambda q, t: reference_hard_negative_loss(q, t, temperature, k, margin),
        *noisy_pairs(batch, dim, noise),
    )  # fmt: skip


def test_heavy_filtering_setting_covers_short_and_empty_rows():
    _, stats = hard_negative_infonce_loss(*noisy_pairs(16, 4, 2.0), 0.05, 8, -0.3)
    assert stats.rows_short_of_k > 0 and stats.rows_without_negatives > 0, stats


def test_repetition_differs_from_using_fewer_negatives():
    # Paper rule: a short row repeats its valid negatives to k slots, which weighs them k / n times.
    query, target = matrix_as_embeddings([[0.5, 0.25, 0.0], [0.0, 0.5, 0.25], [0.25, 0.0, 0.5]])
    loss, _ = hard_negative_infonce_loss(
        query, target, temperature=0.5, num_hard_negatives=4, false_negative_margin=None
    )
    repeated = -math.log(math.exp(1.0) / (math.exp(1.0) + 2 * math.exp(0.5) + 2 * math.exp(0.0)))
    fewer = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.5) + math.exp(0.0)))
    assert loss.item() == pytest.approx(repeated, rel=1e-12)  # every row: 2 valid negatives, each twice
    assert loss.item() != pytest.approx(fewer, rel=1e-3)


HAND_BUILT = [
    # row 0: threshold 0.75; 0.875 filtered, 0.75 kept (not strictly above); negatives [0.75, 0.25]
    [0.5, 0.875, 0.75, 0.25],
    # row 1: threshold 0.75; columns 2, 3 filtered; one valid negative repeated: [0.5, 0.5]
    [0.5, 0.5, 1.0, 1.0],
    # row 2: threshold 0.25; everything filtered; logits [S_22] only
    [1.0, 1.0, 0.0, 0.5],
    # row 3: threshold 0.75; nothing filtered; top 2 of [0.25, -0.25, 0.5]: [0.5, 0.25]
    [0.25, -0.25, 0.5, 0.5],
]


def test_hand_built_example_loss_and_stats():
    query, target = matrix_as_embeddings(HAND_BUILT)
    loss, stats = hard_negative_infonce_loss(
        query, target, temperature=0.5, num_hard_negatives=2, false_negative_margin=0.25
    )

    def row_loss(positive, negatives):
        logits = [positive / 0.5] + [value / 0.5 for value in negatives]
        return -(logits[0] - math.log(sum(math.exp(value) for value in logits)))

    expected = (row_loss(0.5, [0.75, 0.25]) + row_loss(0.5, [0.5, 0.5]) + 0.0 + row_loss(0.5, [0.5, 0.25])) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats == HardNegativeStats(
        mean_positive_similarity=0.375,
        mean_hard_negative_similarity=2.75 / 6,
        false_negative_fraction=6 / 12,
        rows_with_false_negatives_fraction=0.75,
        rows_short_of_k=1,
        rows_without_negatives=1,
    )


def test_stats_without_k_and_without_filter():
    query, target = matrix_as_embeddings(HAND_BUILT)
    _, stats = hard_negative_infonce_loss(
        query, target, temperature=0.5, num_hard_negatives=None, false_negative_margin=0.25
    )
    assert stats.mean_hard_negative_similarity == pytest.approx((0.75 + 0.25 + 0.5 + 0.25 - 0.25 + 0.5) / 6)
    assert (stats.rows_short_of_k, stats.rows_without_negatives) == (0, 1)
    _, stats = hard_negative_infonce_loss(
        query, target, temperature=0.5, num_hard_negatives=None, false_negative_margin=None
    )
    assert stats.false_negative_fraction == 0.0 and stats.rows_with_false_negatives_fraction == 0.0
    assert stats.mean_hard_negative_similarity == pytest.approx((sum(map(sum, HAND_BUILT)) - 1.5) / 12)


def test_stats_for_single_row_batch_and_to_dict():
    loss, stats = hard_negative_infonce_loss(unit_rows(1, 3, 0), unit_rows(1, 3, 1))
    assert loss.item() == 0.0
    assert math.isnan(stats.mean_hard_negative_similarity) and math.isnan(stats.false_negative_fraction)
    assert stats.rows_without_negatives == 1
    logged = stats.to_dict(prefix="train/")
    assert logged["train/rows_without_negatives"] == 1 and len(logged) == 6
    assert all(isinstance(value, (int, float)) for value in logged.values())


def test_ties_select_an_equally_similar_set():
    # Duplicate targets (the same class label twice in a batch) make exact ties among negatives;
    # which tied index top-k returns is unspecified, the selected similarity values are not.
    base = unit_rows(3, 4, seed=30)
    target = base[[0, 0, 1, 1, 2, 2, 0]]
    query = F.normalize(target + 0.3 * unit_rows(7, 4, seed=31), dim=-1)
    for k, margin in [(1, 0.1), (2, 0.1), (3, None), (5, 0.1), (8, None)]:
        loss, _ = hard_negative_infonce_loss(query, target, 0.05, k, margin)
        expected = reference_hard_negative_loss(query, target, 0.05, k, margin)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_duplicates_of_the_positive_are_kept_as_negatives():
    # REFERENCE §7.1 pitfall 3: S_ij == S_ii is not above S_ii + 0, so an exact duplicate of the
    # positive is not filtered and becomes the hardest negative. Exact binary fractions, no rounding.
    query, target = matrix_as_embeddings([[0.5, 0.5, 0.25, 0.5], [0.0, 0.5, 0.5, -0.5], [0.25] * 4, [0.5] * 4])
    loss, stats = hard_negative_infonce_loss(
        query, target, temperature=0.25, num_hard_negatives=2, false_negative_margin=0.0
    )
    row0 = -math.log(1.0 / 3.0)  # [0.5, 0.5, 0.5]
    row1 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(2.0) + math.exp(0.0)))  # [0.5, 0.5, 0]
    assert loss.item() == pytest.approx((row0 + row1 + 2 * row0) / 4, rel=1e-12)
    assert stats.false_negative_fraction == 0.0


def test_positive_and_filtered_entries_are_never_negatives():
    # The reference code's top-k returns -inf entries (the positive, filtered columns) for short rows;
    # here a row with one valid negative of similarity -1 must see exactly that negative k times.
    query, target = matrix_as_embeddings([[0.0, 0.5, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, stats = hard_negative_infonce_loss(
        query, target, temperature=1.0, num_hard_negatives=3, false_negative_margin=0.1
    )
    row0 = -math.log(1.0 / (1.0 + 3 * math.exp(-1.0)))
    rows12 = -math.log(1.0 / 4.0)  # two valid zero-similarity negatives: [0, 0, 0]
    assert loss.item() == pytest.approx((row0 + 2 * rows12) / 3, rel=1e-12)
    assert stats.rows_short_of_k == 3


def test_hard_negative_loss_is_vectorised_for_large_batches():
    query, target = unit_rows(1024, 16, seed=40), unit_rows(1024, 16, seed=41)
    loss, stats = hard_negative_infonce_loss(query.float(), target.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert stats.rows_short_of_k + stats.rows_without_negatives < 1024


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target": unit_rows(5, 3, 1)}, ValueError, "same B and d"),
        ({"target": unit_rows(4, 2, 1)}, ValueError, "same B and d"),
        ({"query": unit_rows(0, 3, 0), "target": unit_rows(0, 3, 1)}, ValueError, "empty batch"),
        ({"query": unit_rows(4, 3, 0)[None]}, ValueError, "query must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"num_hard_negatives": 0}, ValueError, "num_hard_negatives"),
        ({"num_hard_negatives": 2.5}, TypeError, "num_hard_negatives"),
        ({"false_negative_margin": float("inf")}, ValueError, "false_negative_margin"),
        ({"false_negative_margin": "0.1"}, TypeError, "false_negative_margin"),
        ({"query": torch.ones(4, 3, dtype=torch.long)}, TypeError, "query"),
    ],
)
def test_hard_negative_loss_rejects_bad_inputs(kwargs, error, message):
    arguments = {"query": unit_rows(4, 3, 0), "target": unit_rows(4, 3, 1), **kwargs}
    with pytest.raises(error, match=message):
        hard_negative_infonce_loss(**arguments)
