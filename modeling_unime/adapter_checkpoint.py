"""LoRA checkpoints written during training, and the base model they load on.

A Trainer checkpoint of a LoRA run holds the adapters (`adapter_config.json`, `adapter_model.safetensors`),
the processor and, written by the UniME trainers, the UniME `config.json` with a record of the base model:

    "unime_adapter_base": {"name_or_path": "/abs/path/s1/merged", "relative_path": "../../s1/merged"}

peft alone stores one `base_model_name_or_path`, which breaks when the run's folders are copied to another
machine (or the base was given as a relative path). `UniMEModel.from_pretrained(checkpoint)` (and so
`AutoModel.from_pretrained(checkpoint, trust_remote_code=True)`) looks for the base in order: the
`base_model_name_or_path=` argument, the recorded absolute path or Hub id, then the recorded path relative
to the checkpoint (the run and its base copied together), and loads the adapters on it.
"""

import json
import os
from pathlib import Path

from .checkpoint_files import read_json_object

ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_RECORD_KEY = "unime_adapter_base"
# Weight files of a complete model: a folder holding one of them is a model, not an adapter checkpoint.
FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def base_model_record(base_name_or_path, checkpoint_dir):
    """The base-model record a checkpoint in `checkpoint_dir` stores (see the module docstring).

    Args:
        base_name_or_path (`str`): the base model's folder (made absolute) or Hub id, as peft recorded it.
        checkpoint_dir (`str` or `os.PathLike`): where the checkpoint will finally live (not a staging folder).

    Returns:
        `dict` with `name_or_path`, plus `relative_path` (POSIX, from `checkpoint_dir`) for a local folder;
        `None` when the model was built from a config and has no base to record.
    """
    if not base_name_or_path:
        return None
    if not os.path.isdir(base_name_or_path):
        return {"name_or_path": str(base_name_or_path)}
    base = os.path.abspath(base_name_or_path)
    relative = os.path.relpath(base, os.path.abspath(checkpoint_dir))
    return {"name_or_path": base, "relative_path": Path(relative).as_posix()}


def adapter_checkpoint_folder(path_or_id, subfolder=None):
    """`Path` of a local UniME LoRA checkpoint (adapter files + a `config.json` with the base record and no
    full weights), else None (a complete model, a Hub id, or a folder of another kind)."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        return None
    folder = Path(path_or_id).expanduser()
    folder = folder / subfolder if subfolder else folder
    if not (folder / ADAPTER_CONFIG_FILE).is_file() or not (folder / "config.json").is_file():
        return None
    if any((folder / name).is_file() for name in FULL_WEIGHT_FILES):
        return None
    return folder if BASE_RECORD_KEY in read_json_object(folder / "config.json") else None


def resolve_adapter_base(folder, base_model_name_or_path=None):
    """Where the base model of the LoRA checkpoint in `folder` is.

    Args:
        folder (`Path`): a folder `adapter_checkpoint_folder` accepted.
        base_model_name_or_path (`str`, *optional*): given by the user; used as is.

    Returns:
        `str`: a local folder or a Hub id.

    Raises:
        FileNotFoundError: no recorded place holds the base model (each place tried is named).
        ValueError: the record is malformed, or the checkpoint records no base model.
    """
    if base_model_name_or_path is not None:
        return os.fspath(base_model_name_or_path)
    config_file = folder / "config.json"
    record = read_json_object(config_file)[BASE_RECORD_KEY]
    if not isinstance(record, dict) or not isinstance(record.get("name_or_path"), str):
        raise ValueError(f"{str(config_file)!r}: {BASE_RECORD_KEY} must be an object with a 'name_or_path' string, "
                         f"got {json.dumps(record)}")
    recorded = record["name_or_path"]
    relative = record.get("relative_path")
    if relative is None and not os.path.isabs(recorded):
        return recorded  # a Hub id: transformers downloads (or finds it in the cache)
    tried = [recorded]
    if os.path.isdir(recorded):
        return recorded
    if isinstance(relative, str):
        candidate = os.path.normpath(os.path.join(os.path.abspath(folder), relative))
        tried.append(candidate)
        if os.path.isdir(candidate):
            return candidate
    places = " nor at ".join(repr(place) for place in tried[1:])
    raise FileNotFoundError(
        f"the LoRA checkpoint {str(folder)!r} holds adapters for the base model saved at {recorded!r}, which is "
        f"no longer there{f' nor at {places} (the same place relative to the checkpoint)' if places else ''}; "
        "copy the base model there, or pass base_model_name_or_path=<its folder or Hub id> to from_pretrained"
    )
