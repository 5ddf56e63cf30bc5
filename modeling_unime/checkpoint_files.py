"""Checks of a local checkpoint folder before transformers reads it, so that a missing, empty, truncated or
wrong-kind file is refused with an error naming the file (transformers and safetensors would raise
`JSONDecodeError`, `SafetensorError: header too small` or a `TypeError` about `**` that name nothing).

Hub ids are left to transformers: their files are checked by the Hub's own hashes on download.
"""

import json
import os
from pathlib import Path

from .prompts import SUPPORTED_BACKBONES

# JSON files transformers or UniME read from a checkpoint folder; each must hold one JSON object.
JSON_FILES = (
    "config.json",
    "adapter_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "model.safetensors.index.json",
)


def local_folder(path_or_id, subfolder=None):
    """`Path` of `path_or_id` (joined with `subfolder`, if given) if it names a local folder, None for a Hub id.

    Raises:
        FileNotFoundError: `path_or_id` is written as a local path (absolute, or starting with `.` or
            `~`) but does not exist, or is a file.
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint folder or Hub id as str or path, got {type(path_or_id).__name__}")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    text = os.fspath(path_or_id)
    if path.exists() or os.path.isabs(text) or text.startswith((".", "~")):
        problem = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint folder {text!r} {problem}")
    return None


def read_json_object(file):
    """The JSON object stored in `file`; `ValueError` naming the file if it is empty, not JSON or not an object."""
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{str(file)!r} is empty ({Path(file).stat().st_size} bytes); expected a JSON object")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(file)!r} is not valid JSON (truncated?): {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(file)!r} holds a JSON {type(value).__name__}, expected a JSON object")
    return value


def check_json_files(folder):
    """Every JSON file of `JSON_FILES` present in `folder` holds one JSON object (see `read_json_object`)."""
    for name in JSON_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name)


def check_safetensors_files(folder):
    """Each `*.safetensors` file in `folder` has a complete header and is as long as the header says."""
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        if size < 8:
            raise ValueError(f"weights file {str(file)!r} is empty or truncated ({size} bytes)")
        with open(file, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = handle.read(header_size) if header_size <= size - 8 else b""
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"weights file {str(file)!r} is truncated or not a safetensors file "
                             f"({size} bytes; its header is incomplete)") from None
        end = max((entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"), default=0)
        if size != 8 + header_size + end:
            raise ValueError(f"weights file {str(file)!r} is truncated: {size} bytes, its header describes "
                             f"{8 + header_size + end}")


def check_unime_checkpoint(path_or_id, subfolder=None):
    """Refuse a local folder that is not a complete UniME checkpoint, naming the file at fault.

    Raises:
        FileNotFoundError: the folder does not exist or has no `config.json`.
        ValueError: `config.json` is not a JSON object or is a backbone's (then `from_backbone` is
            suggested), or a JSON or weights file is empty or truncated.
    """
    folder = local_folder(path_or_id, subfolder)
    if folder is None:
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no config.json: a UniME checkpoint folder holds the config.json and "
            "model.safetensors written by UniMEModel.save_pretrained"
        )
    model_type = read_json_object(folder / "config.json").get("model_type")
    if model_type in SUPPORTED_BACKBONES:
        raise ValueError(
            f"{str(folder)!r} is a {model_type} backbone checkpoint (config.json model_type={model_type!r}), not a "
            "UniME checkpoint; wrap it with UniMEModel.from_backbone(path) (and UniMEProcessor.from_backbone(path))"
        )
    if model_type != "unime":
        raise ValueError(f"{str(folder / 'config.json')!r} has model_type={model_type!r}; a UniME checkpoint has 'unime'")
    check_json_files(folder)
    check_safetensors_files(folder)


def check_processor_folder(path_or_id, subfolder=None):
    """Refuse a local processor folder whose JSON files are empty, truncated or not objects, naming the file."""
    folder = local_folder(path_or_id, subfolder)
    if folder is not None and folder.is_dir():
        check_json_files(folder)


def check_backbone_checkpoint(path_or_id):
    """Refuse a local folder that is not a complete backbone checkpoint for `from_backbone`, naming the file
    (a UniME checkpoint folder is pointed to `UniMEModel.from_pretrained`)."""
    folder = local_folder(path_or_id)
    if folder is None:
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: expected a backbone checkpoint folder "
                                "(a *ForConditionalGeneration save with config.json and *.safetensors)")
    if read_json_object(folder / "config.json").get("model_type") == "unime":
        raise ValueError(f"{str(folder)!r} is a UniME checkpoint, not a backbone; load it with "
                         "UniMEModel.from_pretrained(path) (or AutoModel with trust_remote_code=True)")
    check_json_files(folder)
    check_safetensors_files(folder)
