"""Embedding evaluation: MMEB Precision@1, image-text Recall@K, compositional accuracy (DESIGN §4.3).

Three layers, each testable alone:

1. metric functions on tensors (`precision_at_1`, `retrieval_recall`, `compositional_accuracy`);
2. task runners that take rows and an `encode_fn(items, prompt_style) -> Tensor[N, D]`
   (`evaluate_mmeb`, `evaluate_retrieval`, `evaluate_compositional`); `encoder_from_model` builds
   the `encode_fn` from a `UniMEModel` and its processor;
3. reporting: `write_results` (periodic evaluation inside a `Trainer`: `training.callbacks`).

Similarity is the dot product of the embeddings `encode_fn` returns; `UniMEModel.encode` returns
L2-normalised embeddings, so this is the cosine similarity the reference code uses.

Ties never reward a model: a ground truth that ties with a distractor is a miss, a retrieval
candidate that ties with the best positive ranks above it, a positive caption that ties with its
negative is wrong. A constant (collapsed) encoder therefore scores 0 everywhere instead of the
100% an `argmax` that prefers index 0 would give it. Two scores count as tied when they differ by
at most `TIE_TOLERANCE`, because the same embedding scores differently in the last bits depending
on where it falls in a matrix-multiply tile (measured: up to 2e-8 on CPU).
"""

import json
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from PIL import Image

from modeling_unime.atomic import atomic_write_text

EncodeFn = Callable[[list, str], torch.Tensor]
TIE_TOLERANCE = 1e-6
MMEB_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

# MMEB's 36 datasets by category; the last names of each tuple are out-of-distribution
# (REFERENCE.md §4.1, paper Table 9).
MMEB_CATEGORIES = {
    "Classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
                       "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
    "VQA": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
            "ScienceQA", "VizWiz", "GQA", "TextVQA"),
    "Retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                  "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
MMEB_OOD = frozenset({"Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
                      "ScienceQA", "VizWiz", "GQA", "TextVQA", "FashionIQ", "Wiki-SS-NQ", "OVEN",
                      "EDIS", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"})


# ---- Metrics on tensors ----------------------------------------------------------------------

def precision_at_1(scores, candidate_mask=None, tie_tolerance=TIE_TOLERANCE):
    """MMEB Precision@1: share of queries whose ground truth (column 0) beats every distractor.

    Args:
        scores: `[num_queries, num_candidates]` query-candidate similarities; column 0 is the
            ground truth.
        candidate_mask: optional `[num_queries, num_candidates]` bool, False for columns that do not
            compete (padding of ragged candidate lists, copies of the ground truth). Column 0 is
            ignored.
        tie_tolerance: a distractor within this of the ground truth counts as beating it.

    Returns:
        float in [0, 1]. A query with no competing distractor is a hit.
    """
    return ground_truth_wins(scores, candidate_mask, tie_tolerance).sum().item() / scores.shape[0]


def ground_truth_wins(scores, candidate_mask=None, tie_tolerance=TIE_TOLERANCE):
    """`[num_queries]` bool: Precision@1 hit per query (arguments as `precision_at_1`)."""
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [num_queries>0, num_candidates>0], got {tuple(scores.shape)}")
    distractors = scores[:, 1:]
    if candidate_mask is not None:
        if candidate_mask.shape != scores.shape:
            raise ValueError(f"candidate_mask shape {tuple(candidate_mask.shape)} != "
                             f"scores shape {tuple(scores.shape)}")
        distractors = distractors.masked_fill(~candidate_mask[:, 1:], -math.inf)
    # the extra -inf column lets max() run when no distractor competes
    padded = torch.cat([distractors, scores.new_full((scores.shape[0], 1), -math.inf)], dim=1)
    return scores[:, 0] > padded.max(dim=1).values + tie_tolerance


def pessimistic_rank(scores, positive, tie_tolerance=TIE_TOLERANCE):
    """Rank (0 = first) of each query's best positive, with ties counted against it.

    Args:
        scores: `[num_queries, num_candidates]` similarities.
        positive: `[num_queries, num_candidates]` bool, True for the query's correct candidates
            (at least one per row).

    Returns:
        `[num_queries]` long: the number of negatives scoring at least the best positive minus
        `tie_tolerance`. Positives never push each other down (any of them is a hit).
    """
    best_positive = scores.masked_fill(~positive, -math.inf).max(dim=1).values
    # "not below" rather than ">=": a NaN score then counts against the query instead of for it
    return (~(scores < best_positive[:, None] - tie_tolerance) & ~positive).sum(dim=1)


def retrieval_recall(text_emb, image_emb, text_to_image, ks=(1, 5, 10), tie_tolerance=TIE_TOLERANCE):
    """Text->image and image->text Recall@K with several captions per image (pessimistic ties).

    Args:
        text_emb: `[num_texts, dim]` caption embeddings.
        image_emb: `[num_images, dim]` image embeddings.
        text_to_image: `num_texts` ints, the image index each caption describes; every image needs
            at least one caption.
        ks: the cut-offs K.

    Returns:
        `{"t2i_R@K": ..., "i2t_R@K": ...}` for each K, fractions in [0, 1]. A caption query is a hit
        when its image is in the top K; an image query is a hit when any of its captions is.
    """
    num_texts, num_images = text_emb.shape[0], image_emb.shape[0]
    _check_retrieval_inputs(text_emb, image_emb, text_to_image, ks)
    scores = text_emb @ image_emb.T
    positive = torch.zeros(num_texts, num_images, dtype=torch.bool)
    positive[torch.arange(num_texts), torch.as_tensor(list(text_to_image), dtype=torch.long)] = True
    t2i_rank = pessimistic_rank(scores, positive, tie_tolerance)
    i2t_rank = pessimistic_rank(scores.T, positive.T, tie_tolerance)
    metrics = {f"t2i_R@{k}": (t2i_rank < k).sum().item() / num_texts for k in ks}
    metrics.update({f"i2t_R@{k}": (i2t_rank < k).sum().item() / num_images for k in ks})
    return metrics


def _check_retrieval_inputs(text_emb, image_emb, text_to_image, ks):
    if text_emb.dim() != 2 or image_emb.dim() != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"expected [T, D] and [I, D] embeddings, got {tuple(text_emb.shape)} "
                         f"and {tuple(image_emb.shape)}")
    if len(text_to_image) != text_emb.shape[0] or text_emb.shape[0] == 0:
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {text_emb.shape[0]} texts")
    for text_index, image_index in enumerate(text_to_image):
        if not isinstance(image_index, numbers.Integral) or not 0 <= image_index < image_emb.shape[0]:
            raise ValueError(f"text_to_image[{text_index}] = {image_index!r} is not an image index "
                             f"in [0, {image_emb.shape[0]})")
    uncaptioned = sorted(set(range(image_emb.shape[0])) - set(text_to_image))
    if uncaptioned:
        raise ValueError(f"images {uncaptioned[:10]} have no caption; image->text recall needs one per image")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")


def compositional_accuracy(image_emb, positive_emb, negative_emb, groups, tie_tolerance=TIE_TOLERANCE):
    """SugarCrepe-style accuracy: sample i is correct iff sim(img, pos) > sim(img, neg) strictly.

    Args:
        image_emb, positive_emb, negative_emb: `[num_samples, dim]`, row i of each is sample i.
        groups: `num_samples` group names (e.g. "replace", "swap", "add").

    Returns:
        `{group: accuracy, ..., "overall": accuracy over all samples}`.
    """
    if not image_emb.shape == positive_emb.shape == negative_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"embeddings must share one [N, D] shape, got {tuple(image_emb.shape)}, "
                         f"{tuple(positive_emb.shape)}, {tuple(negative_emb.shape)}")
    if len(groups) != image_emb.shape[0] or not groups:
        raise ValueError(f"got {len(groups)} groups for {image_emb.shape[0]} samples")
    if "overall" in groups:
        raise ValueError("'overall' is reserved for the all-samples accuracy; rename that group")
    correct = (image_emb * positive_emb).sum(-1) > (image_emb * negative_emb).sum(-1) + tie_tolerance
    by_group = defaultdict(list)
    for is_correct, group in zip(correct.tolist(), groups):
        by_group[group].append(is_correct)
    metrics = {group: sum(hits) / len(hits) for group, hits in sorted(by_group.items())}
    metrics["overall"] = correct.sum().item() / len(groups)
    return metrics


# ---- Encoding --------------------------------------------------------------------------------

def encoder_from_model(model, processor, batch_size=32, show_progress_bar=False):
    """Build an `encode_fn(items, prompt_style) -> Tensor[N, D]` from a `UniMEModel` and processor."""
    def encode_fn(items, prompt_style):
        return model.encode(items, processor=processor, batch_size=batch_size,
                            show_progress_bar=show_progress_bar, prompt_style=prompt_style)
    return encode_fn


def truncate_embeddings(embeddings, dim):
    """`[N, D]` -> `[N, dim]`: the first `dim` dimensions, L2-normalised again (a Matryoshka prefix)."""
    if not 1 <= dim <= embeddings.shape[-1]:
        raise ValueError(f"truncation dim must be in [1, {embeddings.shape[-1]}], got {dim}")
    return torch.nn.functional.normalize(embeddings[..., :dim].float(), dim=-1)


class ReplayEncoder:
    """An `encode_fn` that records every call's embeddings, so the same evaluation can be scored again
    at truncated dimensions without encoding anything twice.

    The task runners call `encode_fn` in a fixed order for fixed inputs; `at_dim(d)` returns an
    `encode_fn` that replays the recorded calls in that order, cut to d dims and re-normalised, and
    refuses a call that does not match the recording (different count or prompt style).
    """

    def __init__(self, encode_fn):
        self.encode_fn = encode_fn
        self.calls = []

    def __call__(self, items, prompt_style):
        embeddings = self.encode_fn(items, prompt_style)
        self.calls.append((len(items), prompt_style, embeddings))
        return embeddings

    @property
    def dim(self):
        """Width of the recorded embeddings (None before the first call)."""
        return self.calls[0][2].shape[-1] if self.calls else None

    def at_dim(self, dim):
        replay = iter(list(self.calls))

        def encode_fn(items, prompt_style):
            count, style, embeddings = next(replay, (None, None, None))
            if count != len(items) or style != prompt_style:
                raise RuntimeError("the truncated evaluation pass made calls the recorded pass did not")
            return truncate_embeddings(embeddings, dim)
        return encode_fn


def model_evaluation(runner, processor, batch_size=32, **runner_kwargs):
    """`(model) -> metrics` running `runner(encode_fn=..., **runner_kwargs)`; for `training.callbacks.EmbeddingEvalCallback`."""
    def evaluate(model):
        return runner(encode_fn=encoder_from_model(model, processor, batch_size), **runner_kwargs)
    return evaluate


def load_image(path, image_root=None, image_size=None):
    """Open `image_root / path` as RGB, resized to `image_size` (int or (width, height)) if given."""
    full_path = Path(image_root) / path if image_root is not None else Path(path)
    try:
        with Image.open(full_path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {str(full_path)!r}: {error}") from error
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def encode_unique(keys, make_item, encode_fn, prompt_style, chunk_size=256):
    """Embed each distinct key once, building items (and loading images) one chunk at a time.

    Returns:
        (`[num_unique, dim]` embeddings, `{key: row}`).
    """
    unique_keys = list(dict.fromkeys(keys))
    rows, chunks = {key: row for row, key in enumerate(unique_keys)}, []
    for start in range(0, len(unique_keys), chunk_size):
        items = [make_item(key) for key in unique_keys[start:start + chunk_size]]
        embeddings = encode_fn(items, prompt_style)
        if not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and len(embeddings) == len(items)):
            raise ValueError(f"encode_fn must return a [{len(items)}, dim] tensor, got "
                             f"{getattr(embeddings, 'shape', type(embeddings).__name__)}")
        chunks.append(embeddings.detach().float().cpu())
    return torch.cat(chunks), rows


# ---- MMEB ------------------------------------------------------------------------------------

def read_rows(path):
    """Rows of a `.jsonl`, `.json` (a list) or `.parquet` file as a list of dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # pulled in by `datasets`; only needed for parquet
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [_json_line(line, path, number) for number, line in enumerate(handle, 1) if line.strip()]
    if path.suffix == ".json":
        return _json_line(path.read_text(encoding="utf-8"), path, None)
    raise ValueError(f"cannot read {str(path)!r}: expected a .jsonl, .json or .parquet file")


def _json_line(text, path, line_number):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:  # its own message does not say which file
        where = f"{str(path)!r}" + (f" line {line_number}" if line_number is not None else "")
        raise ValueError(f"cannot read {where}: not valid JSON ({error})") from error


MMEB_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _dataset_files(directory):
    """`{name: [files]}` for a directory: one file per dataset (`<name>.jsonl`), or the Hub layout of
    `TIGER-Lab/MMEB-eval` with one sub-folder per dataset (`<name>/test-00000-of-00001.parquet`)."""
    found = {p.stem: [p] for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in MMEB_FILE_SUFFIXES}
    for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MMEB_FILE_SUFFIXES)
        if files:
            found[folder.name] = files
    return found


def load_mmeb_datasets(source):
    """MMEB-format datasets as `{name: rows}` from a directory (one file per dataset named by its stem,
    or one sub-folder of shards per dataset as on the Hub), one file, a list of files, or a mapping
    `name -> rows or file path`."""
    if isinstance(source, Mapping):
        return {name: read_rows(rows) if isinstance(rows, (str, os.PathLike)) else list(rows)
                for name, rows in source.items()}
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if len(paths) == 1 and paths[0].is_dir():
        found = _dataset_files(paths[0])
        if not found:
            raise ValueError(f"no MMEB dataset files (.jsonl/.json/.parquet) found in {str(source)!r}")
        return {name: [row for path in files for row in read_rows(path)] for name, files in found.items()}
    if not paths:
        raise ValueError(f"no MMEB dataset files (.jsonl/.json/.parquet) found in {source!r}")
    return {path.stem: read_rows(path) for path in paths}


def _mmeb_pairs(dataset, index, row):
    """Validate one MMEB row; return its query key and candidate keys as (text, image path) pairs."""
    where = f"dataset {dataset!r} row {index}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a dict with fields {MMEB_FIELDS}, got {type(row).__name__}")
    missing = [field for field in MMEB_FIELDS if field not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; MMEB rows need {MMEB_FIELDS}")
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    if not isinstance(texts, (list, tuple)) or not isinstance(paths, (list, tuple)):
        raise ValueError(f"{where}: tgt_text and tgt_img_path must be lists")
    if len(texts) != len(paths):
        raise ValueError(f"{where}: tgt_text has {len(texts)} entries but tgt_img_path has {len(paths)}")
    if not texts:
        raise ValueError(f"{where}: empty candidate list (the first candidate must be the ground truth)")
    pairs = [(row["qry_text"], row["qry_img_path"]), *zip(texts, paths)]
    keys = []
    for position, (text, path) in enumerate(pairs):
        text, path = text or "", path or ""  # parquet writes missing strings as None
        if not isinstance(text, str) or not isinstance(path, str) or not (text or path):
            name = "query" if position == 0 else f"candidate {position - 1}"
            raise ValueError(f"{where}: {name} needs a text or an image path (strings), "
                             f"got {text!r}, {path!r}")
        keys.append((text, path))
    return keys[0], keys[1:]


def _mmeb_item(key, image_root, image_size):
    text, path = key
    if not path:
        return text
    image = load_image(path, image_root, image_size)
    return {"image": image, "text": text} if text else image


def mmeb_dataset_score(name, rows, encode_fn, image_root=None, image_size=None, chunk_size=256):
    """Precision@1 of one MMEB-format dataset; each distinct (text, image) is embedded once in
    instruction prompt style. Candidates identical to the ground truth are not distractors (no
    encoder can separate an item from itself)."""
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    parsed = [_mmeb_pairs(name, index, row) for index, row in enumerate(rows)]
    keys = [key for query, candidates in parsed for key in (query, *candidates)]
    embeddings, row_of = encode_unique(keys, lambda key: _mmeb_item(key, image_root, image_size),
                                       encode_fn, "instruction", chunk_size)
    width = max(len(candidates) for _, candidates in parsed)
    hits = 0
    for start in range(0, len(parsed), chunk_size):
        chunk = parsed[start:start + chunk_size]
        query_rows = torch.tensor([row_of[query] for query, _ in chunk])
        candidate_rows = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, (_, candidates) in enumerate(chunk):
            candidate_rows[i, :len(candidates)] = torch.tensor([row_of[key] for key in candidates])
            mask[i, :len(candidates)] = torch.tensor([key != candidates[0] for key in candidates])
        scores = (embeddings[query_rows] @ embeddings.T).gather(1, candidate_rows)
        hits += ground_truth_wins(scores, mask).sum().item()
    return hits / len(parsed)


def _canonical(name):
    return "".join(char for char in name.lower() if char.isalnum())


def mmeb_summary(scores):
    """`average` over all datasets, plus the paper's grouping over the MMEB-named ones present:
    category means, IND/OOD means and Overall (unweighted means over datasets, REFERENCE §4.1).
    Names match MMEB's ignoring case and punctuation ("ImageNet_1K" is "ImageNet-1K")."""
    if not scores:
        raise ValueError("no dataset scores to summarise")
    summary = {"average": sum(scores.values()) / len(scores)}
    by_name = {_canonical(name): value for name, value in scores.items()}
    groups = defaultdict(list)
    for category, names in MMEB_CATEGORIES.items():
        for name in names:
            if _canonical(name) in by_name:
                value = by_name[_canonical(name)]
                groups[category].append(value)
                groups["OOD" if name in MMEB_OOD else "IND"].append(value)
                groups["Overall"].append(value)
    summary.update({group: sum(values) / len(values) for group, values in groups.items()})
    return summary


def evaluate_mmeb(datasets, encode_fn, image_root=None, image_size=None, chunk_size=256):
    """Score MMEB-format datasets (anything `load_mmeb_datasets` accepts).

    Returns:
        `{dataset: Precision@1, ..., "average": ..., [category / "IND" / "OOD" / "Overall"]}`.
    """
    datasets = load_mmeb_datasets(datasets)
    scores = {name: mmeb_dataset_score(name, rows, encode_fn, image_root, image_size, chunk_size)
              for name, rows in datasets.items()}
    return {**scores, **mmeb_summary(scores)}


# ---- Retrieval and compositional tasks -------------------------------------------------------

def _require(rows, fields, task):
    if not rows:
        raise ValueError(f"{task}: no rows")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{task} row {index}: expected a dict with fields {fields}, got {type(row).__name__}")
        missing = [field for field in fields if not row.get(field)]
        if missing:
            raise ValueError(f"{task} row {index}: missing or empty field(s) {missing}; expected {fields}")


def _embed_images(rows, encode_fn, image_root, image_size, chunk_size, instruction=None):
    """Each distinct image once: summary prompt, or `{"image", "text": instruction}` in instruction style."""
    style = "summary" if instruction is None else "instruction"

    def item(path):
        image = load_image(path, image_root, image_size)
        return image if instruction is None else {"image": image, "text": instruction}

    return encode_unique([row["image_path"] for row in rows], item, encode_fn, style, chunk_size)


def _embed_texts(texts, encode_fn, chunk_size, style="summary", template="{}"):
    return encode_unique([template.format(text) for text in texts], lambda text: text, encode_fn, style, chunk_size)


def evaluate_retrieval(rows, encode_fn, image_root=None, image_size=None, ks=(1, 5, 10), chunk_size=256,
                       instructions=None):
    """Image-text Recall@K. Rows are `{"image_path": str, "captions": list[str]}`, one per image.

    With `instructions=None` (the paper's zero-shot protocol) texts and images are embedded once
    each with the summary prompts. With MMEB-style `instructions`
    `{"image_query": str, "text_query": "...{}", "image_target": str}`, image->text uses images with
    `image_query` against raw captions, and text->image uses `text_query.format(caption)` against
    images with `image_target` (as MMEB's i2t / t2i tasks do).
    """
    _require(rows, ("image_path", "captions"), "retrieval")
    captions = [(caption, image) for image, row in enumerate(rows) for caption in row["captions"]]
    if any(not isinstance(caption, str) or not caption for caption, _ in captions):
        raise ValueError("retrieval: every caption must be a non-empty string")
    texts = [caption for caption, _ in captions]

    def score(image_instruction, text_style, text_template):
        image_emb, image_row = _embed_images(rows, encode_fn, image_root, image_size, chunk_size, image_instruction)
        text_emb, text_row = _embed_texts(texts, encode_fn, chunk_size, text_style, text_template)
        # duplicate image paths collapse to one candidate; captions keep their own query rows
        image_index = [image_row[rows[image]["image_path"]] for _, image in captions]
        text_index = torch.tensor([text_row[text_template.format(caption)] for caption, _ in captions])
        return retrieval_recall(text_emb[text_index], image_emb, image_index, ks)

    if instructions is None:
        return score(None, "summary", "{}")
    missing = {"image_query", "text_query", "image_target"} - set(instructions)
    if missing:
        raise ValueError(f"retrieval instructions miss {sorted(missing)}")
    image_to_text = score(instructions["image_query"], "instruction", "{}")
    text_to_image = score(instructions["image_target"], "instruction", instructions["text_query"])
    return {**{k: v for k, v in text_to_image.items() if k.startswith("t2i")},
            **{k: v for k, v in image_to_text.items() if k.startswith("i2t")}}


def evaluate_compositional(rows, encode_fn, image_root=None, image_size=None, chunk_size=256, image_instruction=None):
    """Compositional accuracy per group. Rows are `{"image_path", "caption", "negative_caption",
    "group"}`; each image and caption is embedded once, with the summary prompts, or (with
    `image_instruction`, MMEB style) images with that instruction against raw captions."""
    _require(rows, ("image_path", "caption", "negative_caption", "group"), "compositional")
    image_emb, image_row = _embed_images(rows, encode_fn, image_root, image_size, chunk_size, image_instruction)
    texts = [row[field] for row in rows for field in ("caption", "negative_caption")]
    style = "summary" if image_instruction is None else "instruction"
    text_emb, text_row = _embed_texts(texts, encode_fn, chunk_size, style)

    def rows_of(lookup, field):
        return torch.tensor([lookup[row[field]] for row in rows])

    return compositional_accuracy(image_emb[rows_of(image_row, "image_path")],
                                  text_emb[rows_of(text_row, "caption")],
                                  text_emb[rows_of(text_row, "negative_caption")],
                                  [row["group"] for row in rows])


# ---- Reporting -------------------------------------------------------------------------------

def write_results(results, out_dir):
    """Write `{task: {metric: fraction}}` to `out_dir/results.json` and a Markdown table per task
    (values in %) to `out_dir/results.md`. Returns the two paths."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty {task: {metric: value}} mapping")
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping) or any(not isinstance(v, (int, float)) for v in metrics.values()):
            raise ValueError(f"results[{task!r}] must map metric names to numbers, got {metrics!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "results.json", out_dir / "results.md"
    # Each file is replaced in one rename: a failed write leaves the previous results whole.
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    lines = []
    for task, metrics in results.items():
        lines += [f"## {task}", "", "| metric | score (%) |", "| --- | ---: |"]
        lines += [f"| {name} | {100 * value:.2f} |" for name, value in metrics.items()]
        lines.append("")
    atomic_write_text(markdown_path, "\n".join(lines))
    return json_path, markdown_path
