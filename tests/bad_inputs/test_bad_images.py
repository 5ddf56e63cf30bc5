"""Images that decode to something else (issue 14): wide (16/32-bit, float) images are scaled to 8 bits,
not clipped to white or black; transparency is composited on white (as transformers' `convert_to_rgb`);
huge images are downscaled before any heavy work; what cannot be converted is refused by name.

Expected pixels are written out literally from the formulas in the docstring of
`modeling_unime.inputs.wide_to_8bit` (16-bit: v / 257; float in [0, 1]: v x 255; else min-max)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_unime.inputs import MAX_IMAGE_PIXELS, load_image


def gray(values, dtype, mode=None):
    return Image.fromarray(np.array([values], dtype=dtype), mode=mode)


# (image, the 8-bit gray levels it must become)
WIDE = {
    "I;16": (lambda: gray([0, 257, 32896, 65535], np.uint16), [0, 1, 128, 255]),
    "I;16B": (lambda: Image.frombytes("I;16B", (4, 1), np.array([0, 257, 32896, 65535], ">u2").tobytes()),
              [0, 1, 128, 255]),
    "I 16-bit range": (lambda: gray([0, 1000, 40000, 65535], np.int32), [0, 4, 156, 255]),
    "I 8-bit range": (lambda: gray([0, 7, 128, 255], np.int32), [0, 7, 128, 255]),
    "I negative": (lambda: gray([-100, 0, 100, 155], np.int32), [0, 100, 200, 255]),
    "F in [0, 1]": (lambda: gray([0.0, 0.25, 0.5, 1.0], np.float32), [0, 64, 128, 255]),
    "F in [0, 255]": (lambda: gray([0.0, 10.4, 200.6, 255.0], np.float32), [0, 10, 201, 255]),
    "F stretched": (lambda: gray([-1.0, 0.0, 1.0, 3.0], np.float32), [0, 64, 128, 255]),
    "F constant outside": (lambda: gray([300.0] * 4, np.float32), [0, 0, 0, 0]),
}


@pytest.mark.parametrize("name", sorted(WIDE))
def test_wide_images_are_scaled_not_clipped(name):
    make, levels = WIDE[name]
    image = make()
    assert image.mode == name.split()[0]
    rgb = np.asarray(load_image(image, "item 0"))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == levels and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_a_16_bit_png_file_keeps_its_gray_levels(tmp_path):
    path = tmp_path / "depth.png"
    gray([0, 257, 32896, 65535], np.uint16).save(path)
    assert np.asarray(load_image(path, "item 0"))[0, :, 0].tolist() == [0, 1, 128, 255]


TRANSPARENT = {
    "RGBA": (lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [200, 100, 0, 255], [0, 0, 200, 128]]], np.uint8)),
             [[255, 255, 255], [200, 100, 0], [127, 127, 227]]),
    "LA": (lambda: Image.fromarray(np.array([[[0, 0], [90, 255], [0, 51]]], np.uint8), mode="LA"),
           [[255, 255, 255], [90, 90, 90], [204, 204, 204]]),
    "P with a transparent colour": (lambda: _palette_with_transparency(), [[255, 255, 255], [0, 255, 0]]),
    "CMYK": (lambda: Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0])), [[255, 255, 255], [0, 255, 255]]),
}


def _palette_with_transparency():
    image = Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("name", sorted(TRANSPARENT))
def test_transparency_becomes_white_and_cmyk_converts(name):
    make, expected = TRANSPARENT[name]
    assert np.asarray(load_image(make(), "item 0"))[0].tolist() == expected


def test_huge_images_are_downscaled_before_conversion(tmp_path):
    assert MAX_IMAGE_PIXELS == 4096 * 4096
    huge = Image.new("I;16", (8000, 4000), 65535)  # 32M pixels: scale sqrt(16777216 / 32e6) = 0.7241
    small = load_image(huge, "item 0")
    assert (small.mode, small.size) == ("RGB", (5792, 2896))
    assert small.getextrema() == ((255, 255),) * 3  # white stays white through resize and 16-bit scaling
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 4000), (0, 128, 255)).save(path, quality=95)
    decoded = load_image(path, "item 0")  # from a file: the same size (JPEG may decode at a reduced scale first)
    assert decoded.size == (5792, 2896)
    assert math.isclose(np.asarray(decoded)[1000, 2000, 2], 255, abs_tol=2)
    exact = Image.new("RGB", (4096, 4096))
    assert load_image(exact, "item 0") is exact  # at the cap: untouched


def test_encode_sees_the_scaled_image(qwen2_vl_model):
    """Through the public door: a 16-bit image embeds exactly as its expected 8-bit RGB version."""
    model, processor = qwen2_vl_model
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (28, 28)).astype(np.uint16)
    wide = Image.fromarray(levels * 257)
    expected = Image.fromarray(np.repeat(levels.astype(np.uint8)[..., None], 3, axis=2))
    white = Image.new("RGB", (28, 28), (255, 255, 255))
    got = model.encode([wide, expected, white], processor=processor)
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])


def case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


def float_image(value):
    return gray([0.0, value], np.float32)


CASES = [
    case("float image with NaN", lambda e, p: e([float_image(math.nan)], processor=p), ValueError,
         r"^item 0: float image \(mode F\) has NaN or infinite pixels"),
    case("float image with inf", lambda e, p: e(["ok", {"image": float_image(math.inf), "text": "x"}], processor=p),
         ValueError, r"^item 1: float image \(mode F\) has NaN or infinite pixels"),
    case("mode without an RGB conversion", lambda e, p: e([Image.new("La", (4, 4))], processor=p), ValueError,
         r"^item 0: cannot convert an image of mode 'La' to RGB"),
    case("processor: float image with NaN", lambda e, p: p(text=["a", "b"], images=[None, float_image(math.nan)]),
         ValueError, r"^images\[1\]: float image \(mode F\) has NaN"),
    case("processor: La image", lambda e, p: p(images=[Image.new("La", (4, 4))]), ValueError,
         r"^images\[0\]: cannot convert an image of mode 'La'"),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_images_that_cannot_be_converted_are_refused_by_name(qwen2_vl_model, call, error, match):
    model, processor = qwen2_vl_model
    with pytest.raises(error, match=match):
        call(model.encode, processor)
