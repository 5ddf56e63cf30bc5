"""MMEB-train pairs for stage 2 (DESIGN §4.2): loading, per-subset caps, validation, collation.

A record is one (query, positive target) pair in VLM2Vec's MMEB-train format:

    qry             query text, may contain `<|image_1|>` (MMEB's image placeholder)
    qry_image_path  query image, relative to an image root; "" = no image
    pos_text        target text, may contain `<|image_1|>`
    pos_image_path  target image; "" = no image
    neg_text, neg_image_path   optional; accepted and ignored (UniME mines its negatives in the batch)

Images are decoded lazily, in the collator, and resized to a fixed square (paper: 336x336), so a
dataset of 662k pairs costs nothing up front. `<|image_1|>` is rewritten to the backbone's image
token by `UniMEProcessor(prompt_style="instruction")`, not here.

Typical use::

    train = load_mmeb_train("TIGER-Lab/MMEB-train", subsets=["ImageNet_1K", "MSCOCO_i2t"],
                            split="original", num_sample_per_subset=50_000)
    collator = MMEBCollator(processor, image_root="MMEB-train", image_size=336)
    batch = collator([train[i] for i in range(8)])   # {"query": BatchFeature, "target": BatchFeature}
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from modeling_unime.batching import estimate_tokens
from modeling_unime.inputs import load_image
from modeling_unime.prompts import MMEB_IMAGE_PLACEHOLDER

from .checks import check_bool, check_int
from .tables import load_table

logger = logging.getLogger(__name__)

MMEB_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
SUBSET_COLUMN = "subset"
ROW_COLUMN = "subset_row"
_TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


# ---------------------------------------------------------------------------------------------
# Loading and mixing subsets
# ---------------------------------------------------------------------------------------------


def load_mmeb_train(
    dataset: str | os.PathLike | datasets.Dataset | Mapping[str, datasets.Dataset],
    subsets: Sequence[str] | None = None,
    split: str = "train",
    num_sample_per_subset: int | None = None,
    seed: int | None = 0,
    columns: Mapping[str, str] | None = None,
) -> datasets.Dataset:
    """Load MMEB-train subsets, cap each one, mix them into one table and validate every record.

    Args:
        dataset: where the pairs are:
            - a `datasets.Dataset` or a `.jsonl/.json/.csv/.parquet` file or `save_to_disk` folder
              (one table; with `subsets`, rows are picked by its `subset` column);
            - a mapping `{subset name: Dataset}`;
            - a folder with one table per subset: `<name>.jsonl` (or .json/.parquet/.csv), or the
              Hub layout `<name>/<split>-*.parquet` (a local snapshot of TIGER-Lab/MMEB-train);
            - a Hub id such as `"TIGER-Lab/MMEB-train"` (one config per subset; needs `subsets`).
        subsets: the subsets to mix, in order; None = all that the source has.
        split: the split to read (MMEB-train: `"original"` or `"diverse_instruction"`).
        num_sample_per_subset: cap per subset (VLM2Vec's `num_sample_per_subset`; 50_000 on the 20
            subsets gives the paper's 662k pairs). None keeps everything.
        seed: the capped rows are a seeded random sample, in their original order; None takes the
            first rows instead, as VLM2Vec does.
        columns: your own table's column names, `{MMEB field: column}`, e.g.
            `{"qry": "caption", "pos_image_path": "image_file"}` (a caption retrieving its image).
            Fields in `MMEB_FIELDS` + `neg_text`/`neg_image_path`; a field neither mapped nor in the
            table is empty (no text / no image on that side), and empty cells (`None`) become `""`.
            Negatives are accepted and not used (UniME mines its negatives in the batch).

    Returns:
        A `datasets.Dataset` with the four MMEB fields plus `subset` (name) and `subset_row` (the
        row's index in its subset table, for error messages).

    Raises:
        ValueError: a missing source, subset or column, or a record that cannot be a training pair
            (a `None` field, a side with neither text nor image, `<|image_1|>` without an image);
            the message names the subset and row.
    """
    if num_sample_per_subset is not None and (
        not isinstance(num_sample_per_subset, int) or num_sample_per_subset < 1
    ):
        raise ValueError(f"num_sample_per_subset must be a positive int or None, got {num_sample_per_subset!r}")
    tables = load_mmeb_subsets(dataset, subsets, split)
    if columns is not None:
        tables = {name: map_columns(table, columns, name) for name, table in tables.items()}
    mixed = mix_subsets(tables, num_sample_per_subset, seed)
    check_mmeb_records(mixed)
    return mixed


def load_mmeb_subsets(dataset, subsets=None, split="train") -> dict[str, datasets.Dataset]:
    """`{subset name: table}` from any source `load_mmeb_train` accepts (see there)."""
    if subsets is not None and (isinstance(subsets, str) or not subsets):
        raise ValueError(f"subsets must be a non-empty list of names or None, got {subsets!r}")
    if isinstance(dataset, Mapping):
        return _pick_subsets(dict(dataset), subsets, "the given mapping")
    if isinstance(dataset, datasets.Dataset):
        return _split_by_subset_column(dataset, subsets, "the given Dataset")
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a path, a Hub id, a Dataset or a mapping, got {type(dataset).__name__}")
    path = Path(dataset)
    if path.is_file() or (path.is_dir() and _is_saved_dataset(path)):
        return _split_by_subset_column(load_table(path, split=split), subsets, str(path),
                                       single_name=str(path) if path.is_file() else "train")
    if path.is_dir():
        files = _pick_subsets(_subset_files(path, split), subsets, str(path))
        return {name: _load_subset_file(file, split) for name, file in files.items()}
    if subsets is None:
        raise ValueError(f"{str(dataset)!r} is not a local path; to read it from the Hub, name its subsets")
    return {name: datasets.load_dataset(str(dataset), name, split=split) for name in subsets}


NEGATIVE_FIELDS = ("neg_text", "neg_image_path")


def map_columns(table: datasets.Dataset, columns: Mapping[str, str], name: str = "train") -> datasets.Dataset:
    """`table` with the MMEB fields taken from the columns `columns` names (`{MMEB field: column}`).

    Unmapped fields the table lacks become `""`; `None` cells of mapped columns become `""`.

    Raises:
        ValueError: an unknown field, or a column the table does not have (naming subset or file).
    """
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError(f"columns must be a non-empty {{MMEB field: column}} mapping, got {columns!r}")
    unknown = [field for field in columns if field not in (*MMEB_FIELDS, *NEGATIVE_FIELDS)]
    if unknown:
        raise ValueError(f"columns: unknown fields {unknown}; expected some of {list(MMEB_FIELDS + NEGATIVE_FIELDS)}")
    absent = [column for column in columns.values() if column not in table.column_names]
    if absent:
        raise ValueError(f"{describe_source(name)} has no columns {absent}; its columns are {table.column_names}")
    values = {field: ["" if value is None else value for value in table.with_format(None)[column][:]]
              for field, column in columns.items() if field in MMEB_FIELDS}
    for field in MMEB_FIELDS:
        if field not in values:
            values[field] = table.with_format(None)[field][:] if field in table.column_names else [""] * len(table)
    return datasets.Dataset.from_dict({field: values[field] for field in MMEB_FIELDS})


def describe_source(name: str) -> str:
    """`file 'pairs.jsonl'` for a table read from one file, else `subset 'name'`."""
    return f"file {name!r}" if Path(str(name)).suffix.lower() in _TABLE_EXTENSIONS else f"subset {name!r}"


def mix_subsets(tables: Mapping[str, datasets.Dataset], num_sample_per_subset=None, seed=0) -> datasets.Dataset:
    """Cap every subset at `num_sample_per_subset` rows and concatenate them (subset order kept).

    Adds `subset` and `subset_row` columns; keeps only the MMEB fields (so subsets with extra
    columns still concatenate).
    """
    parts = []
    for name, table in tables.items():
        _check_columns(table, name)
        rows = _sample_rows(len(table), num_sample_per_subset, seed, name)
        part = table.select_columns(list(MMEB_FIELDS))
        part = part.add_column(ROW_COLUMN, list(range(len(part)))).add_column(SUBSET_COLUMN, [name] * len(part))
        parts.append(part.select(rows) if len(rows) < len(table) else part)
    if not parts:
        raise ValueError("no MMEB subsets to mix")
    return datasets.concatenate_datasets(parts)


def _sample_rows(num_rows, cap, seed, name):
    if cap is None or cap >= num_rows:
        return np.arange(num_rows)
    if seed is None:
        return np.arange(cap)
    # Seeded per subset name, so adding or reordering other subsets does not change this sample.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(num_rows, size=cap, replace=False))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _subset_files(folder: Path, split: str) -> dict[str, Path]:
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in _TABLE_EXTENSIONS:
            name = entry.stem
        elif entry.is_dir() and sorted(entry.glob(f"{split}-*.parquet")):
            name = entry.name
        else:
            continue
        if name in found:  # e.g. A.jsonl and A.json: taking either one would silently drop the other
            raise ValueError(
                f"subset {name!r} has two tables in {str(folder)!r}: {found[name].name!r} and {entry.name!r}; "
                "keep one of them"
            )
        found[name] = entry
    if not found:
        raise ValueError(
            f"no subset tables in {str(folder)!r}: expected <subset>.jsonl/.json/.parquet/.csv files or "
            f"<subset>/{split}-*.parquet folders"
        )
    return found


def _load_subset_file(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir():
        files = [str(file) for file in sorted(path.glob(f"{split}-*.parquet"))]
        return datasets.load_dataset("parquet", data_files=files, split="train")
    return load_table(path)


def _pick_subsets(available: dict, subsets, source) -> dict:
    names = list(available) if subsets is None else list(subsets)
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"subsets {missing} not found in {source}; available: {sorted(available)}")
    return {name: available[name] for name in names}


def _split_by_subset_column(table: datasets.Dataset, subsets, source,
                            single_name="train") -> dict[str, datasets.Dataset]:
    if SUBSET_COLUMN not in table.column_names:
        if subsets is not None:
            raise ValueError(f"{source} has no {SUBSET_COLUMN!r} column to pick subsets {list(subsets)} from")
        return {single_name: table}
    labels = table.with_format(None)[SUBSET_COLUMN][:]
    names = list(dict.fromkeys(labels)) if subsets is None else list(subsets)
    missing = [name for name in names if name not in set(labels)]
    if missing:
        raise ValueError(f"subsets {missing} not found in the {SUBSET_COLUMN!r} column of {source}")
    table = table.remove_columns([SUBSET_COLUMN])
    return {name: table.select([i for i, label in enumerate(labels) if label == name]) for name in names}


# ---------------------------------------------------------------------------------------------
# Validation (before training)
# ---------------------------------------------------------------------------------------------


def _check_columns(table: datasets.Dataset, name: str) -> None:
    missing = [field for field in MMEB_FIELDS if field not in table.column_names]
    if missing:
        raise ValueError(
            f"{describe_source(name)} lacks MMEB-train fields {missing}; its columns are {table.column_names}. "
            "Name your columns with columns={field: column} (example scripts: --query_text_column and co.)"
        )


def describe_row(record: Mapping) -> str:
    """`subset 'X', row N` (or `file 'X', row N` for a single file) for error messages; row N (from 0)
    of the subset's own table."""
    return f"{describe_source(record.get(SUBSET_COLUMN))}, row {record.get(ROW_COLUMN)}"


def check_mmeb_records(table: datasets.Dataset) -> None:
    """Raise `ValueError` naming the first record that cannot become a (query, target) pair."""
    columns = {field: table.with_format(None)[field][:] for field in (*MMEB_FIELDS, SUBSET_COLUMN, ROW_COLUMN)}
    for index in range(len(table)):
        record = {field: values[index] for field, values in columns.items()}
        for field in MMEB_FIELDS:
            if not isinstance(record[field], str):
                raise ValueError(f"MMEB record ({describe_row(record)}): field {field!r} must be a string "
                                 f"('' for none), got {record[field]!r}")
        _check_side(record, "qry", "qry_image_path")
        _check_side(record, "pos_text", "pos_image_path")


def _check_side(record, text_field, image_field):
    text, image_path = record[text_field], record[image_field]
    if not text.strip() and not image_path:
        raise ValueError(f"MMEB record ({describe_row(record)}): {text_field!r} and {image_field!r} are both "
                         "empty; each side needs a text, an image or both")
    if MMEB_IMAGE_PLACEHOLDER in text and not image_path:
        raise ValueError(f"MMEB record ({describe_row(record)}): {text_field!r} contains {MMEB_IMAGE_PLACEHOLDER} "
                         f"but {image_field!r} is empty")


def missing_image_files(table: datasets.Dataset, image_root=None, limit=None) -> list[tuple[str, str]]:
    """`(row description, path)` of referenced image files that do not exist (a stat per file).

    A cheap pre-flight check; unreadable (corrupt) files are only found when decoded.
    """
    missing = []
    columns = {field: table.with_format(None)[field][:] for field in
               ("qry_image_path", "pos_image_path", SUBSET_COLUMN, ROW_COLUMN)}
    for index in range(len(table)):
        record = {field: values[index] for field, values in columns.items()}
        for field in ("qry_image_path", "pos_image_path"):
            if record[field] and not resolve_image_path(record[field], image_root).is_file():
                missing.append((describe_row(record), str(resolve_image_path(record[field], image_root))))
                if limit is not None and len(missing) >= limit:
                    return missing
    return missing


def resolve_image_path(path: str, image_root=None) -> Path:
    """`image_root / path` for relative paths (as VLM2Vec's `image_dir`); absolute paths unchanged."""
    path = Path(path)
    return path if path.is_absolute() or image_root is None else Path(image_root) / path


# ---------------------------------------------------------------------------------------------
# Collation: lazy image decoding, resizing, processor
# ---------------------------------------------------------------------------------------------


class BadImageError(ValueError):
    """An MMEB record's image is missing or unreadable (the message names the file and the row)."""


class MMEBCollator:
    """Rows of `load_mmeb_train` -> `{"query": BatchFeature, "target": BatchFeature}`.

    Images are opened here (lazily), converted to RGB and resized to `image_size x image_size`;
    texts go to the processor unchanged in instruction style, which rewrites `<|image_1|>` to the
    backbone's image token. An empty text on an image side makes an image-only item.

    Args:
        processor: the model's [`UniMEProcessor`].
        image_root: folder the record image paths are relative to.
        image_size (`int`, *optional*): square side images are resized to (paper: 336); None keeps
            the original size (the backbone's image processor still applies its own resizing).
        chunk_size (`int`, *optional*): for GradCache, process the batch in chunks of this many
            rows; `query` and `target` are then lists of BatchFeatures (one per chunk).
        max_tokens_per_chunk (`int`, *optional*): with `chunk_size`, also close a chunk before its
            padded language-model tokens (rows x longest row, image tokens included) exceed this, so
            one long item cannot blow a chunk's memory (a row longer than this is a chunk alone).
            Rows keep their order; query and target chunks are cut independently.
        skip_bad_images (`bool`): drop pairs whose image is missing or unreadable instead of
            raising; they are counted in `num_skipped` (this process's collator) and in the
            batch's `num_skipped` entry, which the trainer logs as `skipped_pairs`.
        max_length (`int`, *optional*): cut each text to this many tokens (image tokens not counted)
            before prompting. Cutting the text, not the token sequence, never splits an image's
            tokens and keeps the last token (the pooled one) a real end of text.

    Raises:
        BadImageError (a ValueError): a missing/unreadable image without `skip_bad_images`, naming
            the file and the record's subset and row; also when every pair of a batch was skipped.
    """

    def __init__(self, processor, image_root=None, image_size=336, chunk_size=None, skip_bad_images=False,
                 max_length=None, max_tokens_per_chunk=None):
        check_int("image_size", image_size, optional=True)
        check_int("chunk_size", chunk_size, optional=True)
        check_int("max_length", max_length, optional=True)
        check_int("max_tokens_per_chunk", max_tokens_per_chunk, optional=True)
        check_bool("skip_bad_images", skip_bad_images)
        if max_tokens_per_chunk is not None and chunk_size is None:
            raise ValueError("max_tokens_per_chunk needs chunk_size (it bounds GradCache chunks)")
        self.max_tokens_per_chunk = max_tokens_per_chunk
        self.processor = processor
        self.image_root = image_root
        self.image_size = image_size
        self.chunk_size = chunk_size
        self.skip_bad_images = skip_bad_images
        self.max_length = max_length
        self.num_skipped = 0

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        queries, targets, skipped = [], [], 0
        for row in rows:
            try:
                query = self._item(row, "qry", "qry_image_path")
                target = self._item(row, "pos_text", "pos_image_path")
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise
                skipped += 1
                self.num_skipped += 1
                logger.warning("skipping an MMEB pair (%s); %d skipped so far in this process", error, self.num_skipped)
                continue
            queries.append(query)
            targets.append(target)
        if not queries:
            raise BadImageError(f"all {len(rows)} pairs of this batch had a missing or unreadable image")
        return {"query": self._process(queries), "target": self._process(targets), "num_skipped": skipped}

    def _item(self, row, text_field, image_field):
        """`(text or None, RGB image or None)` for one side of a record."""
        text = row[text_field] if row[text_field].strip() else None
        image = None
        if row[image_field]:
            path = resolve_image_path(row[image_field], self.image_root)
            try:
                image = load_image(path, f"MMEB record ({describe_row(row)}), {image_field!r}")
            except (ValueError, TypeError) as error:
                raise BadImageError(str(error)) from error
            if self.image_size is not None and image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return text, image

    def _process(self, items):
        if self.chunk_size is None:
            return self._process_chunk(items)
        return [self._process_chunk(chunk) for chunk in self._chunks(items)]

    def _chunks(self, items):
        """Consecutive runs of at most `chunk_size` items and `max_tokens_per_chunk` padded tokens."""
        if self.max_tokens_per_chunk is None:
            return [items[start:start + self.chunk_size] for start in range(0, len(items), self.chunk_size)]
        entries = [(index, self._cut(text), image) for index, (text, image) in enumerate(items)]
        lengths = estimate_tokens(self.processor, entries, prompt_style="instruction")
        chunks, chunk, longest = [], [], 0
        for item, length in zip(items, lengths):
            padded = (len(chunk) + 1) * max(longest, length)
            if chunk and (len(chunk) == self.chunk_size or padded > self.max_tokens_per_chunk):
                chunks.append(chunk)
                chunk, longest = [], 0
            chunk.append(item)
            longest = max(longest, length)
        return chunks + [chunk]

    def _process_chunk(self, items):
        texts = [self._cut(text) for text, _ in items]
        images = [image for _, image in items]
        return self.processor(text=texts, images=images, prompt_style="instruction")

    def _cut(self, text):
        if text is None or self.max_length is None:
            return text
        tokenizer = self.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_length else tokenizer.decode(ids[: self.max_length])
