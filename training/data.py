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

from .tables import STAGE1_COLUMN_SETS, column_texts, load_table, resolve_text_columns  # noqa: F401 (public here too)
from .teacher_cache import load_teacher_cache, read_cache_metadata

TEACHER_COLUMN_PREFIX = "teacher_"


def teacher_column(text_column: str) -> str:
    """Column holding the teacher embeddings of `text_column` (e.g. `teacher_sent0`)."""
    return TEACHER_COLUMN_PREFIX + text_column


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
