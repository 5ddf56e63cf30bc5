"""Evaluation with duplicated inputs: a repeated image path (the de-duplication branch) and retrieval
where several captions, and several rows, share an image.

The encoder is a transparent stand-in written here: an image embeds as its (known) colour, a text as
a vector from a table, a fused item as their sum; it records what it was asked to embed. The
expected scores are loops over those vectors, written independently of `training.evaluation`.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.eval_suite import evaluate_suite
from training.evaluation import evaluate_mmeb, evaluate_retrieval
from training.demo.tiny_models import tiny_unime

TOL = 1e-6  # the documented tie tolerance: a distractor within it of the positive beats the positive
COLOURS = {"a.png": (250, 10, 10), "b.png": (10, 250, 10), "c.png": (10, 10, 250), "d.png": (180, 180, 20)}
TEXTS = {
    "red thing": (1.0, 0.1, 0.0), "crimson": (0.9, 0.0, 0.3), "another red": (0.8, 0.5, 0.0),
    "blue thing": (0.0, 0.1, 1.0), "green": (0.1, 1.0, 0.1), "yellow-ish": (0.6, 0.6, 0.0),
    "<|image_1|> Find the colour.": (0.2, 0.2, 0.2), "a colour": (0.3, 0.3, 0.1),
}


def colour_vector(rgb):
    return [value / 255 - 0.5 for value in rgb]


def unit(vector):
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def item_vector(item):
    if isinstance(item, str):
        return unit(TEXTS[item])
    if isinstance(item, dict):
        return unit([x + y for x, y in zip(item_vector(item["image"]), TEXTS[item["text"]])])
    pixel = item.getpixel((0, 0))
    return unit(colour_vector(pixel))


class RecordingEncoder:
    def __init__(self):
        self.items = []

    def __call__(self, items, prompt_style):
        self.items += [(prompt_style, item if isinstance(item, str) else
                        (item["text"], item["image"].getpixel((0, 0))) if isinstance(item, dict)
                        else item.getpixel((0, 0))) for item in items]
        return F.normalize(torch.tensor([item_vector(item) for item in items], dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("duplicate_images")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(root / name)
    return root


def expected_vector(text, path):
    if not path:
        return unit(TEXTS[text])
    image = unit(colour_vector(COLOURS[path]))
    return unit([x + y for x, y in zip(image, TEXTS[text])]) if text else image


# ----------------------------------------------------------------------------- MMEB


MMEB_ROWS = [
    # the query image a.png appears in three rows, b.png as query and candidate, c.png twice in one list
    {"qry_text": "<|image_1|> Find the colour.", "qry_img_path": "a.png",
     "tgt_text": ["red thing", "blue thing", "green"], "tgt_img_path": ["", "", ""]},
    {"qry_text": "<|image_1|> Find the colour.", "qry_img_path": "a.png",
     "tgt_text": ["green", "red thing", "blue thing"], "tgt_img_path": ["", "", ""]},   # a miss
    {"qry_text": "", "qry_img_path": "a.png",
     "tgt_text": ["", "", "", ""], "tgt_img_path": ["a.png", "c.png", "c.png", "a.png"]},  # copy of the truth
    {"qry_text": "a colour", "qry_img_path": "b.png",
     "tgt_text": ["", "", ""], "tgt_img_path": ["d.png", "b.png", "a.png"]},  # a miss: b.png itself is a candidate
    {"qry_text": "blue thing", "qry_img_path": "",
     "tgt_text": ["", ""], "tgt_img_path": ["c.png", "b.png"]},
]


def mmeb_loop(rows):
    hits = 0
    for row in rows:
        query = expected_vector(row["qry_text"], row["qry_img_path"])
        candidates = list(zip(row["tgt_text"], row["tgt_img_path"]))
        truth = dot(query, expected_vector(*candidates[0]))
        distractors = [dot(query, expected_vector(*c)) for c in candidates[1:] if c != candidates[0]]
        hits += all(truth > score + TOL for score in distractors)
    return hits / len(rows)


def test_mmeb_with_repeated_images_embeds_each_item_once_and_scores_every_row(image_root):
    encoder = RecordingEncoder()
    scores = evaluate_mmeb({"Dupes": MMEB_ROWS}, encoder, image_root=image_root)
    expected = mmeb_loop(MMEB_ROWS)
    assert expected == pytest.approx(3 / 5)  # rows 1 and 3 miss (checked by hand above)
    assert scores["Dupes"] == pytest.approx(expected)
    distinct = {(row["qry_text"], row["qry_img_path"]) for row in MMEB_ROWS} | {
        pair for row in MMEB_ROWS for pair in zip(row["tgt_text"], row["tgt_img_path"])}
    assert len(encoder.items) == len(distinct) == 9  # the text query "blue thing" is also a candidate
    assert len(set(encoder.items)) == len(encoder.items)  # nothing embedded twice
    assert {style for style, _ in encoder.items} == {"instruction"}


def test_mmeb_duplicate_rows_count_as_separate_queries(image_root):
    # The same query row three times weighs three times in the score.
    rows = [MMEB_ROWS[1]] * 3 + [MMEB_ROWS[0]]
    assert evaluate_mmeb({"Dupes": rows}, RecordingEncoder(), image_root=image_root)["Dupes"] == pytest.approx(1 / 4)


# ----------------------------------------------------------------------------- retrieval


RETRIEVAL_ROWS = [
    {"image_path": "a.png", "captions": ["red thing", "crimson"]},
    {"image_path": "b.png", "captions": ["blue thing"]},
    {"image_path": "a.png", "captions": ["another red"]},          # the same image in a second row
    {"image_path": "c.png", "captions": ["green", "red thing"]},   # a caption shared with a.png
    {"image_path": "d.png", "captions": ["yellow-ish"]},
]


def retrieval_loop(rows, ks):
    images = list(dict.fromkeys(row["image_path"] for row in rows))
    captions = [(caption, row["image_path"]) for row in rows for caption in row["captions"]]
    image_vec = {path: unit(colour_vector(COLOURS[path])) for path in images}
    t2i_ranks = []
    for caption, path in captions:
        positive = dot(unit(TEXTS[caption]), image_vec[path])
        t2i_ranks.append(sum(dot(unit(TEXTS[caption]), image_vec[other]) >= positive - TOL
                             for other in images if other != path))
    i2t_ranks = []
    for path in images:
        scores = [(dot(unit(TEXTS[caption]), image_vec[path]), own == path) for caption, own in captions]
        best = max(score for score, is_positive in scores if is_positive)
        i2t_ranks.append(sum(score >= best - TOL for score, is_positive in scores if not is_positive))
    metrics = {f"t2i_R@{k}": sum(rank < k for rank in t2i_ranks) / len(t2i_ranks) for k in ks}
    metrics.update({f"i2t_R@{k}": sum(rank < k for rank in i2t_ranks) / len(i2t_ranks) for k in ks})
    return metrics


def test_retrieval_with_shared_images_and_shared_captions(image_root):
    encoder = RecordingEncoder()
    result = evaluate_retrieval(RETRIEVAL_ROWS, encoder, image_root=image_root, ks=(1, 2, 3))
    expected = retrieval_loop(RETRIEVAL_ROWS, (1, 2, 3))
    assert result == pytest.approx(expected)
    # by hand: of 7 caption queries over 4 distinct images only "red thing" (a), "crimson", "yellow-ish" hit
    # at R@1; as image queries only d.png does: a.png ties with the "red thing" caption of c.png.
    assert expected["t2i_R@1"] == pytest.approx(3 / 7) and expected["i2t_R@1"] == pytest.approx(1 / 4)
    assert len(encoder.items) == len(set(encoder.items)) == 4 + 6  # 4 distinct images, 6 distinct captions
    assert {style for style, _ in encoder.items} == {"summary"}


def test_duplicate_rows_equal_merged_rows(image_root):
    merged = [{"image_path": "a.png", "captions": ["red thing", "crimson", "another red"]},
              *RETRIEVAL_ROWS[1:2], *RETRIEVAL_ROWS[3:]]
    split = evaluate_retrieval(RETRIEVAL_ROWS, RecordingEncoder(), image_root=image_root, ks=(1, 2))
    assert split == evaluate_retrieval(merged, RecordingEncoder(), image_root=image_root, ks=(1, 2))


def test_evaluate_suite_on_a_tiny_model_equals_its_encoder_scored_by_hand(image_root, tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    (tmp_path / "mmeb.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MMEB_ROWS), encoding="utf-8")
    compositional = [{"image_path": "a.png", "caption": "red thing", "negative_caption": "blue thing", "group": "swap"},
                     {"image_path": "a.png", "caption": "crimson", "negative_caption": "green", "group": "add"},
                     {"image_path": "b.png", "caption": "green", "negative_caption": "red thing", "group": "swap"}]
    results = evaluate_suite(model, processor, mmeb=tmp_path / "mmeb.jsonl", retrieval=RETRIEVAL_ROWS,
                             compositional=compositional, image_root=image_root, batch_size=4)
    # Independent scoring of the model's own embeddings, item by item.
    def emb(item, style):
        return model.encode([item], processor=processor, prompt_style=style)[0].double().tolist()

    def image(path):
        return Image.open(image_root / path).convert("RGB")

    vectors = {}
    for row in MMEB_ROWS:
        for text, path in [(row["qry_text"], row["qry_img_path"]), *zip(row["tgt_text"], row["tgt_img_path"])]:
            item = text if not path else ({"image": image(path), "text": text} if text else image(path))
            vectors[(text, path)] = emb(item, "instruction")
    hits = 0
    for row in MMEB_ROWS:
        query = vectors[(row["qry_text"], row["qry_img_path"])]
        candidates = list(zip(row["tgt_text"], row["tgt_img_path"]))
        truth = dot(query, vectors[candidates[0]])
        hits += all(truth > dot(query, vectors[c]) + TOL for c in candidates[1:] if c != candidates[0])
    assert results["mmeb"]["mmeb"] == pytest.approx(hits / len(MMEB_ROWS))
    assert results["mmeb"]["average"] == pytest.approx(hits / len(MMEB_ROWS))

    image_vec = {path: emb(image(path), "summary") for path in COLOURS}
    correct = {}
    for row in compositional:
        won = dot(image_vec[row["image_path"]], emb(row["caption"], "summary")) > \
            dot(image_vec[row["image_path"]], emb(row["negative_caption"], "summary")) + TOL
        correct.setdefault(row["group"], []).append(won)
    expected = {group: sum(v) / len(v) for group, v in correct.items()}
    expected["overall"] = sum(sum(v) for v in correct.values()) / len(compositional)
    assert results["compositional"] == pytest.approx(expected)

    captions = [(caption, row["image_path"]) for row in RETRIEVAL_ROWS for caption in row["captions"]]
    images = list(dict.fromkeys(row["image_path"] for row in RETRIEVAL_ROWS))
    text_vec = {caption: emb(caption, "summary") for caption, _ in captions}
    t2i = [sum(dot(text_vec[c], image_vec[o]) >= dot(text_vec[c], image_vec[p]) - TOL for o in images if o != p)
           for c, p in captions]
    assert results["retrieval"]["t2i_R@1"] == pytest.approx(sum(rank < 1 for rank in t2i) / len(t2i))
    assert set(results) == {"mmeb", "retrieval", "compositional"}
