"""Datasets loading and collators for UniME training.

Stage 1 (textual discriminative knowledge distillation, DESIGN.md §4.1) trains on NLI sentences
whose teacher embeddings were computed offline by `training/teacher.py`. This module loads the
sentences, joins each text column with its cached teacher embeddings, and collates batches for the
distillation trainer. Tokenisation with the UniME processor happens in the trainer, not here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

# `datasets.load_dataset` builder for each supported file extension.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Stage-1 text layouts, most specific first: SimCSE NLI triplets (the paper's data, REFERENCE.md
# §2), SimCSE-style pairs, or one plain sentence column.
STAGE1_COLUMN_SETS: tuple[tuple[str, ...], ...] = (
    ("sent0", "sent1", "hard_neg"),
    ("sent0", "sent1"),
    ("text",),
)

TEACHER_COLUMN_PREFIX = "teacher_"


def teacher_column(text_column: str) -> str:
    """Column holding the teacher embeddings of `text_column` (e.g. `teacher_sent0`)."""
    return TEACHER_COLUMN_PREFIX + text_column


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def load_table(
    path_or_dataset: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load a training table as one `datasets.Dataset`.

    Args:
        path_or_dataset: a `datasets.Dataset` (returned as is), a `DatasetDict`, a directory written
            by `save_to_disk`, or a `.jsonl` / `.json` / `.csv` / `.parquet` file.
        split: the split to take from a `DatasetDict` (in memory or on disk). A single file always
            loads as one table.
        cache_dir: where `datasets` caches the Arrow copy of a file (its default cache when None).
    """
    if isinstance(path_or_dataset, datasets.Dataset):
        return path_or_dataset
    if isinstance(path_or_dataset, datasets.DatasetDict):
        return _pick_split(path_or_dataset, split)
    if not isinstance(path_or_dataset, (str, os.PathLike)):
        raise TypeError(
            "load_table expects a datasets.Dataset, a DatasetDict or a path, "
            f"got {type(path_or_dataset).__name__}"
        )
    path = os.fspath(path_or_dataset)
    if not os.path.exists(path):
        raise ValueError(f"data path {path!r} does not exist")
    if os.path.isdir(path):
        return _load_saved_dataset(path, split)
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FILE_BUILDERS:
        raise ValueError(
            f"cannot load {path!r}: unknown extension {extension!r}, "
            f"expected one of {sorted(_FILE_BUILDERS)} or a save_to_disk directory"
        )
    if os.path.getsize(path) == 0:  # datasets' json builder would leak a bare StopIteration
        raise ValueError(f"data file {path!r} is empty")
    try:
        return datasets.load_dataset(
            _FILE_BUILDERS[extension], data_files=path, split="train", cache_dir=cache_dir
        )
    except datasets.exceptions.DatasetGenerationError as error:
        # datasets says only "An error occurred while generating the dataset"; the cause says where.
        raise ValueError(f"cannot read {path!r} as a {extension} table: {error.__cause__ or error}") from error


def _load_saved_dataset(path: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise ValueError(
            f"{path!r} is a directory but not one written by Dataset.save_to_disk ({error})"
        ) from None
    return _pick_split(loaded, split) if isinstance(loaded, datasets.DatasetDict) else loaded


def _pick_split(dataset_dict: datasets.DatasetDict, split: str) -> datasets.Dataset:
    if split not in dataset_dict:
        raise ValueError(f"split {split!r} not found; available splits: {sorted(dataset_dict)}")
    return dataset_dict[split]


def column_texts(dataset: datasets.Dataset, column: str) -> list:
    """All values of `column` as a Python list, in row order (one Arrow read, no per-row loop)."""
    # `with_format(None)`: a torch/numpy-formatted table would hand back tensors or arrays.
    return dataset.with_format(None)[column][:]


def resolve_text_columns(
    dataset: datasets.Dataset, columns: Sequence[str] | None = None
) -> list[str]:
    """Pick (or check) the stage-1 text columns of `dataset` and check every text in them.

    With `columns=None` the first layout of `STAGE1_COLUMN_SETS` whose columns all exist is used
    (triplets before pairs before a plain `text` column). Every value must be a non-empty string:
    an empty text has no meaningful embedding and would silently poison the similarity matrices.

    Raises:
        ValueError: a requested column is missing (the message lists the available ones), no known
            layout matches, or a text is None / not a string / empty (naming its row and column).
    """
    available = list(dataset.column_names)
    if columns is None:
        columns = next((c for c in STAGE1_COLUMN_SETS if set(c) <= set(available)), None)
        if columns is None:
            raise ValueError(
                f"no stage-1 text columns found: expected one of {list(STAGE1_COLUMN_SETS)}, "
                f"available columns are {available}; pass columns=[...] explicitly"
            )
    elif isinstance(columns, str) or not columns:
        raise ValueError(f"columns must be a non-empty list of column names, got {columns!r}")
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns {columns} contain a duplicate")
    for column in columns:
        if column not in available:
            raise ValueError(f"column {column!r} not found; available columns are {available}")
        _check_texts(column_texts(dataset, column), column)
    return columns


def _check_texts(texts: list, column: str) -> None:
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"row {row}, column {column!r}: expected a non-empty string, got {text!r}"
            )


# ---------------------------------------------------------------------------------------------
# Stage 1: texts joined with their teacher embeddings
# ---------------------------------------------------------------------------------------------


def load_distillation_dataset(
    data: str | os.PathLike | datasets.Dataset,
    teacher_cache_path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """Stage-1 training table: the text columns plus one teacher-embedding column per text column.

    Row `i` of `teacher_<column>` is the cached teacher embedding of row `i` of `<column>`; the
    cache's per-column fingerprints prove the texts are the ones it was built from. Other columns
    are dropped. The result is formatted as torch, so `dataset[i]["teacher_sent0"]` is a float32
    tensor `[D]` and the texts stay strings. (A `Trainer` needs `remove_unused_columns=False` to
    pass these rows to `DistillationCollator` untouched.)

    Args:
        data: anything `load_table` accepts.
        teacher_cache_path: a safetensors file written by `training.teacher.build_teacher_cache`.
        columns: text columns to use (default: picked by `resolve_text_columns`).
        split: split to take when `data` holds several.

    Raises:
        ValueError: missing columns, bad texts, or a cache built for other texts / another length;
            all checked here, before any training starts.
    """
    # Imported here because training.teacher imports this module for table loading.
    from training.teacher import load_teacher_cache, read_cache_metadata

    dataset = load_table(data, split=split)
    columns = resolve_text_columns(dataset, columns)
    embeddings = load_teacher_cache(teacher_cache_path, dataset=dataset, columns=columns)
    teacher_table = pa.table(
        {teacher_column(column): _fixed_size_list(embeddings[column]) for column in columns}
    )
    # An explicit fingerprint (texts + teacher + settings): otherwise `datasets` hashes the whole
    # embedding table, which takes seconds at NLI scale.
    cache_metadata = read_cache_metadata(teacher_cache_path)
    fingerprint = datasets.fingerprint.Hasher.hash([cache_metadata, columns])
    teacher_dataset = datasets.Dataset(
        datasets.table.InMemoryTable(teacher_table), fingerprint=fingerprint
    )
    text_dataset = dataset.select_columns(columns)
    joined = datasets.concatenate_datasets([text_dataset, teacher_dataset], axis=1)
    return joined.with_format("torch")


def _fixed_size_list(embeddings: torch.Tensor) -> pa.FixedSizeListArray:
    """`[N, D]` float32 tensor -> Arrow column of N fixed-size lists (zero-copy from numpy)."""
    flat = np.ascontiguousarray(embeddings.numpy().reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), embeddings.shape[1])


class DistillationCollator:
    """Collate stage-1 rows into texts and their aligned teacher embeddings.

    Texts are flattened **row-major**: `[row0.sent0, row0.sent1, row0.hard_neg, row1.sent0, ...]`,
    so a batch of B rows with C text columns gives `B * C` texts and `teacher_embeddings[k]` is the
    teacher embedding of `texts[k]`. Every sentence of a pair is its own row of the similarity
    matrix, so each row's distribution contains its paraphrase (DESIGN.md §4.1).

    Args:
        columns: text columns to take from each row, in this order. Default: every column that has a
            `teacher_<column>` partner, in the row's column order.

    Returns (from `__call__`):
        `{"texts": list[str] of length B*C, "teacher_embeddings": float32 Tensor [B*C, D]}`.
    """

    def __init__(self, columns: Sequence[str] | None = None):
        self.columns = list(columns) if columns is not None else None

    def __call__(self, rows: Sequence[dict]) -> dict:
        if not rows:
            raise ValueError("DistillationCollator got an empty batch")
        columns = self.columns if self.columns is not None else self._infer_columns(rows[0])
        texts, teacher_rows = [], []
        for index, row in enumerate(rows):
            for column in columns:
                if column not in row or teacher_column(column) not in row:
                    raise ValueError(
                        f"batch row {index} lacks {column!r} or {teacher_column(column)!r}; "
                        f"it has {sorted(row)}"
                    )
                texts.append(row[column])
                embedding = torch.as_tensor(row[teacher_column(column)], dtype=torch.float32)
                teacher_rows.append(embedding)
        dims = {tuple(t.shape) for t in teacher_rows}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"teacher embeddings must all be 1-d of one size, got shapes {dims}")
        return {"texts": texts, "teacher_embeddings": torch.stack(teacher_rows)}

    @staticmethod
    def _infer_columns(row: dict) -> list[str]:
        columns = [name for name in row if teacher_column(name) in row]
        if not columns:
            raise ValueError(
                f"no text column with a {TEACHER_COLUMN_PREFIX}<column> partner "
                f"in row keys {sorted(row)}"
            )
        return columns
