"""Counters and logged statistics over several batches and a multi-step run, not the first batch only.

`learning_rate=0` keeps the model fixed, so every step's statistics can be recomputed here from the
untouched model and the batch the sequential sampler gives that step. The expected values are
plain Python loops over the similarity matrix. Checked: skipped-pair counts per step, the
trainer's running total, the collator's count, and the FalseNeg% / similarity statistics, with a
log every step and with a log averaging several steps (and micro-batches under accumulation).
"""

import json
import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from training.distillation import DistillationConfig, UniMEDistillationTrainer
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.mmeb_data import MMEBCollator, load_mmeb_train
from training.demo.tiny_models import tiny_unime

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", save_merged_model=False, disable_tqdm=True,
              train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0, learning_rate=0.0,
              lr_scheduler_type="constant")
BATCH = 4
BAD_ROWS = {1: "missing", 9: "corrupt", 10: "missing"}  # batch 0 loses 1 pair, batch 1 none, batch 2 two
K, MARGIN, TAU = 2, 0.002, 0.05


def similarity_rows(a, b):
    a, b = a.double().tolist(), b.double().tolist()
    return [[sum(x * y for x, y in zip(row_a, row_b)) for row_b in b] for row_a in a]


def stats_loop(query, target, k, margin):
    """The HardNegativeStats fields of one batch, row by row (DESIGN.md §4.2, docs/api.md)."""
    s = similarity_rows(query, target)
    n = len(s)
    used, filtered, rows_filtered, short, empty = [], 0, 0, 0, 0
    for i, row in enumerate(s):
        valid = sorted((row[j] for j in range(n) if j != i and row[j] <= row[i] + margin), reverse=True)
        dropped = (n - 1) - len(valid)
        filtered += dropped
        rows_filtered += dropped > 0
        short += 0 < len(valid) < k
        empty += not valid
        used += [valid[slot % len(valid)] for slot in range(k)] if valid else []
    return {
        "mean_positive_similarity": sum(s[i][i] for i in range(n)) / n,
        "mean_hard_negative_similarity": sum(used) / len(used) if used else math.nan,
        "false_negative_fraction": filtered / (n * (n - 1)),
        "rows_with_false_negatives_fraction": rows_filtered / n,
        "rows_short_of_k": short,
        "rows_without_negatives": empty,
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """12 records; rows 1, 9, 10 point at a missing or a corrupt image."""
    root = tmp_path_factory.mktemp("counter_pairs")
    (root / "corrupt.png").write_bytes(b"not a png at all")
    rng = np.random.default_rng(5)
    records = []
    for index in range(12):
        image = Image.new("RGB", (56, 56), tuple(int(c) for c in rng.integers(0, 80, 3)))
        colour = tuple(int(c) for c in rng.integers(60, 256, 3))
        ImageDraw.Draw(image).rectangle([4 + index, 6, 30 + 2 * index, 50], fill=colour)
        image.save(root / f"{index}.png")
        path = {"missing": f"gone_{index}.png", "corrupt": "corrupt.png"}.get(BAD_ROWS.get(index), f"{index}.png")
        records.append({"qry": "<|image_1|> Represent the given image for classification.",
                        "qry_image_path": path, "pos_text": f"picture {index} of a shape", "pos_image_path": ""})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root, load_mmeb_train(root / "pairs.jsonl")


@pytest.fixture(scope="module")
def expected_per_batch(pairs):
    """Per batch of 4 rows: (pairs skipped, stats dict) computed from the untouched model."""
    root, train = pairs
    model, processor = tiny_unime("qwen2_vl")
    collator = MMEBCollator(processor, image_root=root, image_size=56, skip_bad_images=True)
    expected = []
    for start in range(0, len(train), BATCH):
        rows = [train[i] for i in range(start, start + BATCH)]
        good = [i for i in range(start, start + BATCH) if i not in BAD_ROWS]
        batch = collator(rows)
        assert batch["num_skipped"] == BATCH - len(good)
        assert batch["query"]["input_ids"].shape[0] == len(good)
        with torch.no_grad():
            query, target = model(**batch["query"]).embeddings, model(**batch["target"]).embeddings
        expected.append((BATCH - len(good), stats_loop(query, target, K, MARGIN)))
    assert collator.num_skipped == len(BAD_ROWS)
    assert any(stats["false_negative_fraction"] > 0 for _, stats in expected)  # the filter bites somewhere
    assert len({stats["false_negative_fraction"] for _, stats in expected}) > 1  # and differs between batches
    return expected


def run_stage2(pairs, tmp_path, logging_steps, chunk=None, accumulation=1, epochs=1):
    root, train = pairs
    model, processor = tiny_unime("qwen2_vl")
    collator = MMEBCollator(processor, image_root=root, image_size=56, skip_bad_images=True, chunk_size=chunk)
    args = HardNegativeConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, image_size=56,
                              num_train_epochs=epochs, logging_steps=logging_steps, contrastive_temperature=TAU,
                              num_hard_negatives=K, false_negative_margin=MARGIN, gradcache_chunk_size=chunk,
                              gradient_accumulation_steps=accumulation, **COMMON)
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor, train_dataset=train, data_collator=collator)
    trainer.train()
    return trainer, collator, [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_log_is_window_mean(log, window):
    """Each logged statistic is the mean of its per-batch values over the batches since the last log; the
    skipped pairs are their total over those batches."""
    assert log["skipped_pairs"] == sum(skipped for skipped, _ in window)
    for key in window[0][1]:
        values = [stats[key] for _, stats in window if stats[key] == stats[key]]  # NaN rows are not logged
        assert log[key] == pytest.approx(sum(values) / len(values), abs=2e-6), key


@pytest.mark.parametrize("chunk", [None, 3], ids=["plain", "gradcache3"])
def test_every_step_logs_its_own_batch_counts_and_stats(pairs, expected_per_batch, tmp_path, chunk):
    trainer, collator, logs = run_stage2(pairs, tmp_path, logging_steps=1, chunk=chunk, epochs=2)
    per_step = expected_per_batch * 2
    assert [log["step"] for log in logs] == list(range(1, 7))
    assert [log["skipped_pairs"] for log in logs] == [skipped for skipped, _ in per_step] == [1, 0, 2, 1, 0, 2]
    for log, expected in zip(logs, per_step):
        assert_log_is_window_mean(log, [expected])
    assert trainer.num_skipped_pairs == sum(log["skipped_pairs"] for log in logs) == 2 * len(BAD_ROWS)
    assert collator.num_skipped == 2 * len(BAD_ROWS)


def test_a_log_every_few_steps_averages_those_steps(pairs, expected_per_batch, tmp_path):
    trainer, _, logs = run_stage2(pairs, tmp_path, logging_steps=2, epochs=2)
    per_step = expected_per_batch * 2
    assert [log["step"] for log in logs] == [2, 4, 6]
    for index, log in enumerate(logs):
        assert_log_is_window_mean(log, per_step[2 * index:2 * index + 2])
    # Each log counts the pairs skipped in the batches it covers: together they are the trainer's total.
    assert [log["skipped_pairs"] for log in logs] == [1, 3, 2]
    assert sum(log["skipped_pairs"] for log in logs) == trainer.num_skipped_pairs == 6


def test_gradient_accumulation_logs_the_mean_over_micro_batches(pairs, expected_per_batch, tmp_path):
    trainer, _, logs = run_stage2(pairs, tmp_path, logging_steps=1, accumulation=3)
    assert [log["step"] for log in logs] == [1]
    assert_log_is_window_mean(logs[0], expected_per_batch)
    assert trainer.num_skipped_pairs == 3


# ----------------------------------------------------------------------------- stage 1


def test_stage1_similarity_stats_follow_every_batch(tmp_path):
    sentences = [f"sentence number {i} about {topic}" for i, topic in
                 enumerate(["dogs", "cats", "cars", "rain", "chess", "music", "bread", "ships", "snow", "tea",
                            "maps", "kites", "lamps"])]
    generator = torch.Generator().manual_seed(7)
    teacher = F.normalize(torch.randn(len(sentences), 8, generator=generator), dim=-1)
    rows = [{"text": text, "teacher_text": teacher[i].tolist()} for i, text in enumerate(sentences)]
    model, processor = tiny_unime("qwen2_vl")
    with torch.no_grad():
        student = model(**processor(text=sentences)).embeddings

    def batch_stats(start, size):
        s = similarity_rows(student[start:start + size], student[start:start + size])
        t = similarity_rows(teacher[start:start + size], teacher[start:start + size])
        pairs = [(i, j) for i in range(size) for j in range(size) if i != j]
        xs, ys = [s[i][j] for i, j in pairs], [t[i][j] for i, j in pairs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        pearson = cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
        return {"kd_similarity_pearson": pearson, "kd_student_mean_similarity": mx,
                "kd_teacher_mean_similarity": my, "kd_rows": size}

    # batches of 5 rows: 5, 5, 3 texts (the last one short); 2 epochs, a log every 2 steps -> windows
    # (b0, b1), (b2, b0) across the epoch boundary, (b1, b2)
    per_step = [batch_stats(0, 5), batch_stats(5, 5), batch_stats(10, 3)] * 2
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=5, logging_steps=2,
                              num_train_epochs=2, **COMMON)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor,
                                       train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [log["step"] for log in logs] == [2, 4, 6]
    assert [log["kd_rows"] for log in logs] == [5, 4, 4]
    for index, log in enumerate(logs):
        window = per_step[2 * index:2 * index + 2]
        for key in window[0]:
            # float32 similarities near 0.998 leave the Pearson correlation ~1e-5 off the float64 loop
            tolerance = 1e-4 if key == "kd_similarity_pearson" else 2e-6
            assert log[key] == pytest.approx(sum(w[key] for w in window) / len(window), abs=tolerance), key
