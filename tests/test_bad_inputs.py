"""Bad input everywhere it enters (issue 7): one table per entry point.

Each row asserts the exception type and that the message names the offending item / file / row; the
encode and processor rows also assert that the backbone never ran. Documented behaviours:

- A text longer than the model's context (`config.max_sequence_tokens`, default the language model's
  `max_position_embeddings`) has its text cut by `encode`, never the prompt template (issue 12,
  tests/test_encode_api.py); an image that alone exceeds it is refused naming the item.
- Unusual but valid images (16/32-bit, float, transparent, CMYK, palette, huge) are converted to RGB
  as `modeling_unime.inputs.load_image` documents (tests/bad_inputs/test_bad_images.py).
- Unreadable training images are a `BadImageError` (a ValueError) naming file and row, or with
  `skip_bad_images=True` a counted skip (`test_collator_counts_skipped_pairs`).
"""

import json
import re
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_unime import UniMEConfig, UniMEModel, UniMEProcessor
from training.data import load_distillation_dataset
from training.distillation import DistillationConfig, UniMEDistillationTrainer
from training.evaluation import evaluate_mmeb
from training.hard_negative import HardNegativeConfig
from training.mmeb_data import BadImageError, MMEBCollator, load_mmeb_train
from training.teacher import build_teacher_cache
from training.demo.tiny_models import tiny_unime

REPO_ROOT = Path(__file__).resolve().parents[1]


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_image_files(root):
    """ok.png, truncated.png/.jpg, not_an_image.png (text), empty.png, huge.png (a PNG header
    claiming 100000 x 100000 pixels: a decompression bomb), folder.png (a directory)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "ok.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "ok.jpg")
    for name in ("png", "jpg"):
        data = (root / f"ok.{name}").read_bytes()
        (root / f"truncated.{name}").write_bytes(data[: len(data) // 2])
    (root / "not_an_image.png").write_text("hello, I am text")
    (root / "empty.png").write_bytes(b"")
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (root / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    (root / "folder.png").mkdir()


@pytest.fixture(scope="module")
def env(qwen2_vl_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    write_image_files(root)
    model, processor = qwen2_vl_model
    return SimpleNamespace(model=model, processor=processor, root=root,
                           encode=lambda items, **kw: model.encode(items, processor=processor, **kw))


@pytest.fixture
def backbone_must_not_run(env):
    def fail(*_):
        raise AssertionError("a bad input reached the backbone")

    handle = env.model.backbone.register_forward_pre_hook(fail)
    yield
    handle.remove()


def case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


def lazily_opened(path):
    return Image.open(path)  # not loaded: decoding happens when the image is used


def closed_image(path):
    with Image.open(path) as image:
        return image


ENCODE_CASES = [
    case("empty text", lambda e: e.encode(["ok", ""]), ValueError, r"^item 1: text is empty"),
    case("whitespace text", lambda e: e.encode([" \n\t\u3000"]), ValueError, r"^item 0: text is empty"),
    case("None item", lambda e: e.encode(["ok", None]), ValueError, r"^item 1 is None"),
    case("None for the list", lambda e: e.encode(None), ValueError, r"^item 0 is None"),
    case("int", lambda e: e.encode([3]), TypeError, r"^item 0: expected str, PIL.Image.*got int"),
    case("bytes", lambda e: e.encode(["ok", b"a dog"]), TypeError, r"^item 1: .*got bytes"),
    case("numpy array", lambda e: e.encode([np.zeros((4, 4, 3))]), TypeError, r"^item 0: .*got ndarray"),
    case("nested list", lambda e: e.encode([["a", "b"]]), TypeError, r"^item 0: .*got list"),
    case("dict without keys", lambda e: e.encode([{}]), ValueError, r"^item 0: dict items need 'image' and/or 'text'"),
    case("dict with unknown key", lambda e: e.encode([{"img": "x"}]), ValueError, r"^item 0: .*got \['img'\]"),
    case("dict with None values", lambda e: e.encode([{"image": None, "text": None}]), ValueError,
         r"^item 0: both 'image' and 'text' are None"),
    case("dict with int text", lambda e: e.encode([{"text": 5}]), TypeError, r"^item 0: expected text as str"),
    case("dict with int image", lambda e: e.encode([{"image": 5}]), TypeError, r"^item 0: expected a PIL.Image"),
    case("lone surrogate", lambda e: e.encode(["ok", "a\ud800b"]), ValueError,
         r"^item 1: text is not valid Unicode \(surrogates not allowed at character 1\)"),
    case("image placeholder in text", lambda e: e.encode(["a <|image_pad|> b"]), ValueError,
         r"^item 0: text contains the backbone's image placeholder '<\|image_pad\|>'"),
    case("image placeholder in fused text", lambda e: e.encode([{"image": e.root / "ok.png", "text": "<|video_pad|>"}]),
         ValueError, r"^item 0: text contains the backbone's image placeholder '<\|video_pad\|>'"),
    case("image placeholder in instruction", lambda e: e.encode(["a"], instruction="<|image_pad|> find"), ValueError,
         r"^instruction: text contains the backbone's image placeholder"),
    case("<|image_1|> without an image", lambda e: e.encode(["<|image_1|> x"], prompt_style="instruction"),
         ValueError, r"text '<\|image_1\|> x' contains <\|image_1\|> but the item has no image"),
    case("template over max_length", lambda e: e.encode(["ok", "word " * 3000], max_length=4), ValueError,
         r"^item 0: the prompt template, instruction and image take \d+ of max_length=4 tokens"),
    case("zero-size image", lambda e: e.encode([Image.new("RGB", (0, 0))]), ValueError,
         r"^item 0: image has zero size \(0, 0\)"),
    case("zero-height image", lambda e: e.encode(["ok", Image.new("L", (7, 0))]), ValueError,
         r"^item 1: image has zero size \(7, 0\)"),
    case("missing image path", lambda e: e.encode([e.root / "missing.png"]), ValueError,
         r"^item 0: image file '.*missing\.png' does not exist"),
    case("missing image path (str in dict)", lambda e: e.encode([{"image": str(e.root / "missing.png")}]),
         ValueError, r"^item 0: image file '.*missing\.png' does not exist"),
    case("directory as image", lambda e: e.encode([e.root / "folder.png"]), ValueError,
         r"^item 0: image file '.*folder\.png' is not a file"),
    case("non-image file", lambda e: e.encode([e.root / "not_an_image.png"]), ValueError,
         r"^item 0: cannot read image file '.*not_an_image\.png' \(cannot identify"),
    case("empty file", lambda e: e.encode([e.root / "empty.png"]), ValueError,
         r"^item 0: cannot read image file '.*empty\.png'"),
    case("truncated PNG", lambda e: e.encode([e.root / "truncated.png"]), ValueError,
         r"^item 0: cannot read image file '.*truncated\.png' \(image file is truncated"),
    case("truncated JPEG", lambda e: e.encode([e.root / "truncated.jpg"]), ValueError,
         r"^item 0: cannot read image file '.*truncated\.jpg' \(image file is truncated"),
    case("decompression bomb", lambda e: e.encode([e.root / "huge.png"]), ValueError,
         r"^item 0: cannot read image file '.*huge\.png' .*decompression bomb"),
    case("lazily opened truncated image", lambda e: e.encode([lazily_opened(e.root / "truncated.png")]), ValueError,
         r"^item 0: cannot decode the image \(OSError: image file is truncated"),
    case("image whose file was closed", lambda e: e.encode(["ok", closed_image(e.root / "ok.png")]), ValueError,
         r"^item 1: cannot decode the image"),
    case("aspect ratio over 200", lambda e: e.encode([Image.new("RGB", (1, 300))]), ValueError,
         r"^item 0: image of size \(1, 300\) has aspect ratio 300; qwen2_vl accepts at most 200"),
    case("encode_text with None", lambda e: e.model.encode_text(["a", None], processor=e.processor), TypeError,
         r"^item 1: encode_text expects str, got NoneType"),
    case("encode_image with a number", lambda e: e.model.encode_image([3], processor=e.processor), TypeError,
         r"^item 0: encode_image expects a PIL.Image or a path, got int"),
]


@pytest.mark.parametrize("call, error, match", ENCODE_CASES)
def test_encode_refuses_bad_items_by_name(env, backbone_must_not_run, call, error, match):
    with pytest.raises(error, match=match):
        call(env)


PROCESSOR_CASES = [
    case("empty text", lambda p, r: p(text=["a", ""]), ValueError, r"^text\[1\]: text is empty"),
    case("int text", lambda p, r: p(text=[3]), TypeError, r"^text\[0\]: expected text as str, got int"),
    case("lone surrogate", lambda p, r: p(text=["\udcff"]), ValueError, r"^text\[0\]: text is not valid Unicode"),
    case("image placeholder in text", lambda p, r: p(text=["x <|image_pad|>"]), ValueError,
         r"^text\[0\]: text contains the backbone's image placeholder"),
    case("neither text nor image", lambda p, r: p(text=["a", None], images=[None, None]), ValueError,
         r"^item 1 has neither text nor image"),
    case("nothing", lambda p, r: p(), ValueError, r"needs `text`, `images` or both"),
    case("empty batch", lambda p, r: p(text=[]), ValueError, r"empty batch"),
    case("int image", lambda p, r: p(images=[3]), TypeError, r"^images\[0\]: expected a PIL.Image"),
    case("missing image path", lambda p, r: p(images=[str(r / "missing.png")]), ValueError,
         r"^images\[0\]: image file '.*missing\.png' does not exist"),
    case("truncated image file", lambda p, r: p(images=[r / "ok.png", r / "truncated.png"]), ValueError,
         r"^images\[1\]: cannot read image file '.*truncated\.png'"),
    case("texts and images of different counts", lambda p, r: p(text=["a", "b"], images=[r / "ok.png"]),
         ValueError, r"got 2 texts and 1 images"),
    case("unknown prompt style", lambda p, r: p(text=["a"], prompt_style="chat"), ValueError,
         r"prompt_style='chat'; expected one of"),
]


@pytest.mark.parametrize("call, error, match", PROCESSOR_CASES)
def test_processor_refuses_bad_items_by_name(env, call, error, match):
    with pytest.raises(error, match=match):
        call(env.processor, env.root)


# ---- MMEB evaluation rows ---------------------------------------------------------------------

GOOD_EVAL_ROW = {"qry_text": "find the red one", "qry_img_path": "", "tgt_text": ["red", "blue"],
                 "tgt_img_path": ["", ""]}


def eval_row(**changes):
    row = {**GOOD_EVAL_ROW, **changes}
    return {key: value for key, value in row.items() if value is not ...}


EVAL_CASES = [
    case("missing field", [GOOD_EVAL_ROW, eval_row(tgt_img_path=...)], ValueError,
         r"^dataset 'toy' row 1: missing field\(s\) \['tgt_img_path'\]"),
    case("empty candidate list", [eval_row(tgt_text=[], tgt_img_path=[])], ValueError,
         r"^dataset 'toy' row 0: empty candidate list"),
    case("candidate lists of different lengths", [eval_row(tgt_img_path=[""])], ValueError,
         r"^dataset 'toy' row 0: tgt_text has 2 entries but tgt_img_path has 1"),
    case("candidates not a list", [eval_row(tgt_text="red")], ValueError, r"^dataset 'toy' row 0: .*must be lists"),
    case("row not a dict", [GOOD_EVAL_ROW, ["a", "b"]], ValueError, r"^dataset 'toy' row 1: expected a dict"),
    case("query without text or image", [eval_row(qry_text="")], ValueError,
         r"^dataset 'toy' row 0: query needs a text or an image path"),
    case("candidate of the wrong type", [eval_row(tgt_text=[5, "blue"])], ValueError,
         r"^dataset 'toy' row 0: candidate 0 needs a text or an image path \(strings\), got 5"),
    case("no rows", [], ValueError, r"^dataset 'toy' has no rows"),
    case("missing candidate image", [eval_row(tgt_img_path=["missing.png", ""])], ValueError,
         r"^cannot read image '.*missing\.png'"),
    case("truncated candidate image", [eval_row(tgt_img_path=["", "truncated.jpg"])], ValueError,
         r"^cannot read image '.*truncated\.jpg'"),
    case("decompression-bomb query image", [eval_row(qry_img_path="huge.png")], ValueError,
         r"^cannot read image '.*huge\.png'.*decompression bomb"),
    case("non-image query image", [eval_row(qry_img_path="not_an_image.png")], ValueError,
         r"^cannot read image '.*not_an_image\.png'"),
]


@pytest.mark.parametrize("rows, error, match", EVAL_CASES)
def test_mmeb_evaluation_refuses_bad_rows_before_encoding(env, rows, error, match):
    def encoder_must_not_run(items, style):
        raise AssertionError("a bad row reached the encoder")

    with pytest.raises(error, match=match):
        evaluate_mmeb({"toy": rows}, encoder_must_not_run, image_root=env.root)


def test_mmeb_evaluation_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "toy.jsonl").write_text(json.dumps(GOOD_EVAL_ROW) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"^cannot read '.*toy\.jsonl' line 2: not valid JSON"):
        evaluate_mmeb(tmp_path, lambda items, style: None)


# ---- MMEB-train rows (stage-2 data) -----------------------------------------------------------

GOOD_PAIR = {"qry": "<|image_1|> Represent the image.", "qry_image_path": "ok.png", "pos_text": "a picture",
             "pos_image_path": ""}


def pair(**changes):
    row = {**GOOD_PAIR, **changes}
    return {key: value for key, value in row.items() if value is not ...}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


TRAIN_TABLE_CASES = [
    case("column missing everywhere", [pair(pos_image_path=...)] * 2, ValueError,
         r"^file '.*pairs\.jsonl' lacks MMEB-train fields \['pos_image_path'\]"),
    case("field missing in one row", [GOOD_PAIR, pair(qry=...)], ValueError,
         r"^MMEB record \(file '.*pairs\.jsonl', row 1\): field 'qry' must be a string"),
    case("None field", [GOOD_PAIR, GOOD_PAIR, pair(pos_text=None)], ValueError,
         r"^MMEB record \(file '.*pairs\.jsonl', row 2\): field 'pos_text' must be a string .*got None"),
    case("list field", [GOOD_PAIR, pair(pos_text=["a"])], ValueError,
         r"^MMEB record \(file '.*pairs\.jsonl', row 1\): field 'pos_text' must be a string .*got \['a'\]"),
    case("both sides of a pair empty", [pair(pos_text=" ")], ValueError,
         r"^MMEB record \(file '.*pairs\.jsonl', row 0\): 'pos_text' and 'pos_image_path' are both empty"),
    case("<|image_1|> without an image", [pair(qry_image_path="")], ValueError,
         r"^MMEB record \(file '.*pairs\.jsonl', row 0\): 'qry' contains <\|image_1\|> but 'qry_image_path' is empty"),
    case("not JSON", [GOOD_PAIR, "{not json"], ValueError,
         r"^'.*pairs\.jsonl', line 2: not valid JSON"),
    case("empty file", [], ValueError, r"^data file '.*pairs\.jsonl' is empty"),
]


@pytest.mark.parametrize("rows, error, match", TRAIN_TABLE_CASES)
def test_mmeb_train_refuses_bad_records_by_row(tmp_path, rows, error, match):
    with pytest.raises(error, match=match):
        load_mmeb_train(write_jsonl(tmp_path / "pairs.jsonl", rows))


COLLATOR_CASES = [
    pytest.param("missing.png", r"image file '.*missing\.png' does not exist", id="missing image"),
    pytest.param("truncated.png", r"cannot read image file '.*truncated\.png'", id="truncated image"),
    pytest.param("not_an_image.png", r"cannot read image file '.*not_an_image\.png'", id="non-image file"),
    pytest.param("huge.png", r"cannot read image file '.*huge\.png'", id="decompression bomb"),
]


@pytest.mark.parametrize("bad_file, match", COLLATOR_CASES)
def test_mmeb_collator_names_file_and_row_of_an_unreadable_image(env, bad_file, match):
    rows = load_mmeb_train(datasets.Dataset.from_list([GOOD_PAIR, pair(qry_image_path=bad_file)]))
    collator = MMEBCollator(env.processor, image_root=env.root, image_size=28)
    with pytest.raises(BadImageError, match=r"^MMEB record \(subset 'train', row 1\), 'qry_image_path': " + match):
        collator([rows[0], rows[1]])


def test_collator_counts_skipped_pairs(env, caplog):
    """`skip_bad_images=True`: the documented, counted skip (per batch and per collator), logged."""
    rows = load_mmeb_train(datasets.Dataset.from_list([GOOD_PAIR, pair(qry_image_path="missing.png"), GOOD_PAIR]))
    collator = MMEBCollator(env.processor, image_root=env.root, image_size=28, skip_bad_images=True)
    batch = collator([rows[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and collator.num_skipped == 1
    assert batch["query"]["input_ids"].shape[0] == batch["target"]["input_ids"].shape[0] == 2
    assert re.search(r"skipping an MMEB pair \(.*row 1.*missing\.png", caplog.text)
    with pytest.raises(BadImageError, match=r"all 1 pairs of this batch had a missing or unreadable image"):
        collator([rows[1]])
    assert collator.num_skipped == 2


# ---- stage-1 data and teacher caches ----------------------------------------------------------

TEXTS = ["a cat sleeps on the sofa", "a dog runs in the park", "a bird sings at dawn"]


def fixed_teacher(texts):
    return torch.randn(len(texts), 4, generator=torch.Generator().manual_seed(len(texts)))


def texts_table(texts, column="text"):
    return datasets.Dataset.from_dict({column: texts})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """`good.safetensors` (3 texts, dimension 4) and damaged copies with the same metadata."""
    root = tmp_path_factory.mktemp("teacher_caches")
    good = root / "good.safetensors"
    build_teacher_cache(texts_table(TEXTS), None, fixed_teacher, good, teacher_name="fixed", show_progress_bar=False)
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    nan_rows = load_file(str(good))["text"].clone()
    nan_rows[1, 0] = float("nan")
    damaged = {"wider": {"text": torch.randn(3, 5)}, "flat": {"text": torch.randn(12)},
               "integer": {"text": torch.ones(3, 4, dtype=torch.int64)}, "nan": {"text": nan_rows},
               "unlisted": {"other": torch.randn(3, 4)}}
    for name, tensors in damaged.items():
        save_file(tensors, str(root / f"{name}.safetensors"), metadata=metadata)
    save_file({"text": torch.randn(3, 4)}, str(root / "plain.safetensors"))
    (root / "text.safetensors").write_text("not a safetensors file")
    return root


def distil(texts, cache_name, **kwargs):
    return lambda root: load_distillation_dataset(texts_table(texts), root / cache_name, **kwargs)


STAGE1_CASES = [
    case("empty text", distil(["a", "", "c"], "good.safetensors"), ValueError,
         r"^row 1, column 'text': expected a non-empty string, got ''"),
    case("None text", distil(["a", "b", None], "good.safetensors"), ValueError,
         r"^row 2, column 'text': expected a non-empty string, got None"),
    case("requested column missing", distil(TEXTS, "good.safetensors", columns=["sent0"]), ValueError,
         r"^column 'sent0' not found; available columns are \['text'\]"),
    case("no known text column", lambda root: load_distillation_dataset(texts_table(TEXTS, "sentence"),
                                                                        root / "good.safetensors"),
         ValueError, r"^no stage-1 text columns found.*available columns are \['sentence'\]"),
    case("missing data file", lambda root: load_distillation_dataset(root / "nope.jsonl", root / "good.safetensors"),
         ValueError, r"^data path '.*nope\.jsonl' does not exist"),
    case("cache built for fewer rows", distil([*TEXTS, "a fourth text"], "good.safetensors"), ValueError,
         r"^teacher cache '.*good\.safetensors' does not match the dataset: num_rows: cache has 3, expected 4"),
    case("cache built for other texts", distil(["x", "y", "z"], "good.safetensors"), ValueError,
         r"^teacher cache '.*good\.safetensors' does not match.*texts of column 'text' differ"),
    case("tensor wider than its metadata", distil(TEXTS, "wider.safetensors"), ValueError,
         r"^teacher cache '.*wider\.safetensors', column 'text': holds a torch.float32 tensor of shape \(3, 5\), "
         r"expected floats of shape \[num_rows, dimension\] = \[3, 4\]"),
    case("1-D tensor", distil(TEXTS, "flat.safetensors"), ValueError,
         r"^teacher cache '.*flat\.safetensors', column 'text': holds .* shape \(12,\)"),
    case("integer tensor", distil(TEXTS, "integer.safetensors"), ValueError,
         r"^teacher cache '.*integer\.safetensors', column 'text': holds a torch.int64 tensor"),
    case("NaN embedding", distil(TEXTS, "nan.safetensors"), ValueError,
         r"^teacher cache '.*nan\.safetensors', column 'text': the embedding of row 1 is not finite"),
    case("listed column not stored", distil(TEXTS, "unlisted.safetensors"), ValueError,
         r"^teacher cache '.*unlisted\.safetensors', column 'text': listed in the metadata but"),
    case("safetensors file without cache metadata", distil(TEXTS, "plain.safetensors"), ValueError,
         r"^'.*plain\.safetensors' is not a teacher cache"),
    case("not a safetensors file", distil(TEXTS, "text.safetensors"), ValueError,
         r"^'.*text\.safetensors' is not a safetensors file"),
    case("missing cache", distil(TEXTS, "nope.safetensors"), ValueError,
         r"^teacher cache '.*nope\.safetensors' does not exist"),
]


@pytest.mark.parametrize("call, error, match", STAGE1_CASES)
def test_stage1_data_and_teacher_cache_refused_by_name(caches, call, error, match):
    with pytest.raises(error, match=match):
        call(caches)


def test_the_good_cache_loads(caches):
    table = load_distillation_dataset(texts_table(TEXTS), caches / "good.safetensors")
    expected = torch.nn.functional.normalize(fixed_teacher(TEXTS), dim=-1)
    assert torch.equal(torch.stack([row["teacher_text"] for row in table]), expected)


# ---- configs and checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(qwen2_vl_model, backbone_checkpoints, tmp_path_factory):
    """A saved tiny UniME checkpoint (`full`) and broken copies of it."""
    root = tmp_path_factory.mktemp("checkpoints")
    model, processor = qwen2_vl_model
    model.save_pretrained(root / "full")
    processor.save_pretrained(root / "full")
    for name in ("no_weights", "truncated", "partial", "bert_backbone"):
        shutil.copytree(root / "full", root / name)
    (root / "no_weights" / "model.safetensors").unlink()
    weights = (root / "full" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    state = load_file(str(root / "full" / "model.safetensors"))
    kept = {k: v for k, v in state.items() if ".layers.1.mlp." not in k}
    save_file(kept, str(root / "partial" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "full" / "config.json").read_text())
    config["backbone_config"] = transformers.BertConfig().to_dict()
    (root / "bert_backbone" / "config.json").write_text(json.dumps(config))
    weightless = root / "run" / "checkpoint-1"  # a Trainer checkpoint whose adapter weights were lost
    weightless.mkdir(parents=True)
    (weightless / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    (weightless / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (root / "bert").mkdir()
    transformers.BertConfig().save_pretrained(root / "bert")
    partial_backbone = shutil.copytree(backbone_checkpoints("qwen2_vl"), root / "partial_backbone")
    state = load_file(str(partial_backbone / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, str(partial_backbone / "model.safetensors"),
              metadata={"format": "pt"})
    return root


def auto_load(name):
    return lambda root: transformers.AutoModel.from_pretrained(str(root / name), trust_remote_code=True)


def resume_from(name):
    def run(root):
        model, processor = tiny_unime("qwen2_vl")
        args = DistillationConfig(output_dir=str(root / "run"), use_cpu=True, report_to=[], max_steps=1, lora_rank=2)
        trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor)
        trainer.train(resume_from_checkpoint=str(root / name))
    return run


CHECKPOINT_CASES = [
    case("config naming an unsupported backbone", lambda root: UniMEConfig(backbone_config=transformers.BertConfig()),
         ValueError, r"^Unsupported backbone model_type 'bert'; supported backbones are"),
    case("config dict naming an unknown model type",
         lambda root: UniMEConfig(backbone_config={"model_type": "no_such_model"}), ValueError, r"no_such_model"),
    case("saved checkpoint with a BERT backbone", auto_load("bert_backbone"), ValueError,
         r"^Unsupported backbone model_type 'bert'"),
    case("backbone checkpoint of an unsupported model", lambda root: UniMEModel.from_backbone(str(root / "bert")),
         ValueError, r"^Unsupported backbone model_type 'bert'"),
    case("processor for an unsupported family", lambda root: UniMEProcessor(backbone_family="bert"), ValueError,
         r"^backbone_family='bert' is not supported"),
    case("checkpoint without its weights file", auto_load("no_weights"), OSError,
         r"no file named model\.safetensors found in directory .*no_weights"),
    case("truncated weights file", auto_load("truncated"), ValueError,
         r"^weights file '.*truncated/model\.safetensors' is truncated"),
    case("checkpoint missing weights", auto_load("partial"), ValueError, r"partial.* missing .*layers\.1\.mlp"),
    case("backbone checkpoint missing weights", lambda root: UniMEModel.from_backbone(str(root / "partial_backbone")),
         ValueError, r"partial_backbone' is missing \d+ backbone weights"),
    case("resume from a checkpoint without weights", resume_from("run/checkpoint-1"), ValueError,
         r"Can't find a valid checkpoint at .*run/checkpoint-1"),
    case("trainer args of the wrong type",
         lambda root: UniMEDistillationTrainer(model=None, args=HardNegativeConfig(output_dir=str(root / "x"))),
         TypeError, r"^args must be a DistillationConfig, got HardNegativeConfig"),
]


@pytest.mark.parametrize("call, error, match", CHECKPOINT_CASES)
def test_bad_configs_and_checkpoints_are_refused_by_name(checkpoints, call, error, match):
    with pytest.raises(error, match=match):
        call(checkpoints)
