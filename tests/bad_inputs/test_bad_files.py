"""Broken, empty or wrong-kind files (issue 14): each refused with an error naming the file (and the line,
field or weight key), before transformers, safetensors, datasets or json raise something that names nothing."""

import json
import shutil

import datasets
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_unime import UniMEModel, UniMEProcessor
from training.data import load_distillation_dataset
from training.mmeb_data import load_mmeb_train
from training.tables import load_table
from training.teacher import build_teacher_cache
from training.teacher_cache import load_teacher_cache


def case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


@pytest.fixture(scope="module")
def folders(qwen2_vl_model, backbone_checkpoints, tmp_path_factory):
    """`full`: a saved tiny UniME checkpoint; `backbone`: a Qwen2-VL backbone checkpoint; `bad`: a
    factory copying `full` to a new folder and damaging one file."""
    root = tmp_path_factory.mktemp("files")
    model, processor = qwen2_vl_model
    model.save_pretrained(root / "full")
    processor.save_pretrained(root / "full")
    return root


def damaged(name, file, content):
    """A copy of the good checkpoint whose `file` holds `content` (bytes, or a function of the old bytes)."""
    def make(root):
        folder = root / name
        if not folder.exists():
            shutil.copytree(root / "full", folder)
            old = (root / "full" / file).read_bytes()
            (folder / file).write_bytes(content(old) if callable(content) else content)
        return folder
    return make


def without(name, file):
    def make(root):
        folder = root / name
        if not folder.exists():
            shutil.copytree(root / "full", folder)
            (folder / file).unlink()
        return folder
    return make


def wrong_shape(root):
    folder = root / "wrong_shape"
    if not folder.exists():
        shutil.copytree(root / "full", folder)
        state = load_file(str(folder / "model.safetensors"))
        state["backbone.language_model.layers.1.self_attn.o_proj.weight"] = torch.zeros(32, 31)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_model(make):
    return lambda root, backbone: UniMEModel.from_pretrained(make(root))


def auto_model(make):
    return lambda root, backbone: transformers.AutoModel.from_pretrained(str(make(root)), trust_remote_code=True)


def load_processor(make):
    return lambda root, backbone: UniMEProcessor.from_pretrained(make(root))


CHECKPOINT_CASES = [
    case("folder without config.json", load_model(without("no_config", "config.json")), FileNotFoundError,
         r"^'.*no_config' has no config\.json: a UniME checkpoint folder holds"),
    case("backbone folder", lambda root, backbone: UniMEModel.from_pretrained(backbone), ValueError,
         r"^'.*' is a qwen2_vl backbone checkpoint \(config\.json model_type='qwen2_vl'\), not a UniME checkpoint; "
         r"wrap it with UniMEModel\.from_backbone\(path\)"),
    case("config.json holding a list", load_model(damaged("list_config", "config.json", b"[1, 2]")), ValueError,
         r"^'.*list_config/config\.json' holds a JSON list, expected a JSON object"),
    case("config.json not JSON", load_model(damaged("text_config", "config.json", b"{model_type: unime")), ValueError,
         r"^'.*text_config/config\.json' is not valid JSON \(truncated\?\): Expecting property name"),
    case("config.json empty", load_model(damaged("empty_config", "config.json", b"")), ValueError,
         r"^'.*empty_config/config\.json' is empty \(0 bytes\); expected a JSON object"),
    case("config.json of another model", load_model(damaged("clip_config", "config.json", b'{"model_type": "clip"}')),
         ValueError, r"^'.*clip_config/config\.json' has model_type='clip'; a UniME checkpoint has 'unime'"),
    case("zero-byte weights", load_model(damaged("zero_weights", "model.safetensors", b"")), ValueError,
         r"^weights file '.*zero_weights/model\.safetensors' is empty or truncated \(0 bytes\)"),
    case("zero-byte weights via AutoModel", auto_model(damaged("zero_weights", "model.safetensors", b"")), ValueError,
         r"^weights file '.*zero_weights/model\.safetensors' is empty"),
    case("weights cut at the end", load_model(damaged("cut_weights", "model.safetensors", lambda old: old[:-10])),
         ValueError, r"^weights file '.*cut_weights/model\.safetensors' is truncated: \d+ bytes, its header describes"),
    case("weights cut in the header", load_model(damaged("cut_header", "model.safetensors", lambda old: old[:40])),
         ValueError, r"^weights file '.*cut_header/model\.safetensors' is truncated or not a safetensors file"),
    case("weights file that is text", load_model(damaged("text_weights", "model.safetensors", b"hello, weights")),
         ValueError, r"^weights file '.*text_weights/model\.safetensors' is truncated or not a safetensors file"),
    case("weight of the wrong shape", load_model(wrong_shape), ValueError,
         r"^'.*wrong_shape': weight 'backbone\.language_model\.layers\.1\.self_attn\.o_proj\.weight' has shape "
         r"\(32, 31\) in the checkpoint, the config needs \(32, 32\)"),
    case("folder that does not exist", lambda root, backbone: UniMEModel.from_pretrained(root / "nope"),
         FileNotFoundError, r"^checkpoint folder '.*nope' does not exist"),
    case("file instead of a folder", lambda root, backbone: UniMEModel.from_pretrained(root / "full" / "config.json"),
         FileNotFoundError, r"^checkpoint folder '.*full/config\.json' is a file, not a checkpoint folder"),
    case("zero-byte tokenizer.json", load_processor(damaged("zero_tokenizer", "tokenizer.json", b"")), ValueError,
         r"^'.*zero_tokenizer/tokenizer\.json' is empty \(0 bytes\)"),
    case("truncated tokenizer.json", load_processor(damaged("cut_tokenizer", "tokenizer.json", lambda old: old[:1000])),
         ValueError, r"^'.*cut_tokenizer/tokenizer\.json' is not valid JSON \(truncated\?\)"),
    case("zero-byte tokenizer_config.json", load_processor(damaged("zero_tok_config", "tokenizer_config.json", b"")),
         ValueError, r"^'.*zero_tok_config/tokenizer_config\.json' is empty"),
    case("processor_config.json holding a string",
         load_processor(damaged("string_processor", "processor_config.json", b'"qwen2_vl"')), ValueError,
         r"^'.*string_processor/processor_config\.json' holds a JSON str, expected a JSON object"),
    case("truncated tokenizer.json via the model folder",
         load_model(damaged("cut_tokenizer2", "tokenizer.json", lambda old: old[: len(old) // 2])), ValueError,
         r"^'.*cut_tokenizer2/tokenizer\.json' is not valid JSON"),
    case("processor folder that does not exist", lambda root, backbone: UniMEProcessor.from_pretrained(str(root / "no")),
         FileNotFoundError, r"^checkpoint folder '.*/no' does not exist"),
]


@pytest.mark.parametrize("call, error, match", CHECKPOINT_CASES)
def test_broken_checkpoint_files_are_named(folders, backbone_checkpoints, call, error, match):
    with pytest.raises(error, match=match):
        call(folders, backbone_checkpoints("qwen2_vl"))


# ---- tables ----------------------------------------------------------------------------------

PAIR = {"qry": "<|image_1|> find", "qry_image_path": "a.png", "pos_text": "a dog", "pos_image_path": ""}


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


TABLE_CASES = [
    case("malformed JSONL line", lambda d: load_table(write(d / "t.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')),
         ValueError, r"^'.*t\.jsonl', line 2: not valid JSON \(Expecting ',' delimiter at column 13\); expected one JSON"),
    case("JSONL line holding a list", lambda d: load_table(write(d / "l.jsonl", '{"text": "a"}\n\n{"text": "b"}\n[1]\n')),
         ValueError, r"^'.*l\.jsonl', line 4: holds a JSON list, expected one JSON object per line"),
    case("JSONL line that is not UTF-8", lambda d: load_table(write(d / "u.jsonl", b'{"text": "a"}\n\xff\xfe\n')),
         ValueError, r"^'.*u\.jsonl', line 2: not UTF-8 text \(invalid start byte at byte 0 of the line\)"),
    case("JSON array with a bad element", lambda d: load_table(write(d / "a.json", '[{"text": "a"},\n{"text": "b"},\n{"text"}]')),
         ValueError, r"^'.*a\.json', line 3: not valid JSON \(Expecting ':' delimiter at column 8\)"),
    case("stage-1 data with a malformed line",
         lambda d: load_distillation_dataset(write(d / "nli.jsonl", '{"text": "a"}\n{"text": "b",}\n'), d / "c.safetensors"),
         ValueError, r"^'.*nli\.jsonl', line 2: not valid JSON"),
    case("MMEB subset with a malformed line", lambda d: load_mmeb_train(
        (d / "mmeb").mkdir() or write(d / "mmeb" / "A.jsonl", json.dumps(PAIR) + "\n{oops\n").parent),
         ValueError, r"^'.*mmeb/A\.jsonl', line 2: not valid JSON"),
    case("MMEB subset as .jsonl and .json", lambda d: load_mmeb_train(_two_tables(d)),
         ValueError, r"^subset 'A' has two tables in '.*both': 'A\.json' and 'A\.jsonl'; keep one of them"),
]


def _two_tables(directory):
    folder = directory / "both"
    folder.mkdir()
    write(folder / "A.jsonl", json.dumps(PAIR) + "\n")
    write(folder / "A.json", json.dumps([PAIR]))
    write(folder / "B.jsonl", json.dumps(PAIR) + "\n")
    return folder


@pytest.mark.parametrize("call, error, match", TABLE_CASES)
def test_broken_tables_name_file_and_line(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


# ---- teacher-cache metadata ----------------------------------------------------------------------

TEXTS = ["a cat sleeps", "a dog runs", "a bird sings"]


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "good.safetensors"
    build_teacher_cache(datasets.Dataset.from_dict({"text": TEXTS}), None,
                        lambda texts: torch.randn(len(texts), 4, generator=torch.Generator().manual_seed(0)),
                        path, teacher_name="fixed", show_progress_bar=False)
    with safe_open(str(path), framework="pt") as handle:
        return path, handle.metadata(), load_file(str(path))


def edited(**changes):
    """Write the good cache with its metadata edited (a value of None removes the field), then load it."""
    def run(good_cache, directory):
        path, metadata, tensors = good_cache
        metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
        save_file(tensors, str(directory / "edited.safetensors"), metadata=metadata)
        return load_teacher_cache(directory / "edited.safetensors")
    return run


FINGERPRINT = "0" * 64
METADATA_CASES = [
    case("num_rows missing", edited(num_rows=None), ValueError, r"^teacher cache '.*edited\.safetensors': metadata fields "
         r"\['num_rows'\] are missing; rebuild the cache"),
    case("several fields missing", edited(teacher=None, fingerprints=None), ValueError,
         r"metadata fields \['teacher', 'fingerprints'\] are missing"),
    case("num_rows not a number", edited(num_rows="three"), ValueError,
         r"^teacher cache '.*edited\.safetensors', metadata field 'num_rows' is 'three', expected a positive int"),
    case("num_rows a float", edited(num_rows="3.0"), ValueError, r"metadata field 'num_rows' is '3\.0', expected a positive int"),
    case("dimension 0", edited(dimension="0"), ValueError, r"metadata field 'dimension' is '0', expected a positive int"),
    case("max_length null", edited(max_length="null"), ValueError, r"metadata field 'max_length' is 'null'"),
    case("columns not JSON", edited(columns="text"), ValueError,
         r"metadata field 'columns' is 'text', expected a JSON list of column names"),
    case("columns a JSON object", edited(columns='{"text": 1}'), ValueError, r"metadata field 'columns' is '\{\"text\": 1\}'"),
    case("fingerprints not JSON", edited(fingerprints="abc"), ValueError,
         r"metadata field 'fingerprints' is 'abc', expected a JSON object \{column: sha256 hex\}"),
    case("fingerprints of other columns", edited(fingerprints=json.dumps({"sent0": FINGERPRINT})), ValueError,
         r"metadata field 'fingerprints' lists columns \['sent0'\], 'columns' lists \['text'\]"),
    case("teacher empty", edited(teacher=""), ValueError, r"metadata field 'teacher' is '', expected a non-empty teacher name"),
]


@pytest.mark.parametrize("call, error, match", METADATA_CASES)
def test_teacher_cache_metadata_fields_are_checked_by_name(good_cache, tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(good_cache, tmp_path)


def test_the_unedited_cache_metadata_loads(good_cache, tmp_path):
    assert torch.equal(edited()(good_cache, tmp_path)["text"], good_cache[2]["text"])


def backbone_copy(name, damage):
    def make(root, backbone):
        folder = root / name
        if not folder.exists():
            shutil.copytree(backbone, folder)
            damage(folder)
        return folder
    return make


BACKBONE_CASES = [
    case("UniME checkpoint given to from_backbone", lambda root, backbone: root / "full", ValueError,
         r"^'.*full' is a UniME checkpoint, not a backbone; load it with UniMEModel\.from_pretrained\(path\)"),
    case("backbone folder without config.json", backbone_copy("bb_no_config", lambda f: (f / "config.json").unlink()),
         FileNotFoundError, r"^'.*bb_no_config' has no config\.json: expected a backbone checkpoint folder"),
    case("backbone with zero-byte weights",
         backbone_copy("bb_zero", lambda f: (f / "model.safetensors").write_bytes(b"")), ValueError,
         r"^weights file '.*bb_zero/model\.safetensors' is empty or truncated \(0 bytes\)"),
    case("backbone with a truncated tokenizer.json",
         backbone_copy("bb_tok", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "trunc')), ValueError,
         r"^'.*bb_tok/tokenizer\.json' is not valid JSON \(truncated\?\)"),
]


@pytest.mark.parametrize("make, error, match", BACKBONE_CASES)
def test_from_backbone_names_the_broken_file(folders, backbone_checkpoints, make, error, match):
    folder = make(folders, backbone_checkpoints("qwen2_vl"))
    with pytest.raises(error, match=match):
        UniMEModel.from_backbone(str(folder))
