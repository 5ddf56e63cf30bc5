"""Validation of user items for `UniMEModel.encode` and `UniMEProcessor` (one place for the rules)."""

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# What PIL raises for an undecodable image, depending on the format (a closed file: AssertionError).
_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, AssertionError, Image.DecompressionBombError)


# Decoded images above this many pixels are downscaled (aspect ratio kept) before any other work: every
# backbone resizes far below it anyway (Qwen2-VL's default max_pixels is 12845056, LLaVA tiles 336 px),
# and a 20000 x 20000 image would otherwise cost gigabytes and a minute in the image processor.
MAX_IMAGE_PIXELS = 4096 * 4096

# Integer modes wider than 8 bits, read as their full range (65535 is white), and the float mode.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(image, where):
    """Return an RGB `PIL.Image` from a PIL image or a file path; `ValueError` naming `where` otherwise.

    Conversion:
    - larger than `MAX_IMAGE_PIXELS`: downscaled to fit it (aspect ratio kept, bicubic) before conversion;
      a file PIL refuses as a decompression bomb (over twice `PIL.Image.MAX_IMAGE_PIXELS`) is a `ValueError`;
    - 16/32-bit integer and float images: scaled to 8 bits (see `wide_to_8bit`), not clipped to white;
    - images with transparency (RGBA, LA, PA, P with a transparent colour): composited on white, as
      transformers' `convert_to_rgb` does; CMYK, palette, 1-bit, YCbCr, HSV, LAB: PIL's conversion.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            problem = "is not a file" if path.exists() else "does not exist"
            raise ValueError(f"{where}: image file {str(path)!r} {problem}")
        try:
            with Image.open(path) as opened:
                _draft(opened)
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, *_PIL_DECODE_ERRORS) as error:
            raise ValueError(f"{where}: cannot read image file {str(path)!r} ({error})") from error
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where}: expected a PIL.Image or an image path, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{where}: image has zero size {image.size}")
    try:
        # A PIL image opened lazily (`Image.open` without `load`) decodes only now: a truncated or
        # already-closed file fails here rather than inside the backbone's image processor.
        image.load()
        image = downscale(image)
    except _PIL_DECODE_ERRORS as error:
        raise ValueError(f"{where}: cannot decode the image ({type(error).__name__}: {error})") from error
    return to_rgb(image, where)


def _draft(opened):
    # JPEG decodes directly at 1/2, 1/4 or 1/8 scale when asked: a huge photo is never decoded at full size.
    if opened.width * opened.height > MAX_IMAGE_PIXELS and opened.format == "JPEG":
        scale = math.sqrt(MAX_IMAGE_PIXELS / (opened.width * opened.height))
        opened.draft(opened.mode, (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))


def downscale(image, max_pixels=MAX_IMAGE_PIXELS):
    """`image` if it has at most `max_pixels` pixels, else a bicubic downscale (aspect ratio kept) that fits."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / pixels)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    # reducing_gap=1: a box reduction by the integer factor first, then bicubic (seconds, not a minute).
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=1.0)


def wide_to_8bit(image, where):
    """An 8-bit `L` image from a 16/32-bit integer or float image, scaled by the range its values use.

    `I;16*`: value / 257 (0..65535 -> 0..255). `I` (32-bit): kept if within 0..255, / 257 if within
    0..65535, else stretched from min to max. `F`: x 255 if within 0..1, kept if within 0..255, else
    stretched from min to max. A constant image outside those ranges becomes black. NaN/Inf pixels:
    `ValueError` naming `where`.
    """
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: float image (mode F) has NaN or infinite pixels")
    low, high = values.min(), values.max()
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif not (low >= 0 and high <= 255):
        values = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image, where):
    """RGB version of `image` (see `load_image` for each mode); `ValueError` naming `where` if PIL cannot."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return wide_to_8bit(image, where).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"{where}: cannot convert an image of mode {image.mode!r} to RGB ({error})") from None


def check_unicode(text, where):
    """Raise `ValueError` naming `where` if `text` cannot be encoded as UTF-8 (a lone surrogate),
    which the fast tokenizers refuse with an unhelpful `TypeError`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: text is not valid Unicode ({error.reason} at character {error.start})") from None
    return text


def check_text(text, where):
    """Return `text` if it is a non-empty string; raise naming `where` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected text as str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: text is empty")
    return check_unicode(text, where)


def normalize_item(item, index):
    """Turn one `encode` item into `(text or None, RGB image or None)`.

    Accepted: `str` (text), `PIL.Image` or `pathlib.Path` (image), or a dict with keys `image`
    (PIL image or path) and/or `text`.
    """
    where = f"item {index}"
    if item is None:
        raise ValueError(f"{where} is None; expected text, an image or a dict with 'image'/'text'")
    if isinstance(item, str):
        return check_text(item, where), None
    if isinstance(item, (Image.Image, Path)):
        return None, load_image(item, where)
    if isinstance(item, dict):
        unknown = set(item) - {"image", "text"}
        if unknown or not item:
            raise ValueError(f"{where}: dict items need 'image' and/or 'text' keys, got {sorted(item)}")
        text = item.get("text")
        image = item.get("image")
        if text is None and image is None:
            raise ValueError(f"{where}: both 'image' and 'text' are None")
        text = None if text is None else check_text(text, where)
        image = None if image is None else load_image(image, where)
        return text, image
    if isinstance(item, os.PathLike):
        return None, load_image(Path(item), where)
    raise TypeError(
        f"{where}: expected str, PIL.Image, pathlib.Path or dict with 'image'/'text', got {type(item).__name__}"
    )
