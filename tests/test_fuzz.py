"""Fuzz (hypothesis) of the processor + encode path with random texts and small images (issue 7).

Texts: any Unicode (lone surrogates and control characters included), whitespace-only and
zero-width strings, and short strings around the special tokens (`<|image_pad|>`, `<|image_1|>`,
chat tokens). Images: 1..64 x 1..64 pixels, modes L / RGB / RGBA / CMYK / P, random pixels. Items:
texts, images, or both (fused), in batches of 1-3, in summary or instruction prompt style.

An independent oracle (`problem`) says which items are invalid: an empty / whitespace text, a lone
surrogate, a backbone placeholder token inside a text, and in instruction style `<|image_1|>`
without an image or more than once. Valid batches must embed (finite, unit-norm rows); invalid ones
must raise the documented `ValueError` naming the item. Nothing else may escape.
"""

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
