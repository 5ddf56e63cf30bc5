"""Validation of user items for `UniMEModel.encode` and `UniMEProcessor` (one place for the rules)."""

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# What PIL raises for an undecodable image, depending on the format (a closed file: AssertionError).
_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, AssertionError, Image.DecompressionBombError)


def load_image(image, where):
    """Return an RGB `PIL.Image` from a PIL image or a file path; `ValueError` naming `where` otherwise."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            problem = "is not a file" if path.exists() else "does not exist"
            raise ValueError(f"{where}: image file {str(path)!r} {problem}")
        try:
            with Image.open(path) as opened:
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
        return image if image.mode == "RGB" else image.convert("RGB")
    except _PIL_DECODE_ERRORS as error:
        raise ValueError(f"{where}: cannot decode the image ({type(error).__name__}: {error})") from error


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
