"""Tests for training/demo/data.py: determinism, idempotency, split disjointness, the compositional
negatives' edits, and that the evaluation harness scores an oracle encoder perfectly on the files."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from training.demo.data import (
    CLASS_LABELS,
    COLOURS,
    SHAPES,
    all_scenes,
    build_demo_dataset,
    compositional_negatives,
    scene_captions,
)
from training.evaluation import evaluate_compositional, evaluate_mmeb, evaluate_retrieval, read_rows

SMALL = {"num_train_scenes": 60, "num_eval_scenes": 20, "image_size": 32}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), seed=3, **SMALL)


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scenes_by_split(demo):
    scenes = read_rows(demo.scenes)
    return {split: [s for s in scenes if s["split"] == split] for split in ("train", "eval")}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, demo):
    first = build_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    assert tree(first.root) == tree(demo.root)
    assert tree(build_demo_dataset(tmp_path / "b", seed=4, **SMALL).root) != tree(demo.root)


def test_rebuild_is_skipped_when_complete_and_repairs_when_not(tmp_path):
    dataset = build_demo_dataset(tmp_path, seed=0, **SMALL)
    before = tree(tmp_path)
    image = next(dataset.image_root.iterdir())
    stamp = image.stat().st_mtime_ns
    assert build_demo_dataset(tmp_path, seed=0, **SMALL) == dataset
    assert image.stat().st_mtime_ns == stamp                      # nothing rewritten
    image.unlink()
    build_demo_dataset(tmp_path, seed=0, **SMALL)
    assert tree(tmp_path) == before                               # repaired, byte-identical
    build_demo_dataset(tmp_path, seed=0, **{**SMALL, "num_train_scenes": 10})
    assert len(list(dataset.image_root.iterdir())) == 10 + 20     # no stale images of the bigger build


def test_scene_enumeration_is_complete_and_unique():
    scenes = all_scenes()
    combos = {(s.objects, s.axis) for s in scenes}
    assert len(scenes) == len(combos) == 24 + 2 * 24 * 23
    assert [s.scene_id for s in scenes] == list(range(len(scenes)))


def test_splits_share_no_scene_and_records_stay_in_their_split(demo):
    split = scenes_by_split(demo)
    assert len(split["train"]) == 60 and len(split["eval"]) == 20
    ids = {name: {s["scene_id"] for s in scenes} for name, scenes in split.items()}
    combos = {name: {(json.dumps(s["objects"]), s["axis"]) for s in scenes} for name, scenes in split.items()}
    assert not ids["train"] & ids["eval"] and not combos["train"] & combos["eval"]
    images = {name: {s["image_path"] for s in scenes} for name, scenes in split.items()}
    captions = {name: {c for s in scenes for c in s["captions"]} for name, scenes in split.items()}

    for row in read_rows(demo.mmeb_train):
        assert {row["qry_image_path"], row["pos_image_path"]} - {""} <= images["train"]
    for row in read_rows(demo.stage1_train):
        assert {row["sent0"], row["sent1"]} <= captions["train"]
    assert {r["image_path"] for r in read_rows(demo.retrieval_train)} == images["train"]
    assert {r["image_path"] for r in read_rows(demo.retrieval_eval)} == images["eval"]
    assert {r["image_path"] for r in read_rows(demo.compositional_eval)} == images["eval"]
    for path in demo.mmeb_eval_files.values():
        for row in read_rows(path):
            assert {row["qry_img_path"], *row["tgt_img_path"]} - {""} <= images["eval"]
            assert len(set(zip(row["tgt_text"], row["tgt_img_path"]))) == len(row["tgt_text"])  # no repeats
    for path in images["train"] | images["eval"]:
        with Image.open(demo.image_root / path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"


def words(text):
    return text.split()


@pytest.mark.parametrize("seed", [0, 1])
def test_compositional_negatives_make_exactly_the_named_edit(seed):
    counts = {}
    for scene in all_scenes():
        positive = words(scene_captions(scene)[0])
        objects = set(scene.objects)
        negatives = compositional_negatives(scene, np.random.default_rng([seed, scene.scene_id]))
        for subset, negative_text in negatives.items():
            counts[subset] = counts.get(subset, 0) + 1
            negative = words(negative_text)
            assert negative_text not in scene_captions(scene)
            diff = [i for i, (a, b) in enumerate(zip(positive, negative)) if a != b]
            if subset == "add_obj":
                assert negative[:len(positive)] == positive and negative[len(positive)] == "and"
                added = tuple(negative[len(positive) + 2:])
                assert len(added) == 2 and added[0] in COLOURS and added[1] in SHAPES and added not in objects
                continue
            assert len(negative) == len(positive)
            if subset == "replace_att":
                assert len(diff) == 1 and positive[diff[0]] in COLOURS and negative[diff[0]] in COLOURS
            elif subset == "replace_obj":
                assert len(diff) == 1 and positive[diff[0]] in SHAPES and negative[diff[0]] in SHAPES
            elif subset == "replace_rel":
                assert [(positive[i], negative[i]) for i in diff] in ([("left", "right")], [("above", "below")])
            elif subset == "swap_att":
                i, j = diff
                assert positive[i] in COLOURS and (negative[i], negative[j]) == (positive[j], positive[i])
            elif subset == "swap_obj":  # "a c0 s0 <relation> a c1 s1" -> "a c1 s1 <relation> a c0 s0"
                assert negative == positive[-3:] + positive[3:-3] + positive[:3]
            else:
                pytest.fail(f"unexpected subset {subset}")
    assert counts["replace_att"] == counts["replace_obj"] == counts["add_obj"] == 1128
    assert counts["replace_rel"] == counts["swap_obj"] == 1104
    assert counts["swap_att"] == 2 * (8 * 3) * (7 * 2)  # per axis: first object, then other colour x other shape


def test_swap_att_exists_exactly_when_colours_and_shapes_differ():
    for scene in all_scenes():
        negatives = compositional_negatives(scene, np.random.default_rng(0))
        expected = scene.axis is not None and all(a != b for a, b in zip(*scene.objects))
        assert ("swap_att" in negatives) == expected


def test_stage1_and_mmeb_train_records_are_consistent(demo):
    for row in read_rows(demo.stage1_train):
        assert set(row) == {"sent0", "sent1", "hard_neg"}
        assert len({row["sent0"], row["sent1"], row["hard_neg"]}) == 3
    scenes = {s["image_path"]: s for s in scenes_by_split(demo)["train"]}
    for row in read_rows(demo.mmeb_train):
        assert set(row) == {"qry", "qry_image_path", "pos_text", "pos_image_path"}
        question = re.search(r"What colour is the (\w+)", row["qry"])
        if question:  # the answer is the colour of an object with the asked shape
            objects = scenes[row["qry_image_path"]]["objects"]
            assert [row["pos_text"], question.group(1)] in objects
        if "classification" in row["qry"]:
            assert row["pos_text"] in CLASS_LABELS


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="distinct scenes"):
        build_demo_dataset(tmp_path, num_train_scenes=1000, num_eval_scenes=200)
    with pytest.raises(ValueError, match="image_size"):
        build_demo_dataset(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="seed"):
        build_demo_dataset(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="num_distractors=9"):
        build_demo_dataset(tmp_path, num_train_scenes=10, num_eval_scenes=5, image_size=16)


class SceneOracle:
    """Knows every eval scene: an image, a fused query, or any text that is one of a scene's captions
    embeds as that scene's one-hot; other texts (labels, negatives) embed as zero. Pixels identify
    the image, so the oracle never sees a path."""

    def __init__(self, demo):
        scenes = read_rows(demo.scenes)
        self.size = len(scenes)
        self.by_pixels = {}
        self.by_caption = {}
        for index, scene in enumerate(scenes):
            with Image.open(demo.image_root / scene["image_path"]) as image:
                self.by_pixels[image.convert("RGB").tobytes()] = index
            for caption in scene["captions"]:
                self.by_caption[caption] = index

    def one_hot(self, index):
        vector = torch.zeros(self.size)
        if index is not None:
            vector[index] = 1.0
        return vector

    def vector(self, item):
        if isinstance(item, dict):
            item = item["image"]
        if isinstance(item, str):
            caption = item.split(": ", 1)[-1]  # t2i queries end with the caption
            return self.one_hot(self.by_caption.get(caption))
        return self.one_hot(self.by_pixels[item.tobytes()])

    def __call__(self, items, prompt_style):
        return torch.stack([self.vector(item) for item in items])


def test_harness_scores_an_oracle_perfectly_and_a_collapsed_encoder_zero(demo):
    oracle = SceneOracle(demo)
    mmeb = evaluate_mmeb(demo.mmeb_eval_dir, oracle, image_root=demo.image_root)
    assert mmeb["demo_t2i"] == 1.0 and mmeb["demo_i2t"] == 1.0
    assert evaluate_retrieval(read_rows(demo.retrieval_eval), oracle, image_root=demo.image_root) == {
        f"{direction}_R@{k}": 1.0 for direction in ("t2i", "i2t") for k in (1, 5, 10)}
    compositional = evaluate_compositional(read_rows(demo.compositional_eval), oracle, image_root=demo.image_root)
    assert compositional == {"add": 1.0, "replace": 1.0, "swap": 1.0, "overall": 1.0}

    def collapsed(items, prompt_style):
        return torch.ones(len(items), 4) / 2

    scores = evaluate_mmeb(demo.mmeb_eval_dir, collapsed, image_root=demo.image_root)
    assert set(scores.values()) == {0.0}
