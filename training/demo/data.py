"""A small offline demo data set: rendered shape scenes with captions, for every stage and evaluation.

A scene is one or two coloured shapes (8 colours x circle/square/triangle) and, for two, a layout:
the first object left of (horizontal) or above (vertical) the second. Every attribute combination is
one scene, rendered once, so "the same scene" means "the same combination" and the train and
evaluation splits are disjoint sets of combinations by construction (1128 scenes in all).

`build_demo_dataset` writes, under `out_dir`:

    images/scene_0000.png       one PNG per scene (image_size x image_size, seeded jitter)
    scenes.jsonl                scene_id, split, objects, axis, image_path, captions
    stage1_train.jsonl          sent0, sent1, hard_neg          (SimCSE-style, train scenes)
    mmeb_train.jsonl            qry, qry_image_path, pos_text, pos_image_path   (train scenes)
    mmeb_eval/<name>.jsonl      qry_text, qry_img_path, tgt_text[], tgt_img_path[] (eval scenes;
                                first candidate is the ground truth)
    retrieval_{train,eval}.jsonl   image_path, captions[]   (3 paraphrases per image)
    compositional_eval.jsonl    image_path, caption, negative_caption, group, subset
    manifest.json               the build parameters; a rebuild with the same ones is skipped

Image paths in records are relative to `DemoDataset.image_root`. Everything is a function of the
seed: a scene's image is drawn from `numpy.random.default_rng([seed, scene_id])`.
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (130, 40, 170), "brown": (130, 75, 25), "pink": (245, 120, 190), "gray": (120, 120, 120)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
SIDES = {"horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom")}
SUBSET_GROUPS = {"replace_att": "replace", "replace_obj": "replace", "replace_rel": "replace",
                 "swap_att": "swap", "swap_obj": "swap", "add_obj": "add"}
MMEB_EVAL_NAMES = ("demo_classification", "demo_vqa", "demo_i2t", "demo_t2i")
CLASSIFY_QUERY = "<|image_1|> Represent the given image for classification."
VQA_QUERY = "<|image_1|> Represent the given image with the following question: {}"
I2T_QUERY = "<|image_1|> Find an image caption describing the given image."
T2I_QUERY = "Find me an everyday image that matches the given caption: {}"
IMAGE_TARGET = "<|image_1|> Represent the given image."
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Scene:
    """One attribute combination. `objects` holds (colour, shape) pairs, the first one left of or
    above the second; `axis` is "horizontal", "vertical", or None for a single object."""

    scene_id: int
    objects: tuple
    axis: str | None = None

    @property
    def image_path(self):
        return f"scene_{self.scene_id:04d}.png"


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a built demo data set (see the module docstring for each file's fields)."""

    root: Path
    image_root: Path
    scenes: Path
    stage1_train: Path
    mmeb_train: Path
    mmeb_eval_dir: Path
    retrieval_train: Path
    retrieval_eval: Path
    compositional_eval: Path

    @property
    def mmeb_eval_files(self):
        return {name: self.mmeb_eval_dir / f"{name}.jsonl" for name in MMEB_EVAL_NAMES}


def all_scenes():
    """Every scene, in a fixed order: single objects, then ordered pairs of distinct objects per axis."""
    objects = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    combos = [((obj,), None) for obj in objects]
    combos += [(pair, axis) for axis in RELATIONS for pair in itertools.permutations(objects, 2)]
    return [Scene(index, pair, axis) for index, (pair, axis) in enumerate(combos)]


def split_scenes(seed, num_train_scenes, num_eval_scenes):
    """Disjoint (train, eval) scene lists drawn from one seeded permutation of `all_scenes()`."""
    scenes = all_scenes()
    if num_train_scenes < 1 or num_eval_scenes < 1 or num_train_scenes + num_eval_scenes > len(scenes):
        raise ValueError(f"need 1 <= train ({num_train_scenes}), 1 <= eval ({num_eval_scenes}) and "
                         f"train + eval <= {len(scenes)} distinct scenes")
    order = np.random.default_rng(seed).permutation(len(scenes))
    train = [scenes[i] for i in sorted(order[:num_train_scenes])]
    evaluation = [scenes[i] for i in sorted(order[num_train_scenes:num_train_scenes + num_eval_scenes])]
    assert not {s.scene_id for s in train} & {s.scene_id for s in evaluation}  # by construction
    return train, evaluation


# ---- Rendering -------------------------------------------------------------------------------

def _draw_shape(draw, shape, centre, radius, colour):
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def render_scene(scene, image_size, seed):
    """`image_size` x `image_size` RGB image of `scene`; positions, sizes and background jitter come
    from `default_rng([seed, scene_id])`. Two objects sit in opposite halves and never overlap."""
    rng = np.random.default_rng([seed, scene.scene_id])
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    if scene.axis is None:
        along = [rng.uniform(0.35, 0.65)]
    else:  # centres at least 0.4 apart, radii at most 0.17: no overlap
        along = [rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8)]
    for (colour, shape), position in zip(scene.objects, along):
        across, radius = rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.17)
        x, y = (across, position) if scene.axis == "vertical" else (position, across)
        _draw_shape(draw, shape, (x * image_size, y * image_size), radius * image_size, COLOURS[colour])
    return image


# ---- Captions and compositional negatives ----------------------------------------------------

def _phrase(obj):
    colour, shape = obj
    return f"a {colour} {shape}"


def describe(objects, relation=None, added=None):
    """Caption `objects[0] relation objects[1]` (or one object), optionally `... and <added>`."""
    text = _phrase(objects[0]) if relation is None else f"{_phrase(objects[0])} {relation} {_phrase(objects[1])}"
    return text if added is None else f"{text} and {_phrase(added)}"


def scene_captions(scene):
    """Three paraphrases of the scene; the first is the canonical one the negatives are built from."""
    if scene.axis is None:
        phrase = _phrase(scene.objects[0])
        return [phrase, f"a picture of {phrase}", f"{phrase} on a plain background"]
    first, second = (_phrase(obj) for obj in scene.objects)
    (forward, backward), (side_a, side_b) = RELATIONS[scene.axis], SIDES[scene.axis]
    return [f"{first} {forward} {second}", f"{second} {backward} {first}",
            f"{first} {side_a} and {second} {side_b}"]


def compositional_negatives(scene, rng):
    """`{subset: negative caption}` for each SugarCrepe-style subset that applies to `scene`; each
    differs from `scene_captions(scene)[0]` by exactly the named edit."""
    objects, axis = list(scene.objects), scene.axis
    relation = RELATIONS[axis][0] if axis else None
    target = int(rng.integers(len(objects)))
    colour, shape = objects[target]
    negatives = {}

    replaced = list(objects)
    replaced[target] = (str(rng.choice([c for c in COLOURS if c != colour])), shape)
    negatives["replace_att"] = describe(replaced, relation)
    replaced[target] = (colour, str(rng.choice([s for s in SHAPES if s != shape])))
    negatives["replace_obj"] = describe(replaced, relation)
    if axis is not None:
        (c0, s0), (c1, s1) = objects
        negatives["replace_rel"] = describe(objects, RELATIONS[axis][1])
        if c0 != c1 and s0 != s1:  # with a shared shape or colour, swapping one is swapping objects
            negatives["swap_att"] = describe([(c1, s0), (c0, s1)], relation)
        negatives["swap_obj"] = describe(objects[::-1], relation)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in objects]
    negatives["add_obj"] = describe(objects, relation, added=absent[int(rng.integers(len(absent)))])
    return negatives


def class_label(scene):
    """Colour-blind content label (9 classes): "circle", "two squares", "circle and triangle", ..."""
    shapes = sorted(shape for _, shape in scene.objects)
    if len(shapes) == 1:
        return shapes[0]
    return f"two {shapes[0]}s" if shapes[0] == shapes[1] else " and ".join(shapes)


CLASS_LABELS = (*SHAPES, *(f"two {s}s" for s in SHAPES),
                *(" and ".join(pair) for pair in itertools.combinations(SHAPES, 2)))


def colour_question(scene, rng):
    """(question, answer) about one object's colour, naming its side when its shape is not unique."""
    index = int(rng.integers(len(scene.objects)))
    colour, shape = scene.objects[index]
    if sum(s == shape for _, s in scene.objects) == 1:
        return f"What colour is the {shape}?", colour
    return f"What colour is the {shape} {SIDES[scene.axis][index]}?", colour


# ---- Records ---------------------------------------------------------------------------------

def _rng(seed, scene, purpose):
    # one stream per (scene, purpose): records do not shift when another record type changes
    return np.random.default_rng([seed, scene.scene_id, purpose])


def stage1_records(scenes, seed):
    """SimCSE-style `sent0, sent1, hard_neg`: a paraphrase pair and an attribute-swapped negative."""
    records = []
    for scene in scenes:
        rng = _rng(seed, scene, 1)
        captions, negatives = scene_captions(scene), compositional_negatives(scene, rng)
        hard_negative = next(negatives[k] for k in ("swap_att", "swap_obj", "replace_att") if k in negatives)
        paraphrase = captions[1 + int(rng.integers(2))]
        records.append({"sent0": captions[0], "sent1": paraphrase, "hard_neg": hard_negative})
    return records


def _train_pair(qry, qry_image_path, pos_text, pos_image_path=""):
    return {"qry": qry, "qry_image_path": qry_image_path, "pos_text": pos_text, "pos_image_path": pos_image_path}


def mmeb_train_records(scenes, seed):
    """MMEB-train pairs, four per scene: classification, colour VQA, image->text, text->image."""
    records = []
    for scene in scenes:
        rng = _rng(seed, scene, 2)
        question, answer = colour_question(scene, rng)
        caption = scene_captions(scene)[int(rng.integers(3))]
        records += [_train_pair(CLASSIFY_QUERY, scene.image_path, class_label(scene)),
                    _train_pair(VQA_QUERY.format(question), scene.image_path, answer),
                    _train_pair(I2T_QUERY, scene.image_path, caption),
                    _train_pair(T2I_QUERY.format(caption), "", IMAGE_TARGET, scene.image_path)]
    return records


def _eval_row(qry_text, qry_img_path, candidates):
    texts, paths = zip(*candidates)
    return {"qry_text": qry_text, "qry_img_path": qry_img_path, "tgt_text": list(texts),
            "tgt_img_path": list(paths)}


def mmeb_eval_records(scenes, seed, num_distractors):
    """`{dataset name: rows}` for the four toy MMEB datasets; candidate 0 is the ground truth."""
    if len(scenes) <= num_distractors:
        raise ValueError(f"num_distractors={num_distractors} needs more than that many eval scenes, "
                         f"got {len(scenes)}")
    datasets = {name: [] for name in MMEB_EVAL_NAMES}
    for scene in scenes:
        rng = _rng(seed, scene, 3)
        others = [scenes[i] for i in rng.permutation(len(scenes)) if scenes[i] != scene][:num_distractors]
        label, caption = class_label(scene), scene_captions(scene)[0]
        question, answer = colour_question(scene, rng)
        labels = [label, *(c for c in CLASS_LABELS if c != label)]
        answers = [answer, *(c for c in COLOURS if c != answer)]
        datasets["demo_classification"].append(_eval_row(CLASSIFY_QUERY, scene.image_path,
                                                         [(text, "") for text in labels]))
        datasets["demo_vqa"].append(_eval_row(VQA_QUERY.format(question), scene.image_path,
                                              [(text, "") for text in answers]))
        datasets["demo_i2t"].append(_eval_row(I2T_QUERY, scene.image_path,
                                              [(scene_captions(s)[0], "") for s in [scene, *others]]))
        datasets["demo_t2i"].append(_eval_row(T2I_QUERY.format(caption), "",
                                              [(IMAGE_TARGET, s.image_path) for s in [scene, *others]]))
    return datasets


def compositional_records(scenes, seed):
    """One row per (scene, applicable subset): positive = canonical caption."""
    records = []
    for scene in scenes:
        for subset, negative in compositional_negatives(scene, _rng(seed, scene, 4)).items():
            records.append({"image_path": scene.image_path, "caption": scene_captions(scene)[0],
                            "negative_caption": negative, "group": SUBSET_GROUPS[subset], "subset": subset})
    return records


def _scene_record(scene, split):
    return {"scene_id": scene.scene_id, "split": split, "objects": [list(obj) for obj in scene.objects],
            "axis": scene.axis, "image_path": scene.image_path, "captions": scene_captions(scene)}


# ---- Building --------------------------------------------------------------------------------

def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records), encoding="utf-8")


def _dataset_paths(root):
    root = Path(root)
    return DemoDataset(root=root, image_root=root / "images", scenes=root / "scenes.jsonl",
                       stage1_train=root / "stage1_train.jsonl", mmeb_train=root / "mmeb_train.jsonl",
                       mmeb_eval_dir=root / "mmeb_eval", retrieval_train=root / "retrieval_train.jsonl",
                       retrieval_eval=root / "retrieval_eval.jsonl",
                       compositional_eval=root / "compositional_eval.jsonl")


def build_demo_dataset(out_dir, seed=0, num_train_scenes=800, num_eval_scenes=200, image_size=64,
                       num_distractors=9):
    """Render the demo scenes and write every record file under `out_dir` (see module docstring).

    Idempotent: the same arguments give byte-identical files, and a second call with the same
    arguments on a complete build returns at once. Takes about a second for 1000 scenes at 64 px.

    Returns:
        `DemoDataset` with the paths.
    """
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    paths = _dataset_paths(out_dir)
    params = {"version": _FORMAT_VERSION, "seed": seed, "num_train_scenes": num_train_scenes,
              "num_eval_scenes": num_eval_scenes, "image_size": image_size, "num_distractors": num_distractors}
    manifest = paths.root / "manifest.json"
    train, evaluation = split_scenes(seed, num_train_scenes, num_eval_scenes)
    if manifest.exists() and json.loads(manifest.read_text()) == params and _complete(paths, train + evaluation):
        return paths

    manifest.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    paths.image_root.mkdir(parents=True, exist_ok=True)
    wanted = {scene.image_path for scene in train + evaluation}
    for stale in paths.image_root.glob("scene_*.png"):  # left by an earlier build with other scenes
        if stale.name not in wanted:
            stale.unlink()
    for scene in train + evaluation:
        render_scene(scene, image_size, seed).save(paths.image_root / scene.image_path)
    _write_jsonl(paths.scenes, [*(_scene_record(s, "train") for s in train),
                                *(_scene_record(s, "eval") for s in evaluation)])
    _write_jsonl(paths.stage1_train, stage1_records(train, seed))
    _write_jsonl(paths.mmeb_train, mmeb_train_records(train, seed))
    for name, rows in mmeb_eval_records(evaluation, seed, num_distractors).items():
        _write_jsonl(paths.mmeb_eval_files[name], rows)
    for split_path, scenes in ((paths.retrieval_train, train), (paths.retrieval_eval, evaluation)):
        _write_jsonl(split_path, [{"image_path": s.image_path, "captions": scene_captions(s)} for s in scenes])
    _write_jsonl(paths.compositional_eval, compositional_records(evaluation, seed))
    manifest.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")  # last: marks completion
    return paths


def _complete(paths, scenes):
    files = [paths.scenes, paths.stage1_train, paths.mmeb_train, paths.retrieval_train, paths.retrieval_eval,
             paths.compositional_eval, *paths.mmeb_eval_files.values()]
    return all(p.exists() for p in files) and all((paths.image_root / s.image_path).exists() for s in scenes)


def demo_suite_inputs(dataset, instruction_prompts=True):
    """`evaluate_suite` keyword arguments for the held-out split of a built demo data set.

    With `instruction_prompts`, retrieval and compositional tasks use the demo's MMEB-style
    instructions (those stage 2 trains with); otherwise the paper's zero-shot summary prompts.
    """
    instructions = {"image_query": I2T_QUERY, "text_query": T2I_QUERY, "image_target": IMAGE_TARGET}
    return {
        "instructions": instructions if instruction_prompts else None,
        "mmeb": {name: path for name, path in dataset.mmeb_eval_files.items()},
        "retrieval": dataset.retrieval_eval,
        "compositional": dataset.compositional_eval,
        "image_root": dataset.image_root,
    }
