"""Reading training tables: files (JSONL, JSON, CSV, parquet), `save_to_disk` folders and in-memory
`datasets` objects, and picking/checking their text columns. Shared by the stage-1 data, the
teacher-cache builder and the MMEB-format stage-2 data."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import datasets

# `datasets.load_dataset` builder for each supported file extension.
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Stage-1 text layouts, most specific first: SimCSE NLI triplets (the paper's data, REFERENCE.md
# §2), SimCSE-style pairs, or one plain sentence column.
STAGE1_COLUMN_SETS: tuple[tuple[str, ...], ...] = (
    ("sent0", "sent1", "hard_neg"),
    ("sent0", "sent1"),
    ("text",),
)




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
        # datasets says only "An error occurred while generating the dataset"; the cause says where
        # (pyarrow counts rows from 0 in blocks, not lines), so a JSON file is read again to name the line.
        where = _json_problem(path) if _FILE_BUILDERS[extension] == "json" else None
        if where is not None:
            raise ValueError(f"{path!r}, line {where[0]}: {where[1]}") from error
        raise ValueError(f"cannot read {path!r} as a {extension} table: {error.__cause__ or error}") from error


def _json_problem(path: str) -> tuple[int, str] | None:
    """`(line number, what is wrong)` for the first bad line of a JSON-lines file (or the JSON error of
    a file holding one JSON array); None if every line is a JSON object. Blank lines are skipped,
    as `datasets` skips them."""
    with open(path, "rb") as handle:
        first = handle.read(4096).lstrip()
    if first.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except json.JSONDecodeError as error:
            return error.lineno, f"not valid JSON ({error.msg} at column {error.colno})"
        except UnicodeDecodeError as error:
            return 1, f"not UTF-8 text ({error.reason} at byte {error.start})"
        return None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, f"not UTF-8 text ({error.reason} at byte {error.start} of the line)"
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                return number, f"not valid JSON ({error.msg} at column {error.colno}); expected one JSON object per line"
            if not isinstance(value, dict):
                return number, f"holds a JSON {type(value).__name__}, expected one JSON object per line"
    return None


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
