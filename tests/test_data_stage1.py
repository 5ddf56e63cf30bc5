"""Stage-1 data side of `training/data.py`: table loading, text columns, teacher join, collator."""

import json

import datasets
import pytest
import torch

from training.data import (
    STAGE1_COLUMN_SETS,
    DistillationCollator,
    load_distillation_dataset,
    load_table,
    resolve_text_columns,
    teacher_column,
)
from training.teacher import build_teacher_cache, load_teacher_cache

ROWS = {
    "sent0": [f"a man plays guitar number {i}" for i in range(8)],
    "sent1": [f"someone is making music, take {i}" for i in range(8)],
    "hard_neg": [f"nobody is playing anything {i}" for i in range(8)],
    "label": list(range(8)),
}


def char_teacher(texts):
    """Deterministic stand-in teacher: letter counts a..z plus the length, `[n, 27]`."""
    rows = [[text.count(chr(97 + k)) for k in range(26)] + [len(text)] for text in texts]
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture
def triplets():
    return datasets.Dataset.from_dict(ROWS)


def write_files(directory):
    """The ROWS table as jsonl, json (array), csv and parquet files."""
    records = [dict(zip(ROWS, values)) for values in zip(*ROWS.values())]
    paths = {suffix: directory / f"nli.{suffix}" for suffix in ("jsonl", "json", "csv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"].write_text(json.dumps(records))
    table = datasets.Dataset.from_dict(ROWS)
    table.to_csv(str(paths["csv"]), index=False)
    table.to_parquet(str(paths["parquet"]))
    return paths


# --- load_table --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_load_table_reads_files(tmp_path, suffix):
    path = write_files(tmp_path)[suffix]
    table = load_table(path, cache_dir=str(tmp_path / "cache"))
    assert isinstance(table, datasets.Dataset)
    assert table.to_dict() == ROWS


def test_load_table_reads_saved_dataset_and_dataset_dict(tmp_path, triplets):
    triplets.save_to_disk(str(tmp_path / "single"))
    assert load_table(tmp_path / "single").to_dict() == ROWS
    small = triplets.select(range(3))
    datasets.DatasetDict(train=triplets, test=small).save_to_disk(str(tmp_path / "dict"))
    assert load_table(str(tmp_path / "dict"), split="test").to_dict() == small.to_dict()
    with pytest.raises(ValueError, match=r"split 'dev' not found.*\['test', 'train'\]"):
        load_table(str(tmp_path / "dict"), split="dev")


def test_load_table_passes_datasets_through(triplets):
    assert load_table(triplets) is triplets
    assert load_table(datasets.DatasetDict(train=triplets)) is triplets


def test_load_table_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_table(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown extension '\.txt'"):
        load_table(tmp_path / "notes.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not one written by Dataset.save_to_disk"):
        load_table(tmp_path / "empty_dir")
    with pytest.raises(TypeError, match="got list"):
        load_table(["a", "b"])


# --- resolve_text_columns ----------------------------------------------------------------------


def test_resolve_text_columns_picks_the_known_layouts(triplets):
    assert STAGE1_COLUMN_SETS[0] == ("sent0", "sent1", "hard_neg")
    assert resolve_text_columns(triplets) == ["sent0", "sent1", "hard_neg"]
    assert resolve_text_columns(triplets.remove_columns("hard_neg")) == ["sent0", "sent1"]
    plain = datasets.Dataset.from_dict({"text": ["one", "two"], "id": [1, 2]})
    assert resolve_text_columns(plain) == ["text"]
    assert resolve_text_columns(triplets, ["hard_neg", "sent0"]) == ["hard_neg", "sent0"]


def test_resolve_text_columns_errors(triplets):
    with pytest.raises(ValueError, match=r"column 'sentence' not found.*'sent0', 'sent1'"):
        resolve_text_columns(triplets, ["sent0", "sentence"])
    with pytest.raises(ValueError, match=r"no stage-1 text columns.*\['anchor', 'id'\]"):
        resolve_text_columns(datasets.Dataset.from_dict({"anchor": ["x"], "id": [0]}))
    with pytest.raises(ValueError, match="duplicate"):
        resolve_text_columns(triplets, ["sent0", "sent0"])
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_text_columns(triplets, "sent0")


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_resolve_text_columns_names_the_bad_row(triplets, bad):
    sent1 = list(ROWS["sent1"])
    sent1[5] = bad
    table = triplets.remove_columns("sent1").add_column("sent1", sent1)
    with pytest.raises(ValueError, match=r"row 5, column 'sent1': expected a non-empty string"):
        resolve_text_columns(table)


# --- load_distillation_dataset -----------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, triplets):
    path = tmp_path / "teacher.safetensors"
    build_teacher_cache(triplets, None, char_teacher, path, show_progress_bar=False)
    return path


def test_distillation_dataset_joins_teacher_rows(triplets, cache):
    table = load_distillation_dataset(triplets, cache)
    expected_columns = ["sent0", "sent1", "hard_neg"]
    assert table.column_names == expected_columns + [teacher_column(c) for c in expected_columns]
    assert len(table) == len(triplets)
    everything = table[:]
    for column in expected_columns:
        # Independent: embed the column's texts directly and L2-normalise.
        expected = torch.nn.functional.normalize(char_teacher(ROWS[column]), dim=-1)
        stored = everything[teacher_column(column)]
        assert stored.dtype == torch.float32 and stored.shape == (8, 27)
        torch.testing.assert_close(stored, expected, rtol=0, atol=1e-6)
        assert everything[column] == ROWS[column]
    row = table[3]
    assert row["sent1"] == ROWS["sent1"][3]
    torch.testing.assert_close(row["teacher_sent1"], load_teacher_cache(cache)["sent1"][3])


def test_distillation_dataset_from_a_path_and_a_column_subset(tmp_path, triplets, cache):
    triplets.save_to_disk(str(tmp_path / "saved"))  # a path; no datasets cache written
    table = load_distillation_dataset(tmp_path / "saved", cache, columns=["sent1", "sent0"])
    assert table.column_names == ["sent1", "sent0", "teacher_sent1", "teacher_sent0"]
    torch.testing.assert_close(table[:]["teacher_sent0"], load_teacher_cache(cache)["sent0"])


def test_distillation_dataset_refuses_a_cache_of_another_length(triplets, cache):
    with pytest.raises(ValueError, match=r"num_rows: cache has 8, expected 7"):
        load_distillation_dataset(triplets.select(range(7)), cache)


def test_distillation_dataset_refuses_changed_or_reordered_texts(triplets, cache):
    changed = list(ROWS["hard_neg"])
    changed[2] = "a different sentence"
    edited = triplets.remove_columns("hard_neg").add_column("hard_neg", changed)
    with pytest.raises(ValueError, match=r"texts of column 'hard_neg' differ"):
        load_distillation_dataset(edited, cache)
    with pytest.raises(ValueError, match=r"texts of column 'sent0' differ"):
        load_distillation_dataset(triplets.shuffle(seed=0), cache)


def test_distillation_dataset_refuses_missing_columns(triplets, cache):
    with pytest.raises(ValueError, match=r"column 'hard_neg' not found"):
        load_distillation_dataset(triplets.remove_columns("hard_neg"), cache, ["sent0", "hard_neg"])
    pairs_cache = cache.parent / "pairs.safetensors"
    build_teacher_cache(triplets, ["sent0", "sent1"], char_teacher, pairs_cache,
                        show_progress_bar=False)
    with pytest.raises(ValueError, match=r"columns \['hard_neg'\] are not in teacher cache"):
        load_distillation_dataset(triplets, pairs_cache)


def test_shuffled_dataset_with_its_own_cache_stays_aligned(tmp_path, triplets):
    shuffled = triplets.shuffle(seed=1)
    path = tmp_path / "shuffled.safetensors"
    build_teacher_cache(shuffled, None, char_teacher, path, show_progress_bar=False)
    table = load_distillation_dataset(shuffled, path)
    for row in range(len(table)):
        expected = torch.nn.functional.normalize(char_teacher([table[row]["sent0"]]), dim=-1)[0]
        torch.testing.assert_close(table[row]["teacher_sent0"], expected, rtol=0, atol=1e-6)


# --- DistillationCollator ----------------------------------------------------------------------


def test_collator_flattens_rows_and_aligns_teacher_rows(triplets, cache):
    table = load_distillation_dataset(triplets, cache)
    rows = [table[i] for i in (4, 0, 6)]
    batch = DistillationCollator()(rows)
    columns = ["sent0", "sent1", "hard_neg"]
    assert batch["texts"] == [ROWS[c][i] for i in (4, 0, 6) for c in columns]  # row-major
    cached = load_teacher_cache(cache)
    expected = torch.stack([cached[c][i] for i in (4, 0, 6) for c in columns])
    assert batch["teacher_embeddings"].dtype == torch.float32
    torch.testing.assert_close(batch["teacher_embeddings"], expected, rtol=0, atol=0)
    # Each text's teacher row is the teacher's embedding of that very text.
    direct = torch.nn.functional.normalize(char_teacher(batch["texts"]), dim=-1)
    torch.testing.assert_close(batch["teacher_embeddings"], direct, rtol=0, atol=1e-6)


def test_collator_accepts_plain_lists_and_explicit_column_order():
    rows = [
        {"sent0": "a", "sent1": "b", "teacher_sent0": [1.0, 0.0], "teacher_sent1": [0.0, 1.0]},
        {"sent0": "c", "sent1": "d", "teacher_sent0": [0.6, 0.8], "teacher_sent1": [0.8, 0.6]},
    ]
    batch = DistillationCollator(columns=["sent1", "sent0"])(rows)
    assert batch["texts"] == ["b", "a", "d", "c"]
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    torch.testing.assert_close(batch["teacher_embeddings"], expected, rtol=0, atol=0)


def test_collator_errors():
    collator = DistillationCollator()
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="no text column with a teacher_<column> partner"):
        collator([{"sent0": "a"}])
    rows = [{"sent0": "a", "teacher_sent0": [1.0]}, {"sent0": "b"}]
    with pytest.raises(ValueError, match=r"batch row 1 lacks 'sent0' or 'teacher_sent0'"):
        collator(rows)
    rows = [{"sent0": "a", "teacher_sent0": [1.0]}, {"sent0": "b", "teacher_sent0": [1.0, 0.0]}]
    with pytest.raises(ValueError, match="one size"):
        collator(rows)
