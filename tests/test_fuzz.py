"""Fuzz (hypothesis) of the processor + encode path with random texts and small images (issue 7).

Texts: any Unicode (lone surrogates and control characters included), whitespace-only and
zero-width strings, and short strings around the special tokens (`<|image_pad|>`, `<|image_1|>`,
chat tokens). Images: 1..64 x 1..64 pixels, modes L / RGB / RGBA / CMYK / P, random pixels. Items:
texts, images, or both (fused), in batches of 1-3, in summary or instruction prompt style.

An independent oracle (`problem`) says which items are invalid: an empty / whitespace text, a lone
surrogate, a backbone placeholder token inside a text, and in instruction style `<|image_1|>`
without an image or more than once. Valid batches must embed (finite, unit-norm rows); invalid ones
must raise the documented `ValueError` naming the item. Nothing else may escape.

Constructors (issue 14): `UniMEConfig`, `UniMEProcessor` and the training configs get random field values
and prompt-template tables; an oracle written from the contract says which are invalid, and the error
must start with the name of an invalid field.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from training.demo.tiny_models import tiny_unime

# The backbone processor's image / video tokens: inside a user text they would not match the images.
PLACEHOLDERS = {"qwen2_vl": ("<|image_pad|>", "<|video_pad|>"), "llava_onevision": ("<image>", "<video>")}
MMEB_IMAGE = "<|image_1|>"
MODES = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "P": 1}
FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL = st.sampled_from(["a", ".", " ", "dog", "<|image_pad|>", "<|video_pad|>", MMEB_IMAGE, "<|im_end|>",
                           "<|vision_start|>", "<image>", "<video>", "\u200b", "\x00", "\ud800"])
TEXTS = st.one_of(
    st.text(st.characters(exclude_categories=[]), max_size=12),  # any code point, surrogates too
    st.text(alphabet=" \t\n\r\x0b\x0c\u3000\u00a0\u200b", max_size=4),
    st.lists(SPECIAL, min_size=1, max_size=3).map("".join),
)


@st.composite
def images(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = rng.integers(0, 256, width * height * MODES[mode], np.uint8).tobytes()
    image = Image.frombytes(mode, (width, height), pixels)
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    return image


ITEMS = st.one_of(TEXTS, images(), st.fixed_dictionaries({"image": images(), "text": TEXTS}))


def parts(item):
    """`(text or None, has_image)` of an encode item."""
    if isinstance(item, str):
        return item, False
    if isinstance(item, Image.Image):
        return None, True
    return item["text"], True


def problem(text, has_image, prompt_style, placeholders):
    """Why an item is invalid, or None. "named" problems are refused before any batch is built, with
    a message starting with the item's name; "prompt" problems while building its prompt."""
    if text is not None:
        if not text.strip():
            return "named"
        if any(0xD800 <= ord(char) <= 0xDFFF for char in text):
            return "named"
        if any(token in text for token in placeholders):
            return "named"
    if prompt_style == "instruction" and text is not None:
        count = text.count(MMEB_IMAGE)
        if (count and not has_image) or count > 1:
            return "prompt"
    return None


def assert_unit_rows(embeddings, rows):
    event("valid batch embedded")
    assert embeddings.shape == (rows, 32)
    assert torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(rows), atol=1e-5, rtol=0)


def assert_refused(error, problems, name):
    event("invalid batch refused")
    named = [index for index, found in enumerate(problems) if found == "named"]
    if named:
        assert str(error).startswith(f"{name(named[0])}:"), str(error)
    else:
        assert "prompt" in problems and MMEB_IMAGE in str(error), str(error)


@pytest.fixture(scope="module", params=sorted(PLACEHOLDERS))
def tiny(request):
    """`(model, processor, placeholder tokens)` of a tiny backbone: Qwen2-VL (dynamic resolution)
    and LLaVA-OneVision (any-resolution tiling)."""
    return (*tiny_unime(request.param), PLACEHOLDERS[request.param])


@FUZZ
@given(items=st.lists(ITEMS, min_size=1, max_size=3), prompt_style=st.sampled_from(["summary", "instruction"]),
       batch_size=st.integers(1, 3))
def test_encode_embeds_valid_items_and_refuses_the_rest_by_name(tiny, items, prompt_style, batch_size):
    model, processor, placeholders = tiny
    problems = [problem(*parts(item), prompt_style, placeholders) for item in items]
    try:
        embeddings = model.encode(items, processor=processor, prompt_style=prompt_style, batch_size=batch_size)
    except (ValueError, TypeError) as error:
        assert any(problems), f"valid items refused: {error}"
        assert_refused(error, problems, lambda index: f"item {index}")
        return
    assert not any(problems), f"invalid items accepted: {problems}"
    assert_unit_rows(embeddings, len(items))


@FUZZ
@given(items=st.lists(ITEMS, min_size=1, max_size=3), prompt_style=st.sampled_from(["summary", "instruction"]))
def test_processor_output_runs_the_model_or_is_refused_by_name(tiny, items, prompt_style):
    model, processor, placeholders = tiny
    texts, flags = zip(*map(parts, items))
    pictures = [item if isinstance(item, Image.Image) else item.get("image") if isinstance(item, dict) else None
                for item in items]
    problems = [problem(text, has_image, prompt_style, placeholders) for text, has_image in zip(texts, flags)]
    try:
        batch = processor(text=list(texts), images=pictures, prompt_style=prompt_style)
    except (ValueError, TypeError) as error:
        assert any(problems), f"valid items refused: {error}"
        assert_refused(error, problems, lambda index: f"text[{index}]")
        return
    assert not any(problems), f"invalid items accepted: {problems}"
    with torch.inference_mode():
        assert_unit_rows(model(**batch).embeddings, len(items))


# ---- constructors: UniMEConfig, UniMEProcessor, the training configs (issue 14) ------------------

from transformers import Qwen2VLConfig  # noqa: E402

from modeling_unime import UniMEConfig, UniMEProcessor  # noqa: E402
from training.distillation import DistillationConfig  # noqa: E402
from training.hard_negative import HardNegativeConfig  # noqa: E402

MISSING = object()
TEMPLATE_VALUES = st.one_of(
    st.sampled_from(["<sent>", "<image> <sent>", "<image>", "plain", "", " ", "<image><sent><image>"]),
    st.text(st.sampled_from("<>sentimag "), max_size=14),
    st.sampled_from([None, 5, ["<sent>"], MISSING]),
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
AFFIX = st.text(st.sampled_from("ab \n:"), max_size=6)
VALID_TEMPLATES = st.builds(
    lambda a, b: {"text": f"{a}<sent>{b}", "image": f"{a}{QWEN_IMAGE}{b}", "fused": f"{QWEN_IMAGE}{a}<sent>{b}",
                  "image_token": QWEN_IMAGE}, AFFIX, AFFIX)
TEMPLATES = st.one_of(
    st.none(),
    VALID_TEMPLATES,
    VALID_TEMPLATES.flatmap(lambda table: st.sampled_from(sorted(table)).flatmap(
        lambda key: TEMPLATE_VALUES.map(lambda value: {k: v for k, v in {**table, key: value}.items()
                                                        if v is not MISSING}))),
    st.sampled_from(["<sent>", 3, ["text"]]),
    st.fixed_dictionaries({key: TEMPLATE_VALUES for key in ("text", "image", "fused", "image_token")}).map(
        lambda table: {key: value for key, value in table.items() if value is not MISSING}),
)
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from(["", "0.02", "forward", "qwen2_vl", "llava", "bert"]))


def mostly(valid, anything):
    """`valid` three times in four, else `anything` (so that all-valid combinations of several fields occur)."""
    return st.integers(0, 3).flatmap(lambda pick: valid if pick else anything)


def template_problem(templates):
    """Oracle for `prompt_templates`, written from the contract (DESIGN / issue 14), not from prompts.py."""
    if templates is None:
        return None
    if not isinstance(templates, dict):
        return "prompt_templates"
    keys = ("text", "image", "fused", "image_token")
    if any(key not in templates or not isinstance(templates[key], str) for key in keys):
        return "prompt_templates"
    token = templates["image_token"]
    if not token.strip() or "<sent>" not in templates["text"] or "<sent>" not in templates["fused"]:
        return "prompt_templates"
    if "<sent>" in templates["image"] or token not in templates["image"] or token not in templates["fused"]:
        return "prompt_templates"
    return None


def is_count(value, minimum=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def assert_named(error, problems):
    event("invalid values refused")
    assert problems, f"valid values refused: {error}"
    assert any(str(error).startswith(name) for name in problems), (str(error), problems)


@FUZZ
@given(templates=mostly(st.one_of(st.none(), VALID_TEMPLATES), TEMPLATES), normalize=mostly(st.booleans(), ANY_VALUE),
       max_length=mostly(st.one_of(st.none(), st.integers(1, 600)), ANY_VALUE), family=mostly(st.none(), ANY_VALUE))
def test_config_accepts_valid_values_and_names_the_bad_one(templates, normalize, max_length, family):
    problems = [name for name, bad in (
        ("prompt_templates", template_problem(templates) is not None),
        ("normalize", not isinstance(normalize, bool)),
        ("max_length", max_length is not None and not is_count(max_length)),
        ("backbone_family", family is not None and family not in ("qwen2_vl", "llava")),
    ) if bad]
    try:
        config = UniMEConfig(backbone_config=Qwen2VLConfig(), prompt_templates=templates, normalize=normalize,
                             max_length=max_length, backbone_family=family)
    except (TypeError, ValueError) as error:
        assert_named(error, problems)
        return
    event("valid values accepted")
    assert not problems, f"invalid values accepted: {problems}"
    assert UniMEConfig.from_dict(config.to_dict()).prompt_templates == templates  # a saved config loads back


@FUZZ
@given(templates=mostly(VALID_TEMPLATES, TEMPLATES))
def test_processor_constructor_checks_templates(qwen2_vl_model, templates):
    _, processor = qwen2_vl_model
    problem = template_problem(templates)
    try:
        built = UniMEProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                               backbone_family="qwen2_vl", prompt_templates=templates,
                               chat_template=processor.chat_template)
    except (TypeError, ValueError) as error:
        assert_named(error, [problem] if problem else [])
        return
    assert problem is None, f"invalid templates accepted: {templates!r}"
    if templates is not None:
        event("custom templates accepted")
        assert built(text=["a dog"])["input_ids"].shape[0] == 1


TRAINING_FIELDS = ("contrastive_temperature", "false_negative_margin", "num_hard_negatives", "image_size",
                   "max_length", "lora_rank", "lora_dropout", "kd_temperature")


def training_problems(values):
    """Oracle: which field values the contract refuses (temperatures > 0 finite; margin finite or None;
    counts positive ints or None; lora_rank int >= 0; dropout in [0, 1))."""
    checks = {
        "contrastive_temperature": lambda v: is_finite_number(v) and v > 0,
        "kd_temperature": lambda v: is_finite_number(v) and v > 0,
        "false_negative_margin": lambda v: v is None or is_finite_number(v),
        "num_hard_negatives": lambda v: v is None or is_count(v),
        "image_size": lambda v: v is None or is_count(v),
        "max_length": lambda v: v is None or is_count(v),
        "lora_rank": lambda v: is_count(v, 0),
        "lora_dropout": lambda v: is_finite_number(v) and 0 <= v < 1,
    }
    return [name for name, value in values.items() if not checks[name](value)]


@FUZZ
@given(values=st.dictionaries(st.sampled_from(TRAINING_FIELDS), ANY_VALUE, max_size=2),
       stage=st.sampled_from(["stage1", "stage2"]))
def test_training_configs_accept_valid_values_and_name_the_bad_one(tmp_path_factory, values, stage):
    stage_fields = {"stage1": ("kd_temperature", "max_length", "lora_rank", "lora_dropout")}
    if stage == "stage1":
        values = {k: v for k, v in values.items() if k in stage_fields["stage1"]}
    else:
        values = {k: v for k, v in values.items() if k != "kd_temperature"}
    problems = training_problems(values)
    config_class = DistillationConfig if stage == "stage1" else HardNegativeConfig
    try:
        config_class(output_dir=str(tmp_path_factory.getbasetemp() / "fuzz"), use_cpu=True, report_to=[], **values)
    except (TypeError, ValueError) as error:
        assert_named(error, problems)
        return
    event("valid training values accepted")
    assert not problems, f"invalid values accepted: {values}"
