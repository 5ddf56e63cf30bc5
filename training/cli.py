"""What the example scripts share: parsing `--config file.yaml` with its paths taken relative to the file.

`trl.TrlParser` reads a YAML config as defaults for the command line, but leaves relative paths
relative to the current directory, so a config only works from the folder its author ran it in.
`parse_args_and_config` resolves the paths *in the YAML* against the YAML file's folder (paths on the
command line stay relative to the current directory, as usual):

    parser = TrlParser((ScriptArguments, HardNegativeConfig))
    script_args, training_args = parse_args_and_config(parser)
"""

import os
import sys
from pathlib import Path

import yaml

# Written by the run: always taken relative to the YAML file.
OUTPUT_PATH_KEYS = ("output_dir", "logging_dir", "teacher_cache")
# Read by the run, and possibly a Hub id (`owner/name`) or `tiny:<family>`: taken relative to the YAML
# file when written `./x` or `../x`, or when that file or folder exists; otherwise left as written.
INPUT_PATH_KEYS = ("dataset", "backbone", "stage1_model", "teacher", "image_root", "resume_from_checkpoint",
                   "deepspeed")


def resolve_config_paths(config, base_dir):
    """A copy of the YAML mapping `config` with its relative paths made absolute against `base_dir`."""
    base_dir = Path(base_dir).resolve()
    resolved = dict(config)
    for key, value in config.items():
        if not isinstance(value, str) or not value or os.path.isabs(value) or ":" in value.split("/")[0]:
            continue  # absolute, empty, not a path, or `tiny:<family>` / a URL
        candidate = base_dir / value
        if key in OUTPUT_PATH_KEYS or (key in INPUT_PATH_KEYS and (value.startswith(("./", "../"))
                                                                   or candidate.exists())):
            resolved[key] = str(candidate.resolve())
    return resolved


def parse_args_and_config(parser, args=None):
    """`parser.parse_args_and_config(args)` (a `trl.TrlParser`), with the YAML's paths relative to the YAML.

    Args:
        parser (`trl.TrlParser`): the script's parser.
        args (`list[str]`, *optional*): command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The dataclass instances, as `TrlParser.parse_args_and_config`.

    Raises:
        FileNotFoundError: `--config` names no file. ValueError: the YAML is not a mapping or has unknown keys.
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--config" not in args:
        return parser.parse_args_and_config(args)
    index = args.index("--config")
    if index + 1 >= len(args):
        raise ValueError("--config needs the path of a YAML file")
    config_path = Path(args[index + 1])
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {config_path}: no such file")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"config file {config_path} must hold a YAML mapping of argument names to values")
    for key, value in (config.pop("env", None) or {}).items():
        os.environ[key] = str(value)
    unknown = parser.set_defaults_with_config(**resolve_config_paths(config, config_path.parent))
    if unknown:
        raise ValueError(f"config file {config_path}: unknown arguments {unknown}")
    return parser.parse_args_into_dataclasses(args=args[:index] + args[index + 2:])


def absolute_if_local(name):
    """`name` as an absolute path when it is an existing file or folder, else unchanged (a Hub id,
    `tiny:<family>`): what a model card or a checkpoint should record so that it means the same thing
    from any directory."""
    if isinstance(name, str) and name and os.path.exists(name):
        return str(Path(name).resolve())
    return name
