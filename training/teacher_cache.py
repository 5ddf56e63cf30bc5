"""The stage-1 teacher-embedding cache: one safetensors file with one `[num_rows, D]` float32 tensor
per text column, and metadata (per-column sha256 of the texts, teacher, pooling, prefix, ...) so that
a cache built for other texts or another teacher is refused instead of silently misaligned.
`training.teacher.build_teacher_cache` writes it; the stage-1 data loader reads it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modeling_unime.atomic import make_readable

from .tables import column_texts, load_table, resolve_text_columns

CACHE_FORMAT = "unime-teacher-cache/1"


def text_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of `texts` in order; each text is length-prefixed so `["ab", "c"] != ["a", "bc"]`."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def read_cache_metadata(path: str | os.PathLike) -> dict:
    """Metadata of a teacher cache: teacher, pooling, query_prefix, max_length, num_rows,
    dimension, columns (list) and fingerprints (column -> sha256)."""
    if not os.path.isfile(path):
        raise ValueError(f"teacher cache {os.fspath(path)!r} does not exist")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file: {error}") from None
    if raw.get("format") != CACHE_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a teacher cache (format {raw.get('format')})")
    where = f"teacher cache {os.fspath(path)!r}, metadata field"
    missing = [key for key in _METADATA_CHECKS if key not in raw]
    if missing:
        raise ValueError(f"teacher cache {os.fspath(path)!r}: metadata fields {missing} are missing; rebuild the cache")
    metadata = {}
    for key, (decode, valid, expected) in _METADATA_CHECKS.items():
        try:
            value = decode(raw[key])
        except ValueError:  # json.JSONDecodeError is a ValueError
            value = None
            valid = _never
        if not valid(value):
            raise ValueError(f"{where} {key!r} is {raw[key]!r}, expected {expected}; rebuild the cache")
        metadata[key] = value
    if sorted(metadata["fingerprints"]) != sorted(metadata["columns"]):
        raise ValueError(f"{where} 'fingerprints' lists columns {sorted(metadata['fingerprints'])}, 'columns' lists "
                         f"{sorted(metadata['columns'])}; rebuild the cache")
    return metadata


def _never(_):
    return False


def _is_count(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# Metadata field -> (decode the stored string, check the value, what was expected). Safetensors
# metadata holds strings only: numbers and lists are stored as JSON.
_METADATA_CHECKS = {
    "teacher": (str, bool, "a non-empty teacher name"),
    "pooling": (str, bool, "a non-empty pooling name"),
    "query_prefix": (str, lambda value: True, "a string"),
    "max_length": (json.loads, lambda value: _is_count(value, 1), "a positive int"),
    "num_rows": (json.loads, lambda value: _is_count(value, 1), "a positive int"),
    "dimension": (json.loads, lambda value: _is_count(value, 1), "a positive int"),
    "columns": (json.loads, lambda value: isinstance(value, list) and bool(value)
                and all(isinstance(c, str) and c for c in value), "a JSON list of column names"),
    "fingerprints": (json.loads, lambda value: isinstance(value, dict)
                     and all(isinstance(v, str) and len(v) == 64 for v in value.values()),
                     "a JSON object {column: sha256 hex}"),
}


def metadata_differences(stored: dict, expected: dict) -> list[str]:
    """What differs between a cache's metadata and the expected values (only keys in `expected`)."""
    differences = [
        f"{key}: cache has {stored[key]!r}, expected {value!r}"
        for key, value in expected.items()
        if key != "fingerprints" and stored[key] != value
    ]
    for column, fingerprint in expected.get("fingerprints", {}).items():
        if stored["fingerprints"].get(column, fingerprint) != fingerprint:
            differences.append(
                f"texts of column {column!r} differ from those the cache was built from "
                "(changed text or row order)"
            )
    return differences


def save_cache_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    # Write next to the target then rename: a crash or error never leaves a truncated cache that a
    # later run would trust.
    # The temporary name is fixed, so one left by a killed build is overwritten (one builder per cache).
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    try:
        save_file(tensors, temporary, metadata=metadata)
        make_readable(temporary)  # safetensors creates 0600 files
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_teacher_cache(
    path: str | os.PathLike, dataset=None, columns: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read a teacher cache: `{column: float32 Tensor [num_rows, D]}`.

    With `dataset`, every requested column must exist there with exactly the texts (same order) the
    cache was built from, so that row `i` of the cache belongs to row `i` of the dataset.

    Raises:
        ValueError: naming the column and the mismatch (not in the cache or the dataset, another
            number of rows, changed texts), or a stored tensor that disagrees with the metadata
            (shape, dtype) or holds NaN/Inf.
    """
    metadata = read_cache_metadata(path)
    columns = list(metadata["columns"]) if columns is None else list(columns)
    missing = [column for column in columns if column not in metadata["columns"]]
    if missing:
        raise ValueError(
            f"columns {missing} are not in teacher cache {os.fspath(path)!r}; "
            f"it has {metadata['columns']}"
        )
    if dataset is not None:
        dataset = load_table(dataset)
        resolve_text_columns(dataset, columns)
        fingerprints = {c: text_fingerprint(column_texts(dataset, c)) for c in columns}
        expected = {"num_rows": len(dataset), "fingerprints": fingerprints}
        differences = metadata_differences(metadata, expected)
        if differences:
            raise ValueError(
                f"teacher cache {os.fspath(path)!r} does not match the dataset: "
                f"{'; '.join(differences)}. Rebuild it with build_teacher_cache."
            )
    with safe_open(os.fspath(path), framework="pt") as handle:
        stored = set(handle.keys())
        tensors = {column: handle.get_tensor(column) for column in columns if column in stored}
    for column in columns:
        _check_cached_embeddings(path, column, tensors.get(column), metadata)
    return tensors


def _check_cached_embeddings(path, column: str, embeddings, metadata: dict) -> None:
    """A damaged or hand-edited cache must fail here, naming the column, not as a shape error in training."""
    expected = (metadata["num_rows"], metadata["dimension"])
    where = f"teacher cache {os.fspath(path)!r}, column {column!r}"
    if embeddings is None:
        raise ValueError(f"{where}: listed in the metadata but the file holds no such tensor; rebuild the cache")
    if tuple(embeddings.shape) != expected or not embeddings.is_floating_point():
        raise ValueError(
            f"{where}: holds a {embeddings.dtype} tensor of shape {tuple(embeddings.shape)}, expected floats of "
            f"shape [num_rows, dimension] = {list(expected)} as its metadata says; rebuild the cache"
        )
    not_finite = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten()
    if len(not_finite):
        raise ValueError(f"{where}: the embedding of row {not_finite[0].item()} is not finite (NaN/Inf); "
                         "rebuild the cache")
