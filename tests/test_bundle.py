"""modeling_unime/bundle.py: a checkpoint ships one code file, the package's modules bundled.

The fresh-process AutoModel/AutoProcessor round trip of a bundled checkpoint is tests/test_remote_code.py;
the Hub's single download notice is tests/test_loading_console.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from modeling_unime.bundle import build_bundle, module_order
from training.demo.tiny_models import tiny_unime

RESAVE = """
import sys
for _name in ("modeling_unime", "training"):  # as if this project were not installed
    sys.modules[_name] = None
from transformers import AutoModel, AutoProcessor
source, target = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(source, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
model.save_pretrained(target)
processor.save_pretrained(target)
"""


def test_bundle_orders_modules_and_drops_relative_imports():
    sources = {
        "modeling_unime": "from .b import g\nfrom .a import (\n    f,\n)\nimport math\n\ndef h():\n"
                          "    from .c import k\n    return f() + g() + k() + math.floor(0.5)\n",
        "a": '"""Module a."""\n\ndef f():\n    return 1\n',
        "b": "from .a import f\n\ndef g():\n    return f() + 1\n",
        "c": "def k():\n    return 10\n",
    }
    assert module_order(sources) == ["a", "b", "modeling_unime", "c"]
    namespace = {}
    exec(compile(build_bundle(sources), "modeling_unime.py", "exec"), namespace)
    assert namespace["h"]() == 13
    assert "from ." not in build_bundle(sources)


def test_bundle_refuses_a_name_two_modules_define_differently():
    sources = {"modeling_unime": "from .a import f\nLIMIT = 1\n", "a": "LIMIT = 2\n\ndef f():\n    return LIMIT\n"}
    with pytest.raises(ValueError, match="a.py and modeling_unime.py both define 'LIMIT' differently"):
        build_bundle(sources)


def test_bundle_refuses_a_relative_module_object():
    with pytest.raises(ValueError, match=r"modeling_unime.py line 1: 'from \. import a' imports a module object"):
        build_bundle({"modeling_unime": "from . import a\n", "a": "X = 1\n"})


def test_resaving_a_remote_code_model_copies_the_bundle_unchanged(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    (tmp_path / "resave.py").write_text(RESAVE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "resave.py", str(checkpoint), str(tmp_path / "again")], cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    again = tmp_path / "again"
    assert sorted(name for name in os.listdir(again) if name.endswith(".py")) == ["modeling_unime.py"]
    assert (again / "modeling_unime.py").read_bytes() == (checkpoint / "modeling_unime.py").read_bytes()
    assert json.loads((again / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "modeling_unime.UniMEConfig", "AutoModel": "modeling_unime.UniMEModel"}
    assert json.loads((again / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "modeling_unime.UniMEProcessor"}
    assert json.loads((again / "modules.json").read_text())[0]["type"] == "modeling_unime.UniMESentenceTransformer"
    reloaded = type(model).from_pretrained(again)
    assert torch.equal(reloaded.encode(["a dog"], processor=processor), model.encode(["a dog"], processor=processor))


def test_saving_over_the_old_one_file_per_module_layout_drops_those_files(tmp_path):
    """Checkpoints written before the bundle shipped each module as its own file; a save over such a folder
    leaves only the bundle (its own files, like the user's notes, stay)."""
    model, processor = tiny_unime("qwen2_vl")
    folder = tmp_path / "old-layout"
    folder.mkdir()
    for name in ("configuration_unime.py", "processing_unime.py", "prompts.py", "encoding.py",
                 "sentence_transformers_module.py", "notes.txt"):
        (folder / name).write_text("# written by an older unime\n")
    model.save_pretrained(folder)
    assert sorted(name for name in os.listdir(folder) if name.endswith(".py")) == ["modeling_unime.py"]
    (folder / "prompts.py").write_text("# written by an older unime\n")
    processor.save_pretrained(folder)
    assert sorted(name for name in os.listdir(folder) if name.endswith((".py", ".txt"))) == [
        "modeling_unime.py", "notes.txt"]
