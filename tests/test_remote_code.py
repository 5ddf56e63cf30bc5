"""trust_remote_code round trip in a fresh process where this project is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from training.demo.tiny_models import tiny_unime

LOAD_AND_ENCODE = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    assert all("modeling_unime" not in name for name in sys.modules)
    for _name in ("modeling_unime", "training"):  # as if this project were not installed:
        sys.modules[_name] = None  # an import of it raises ImportError; remote code must not need it
    from transformers import AutoModel, AutoProcessor
    directory, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModel.from_pretrained(directory, trust_remote_code=True, dtype=getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    image = Image.open(sys.argv[4])
    embeddings = model.encode(["a dog", image, {"image": image, "text": "what is it?"}], processor=processor)
    torch.save({"embeddings": embeddings, "dtype": str(model.dtype)}, out)
    """
)


def run_fresh_process(tmp_path, directory, image_path, dtype="float32"):
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_ENCODE)
    out = tmp_path / f"out_{dtype}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # same float summation order as this process
    result = subprocess.run(
        [sys.executable, str(script), str(directory), str(out), dtype, str(image_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_trust_remote_code_round_trip(tmp_path, images):
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_unime.UniMEModel"
    # One code file, the package bundled (modeling_unime/bundle.py): one Hub download notice on first load.
    assert [name for name in os.listdir(checkpoint) if name.endswith(".py")] == ["modeling_unime.py"]
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    expected = model.encode(["a dog", images[0], {"image": images[0], "text": "what is it?"}], processor=processor)

    loaded = run_fresh_process(tmp_path, checkpoint, image_path)
    assert torch.equal(loaded["embeddings"], expected)

    bf16 = run_fresh_process(tmp_path, checkpoint, image_path, dtype="bfloat16")
    assert bf16["dtype"] == "torch.bfloat16"
    assert bf16["embeddings"].dtype == torch.float32  # encode returns float32 whatever the compute dtype
    assert (bf16["embeddings"] - expected).abs().max().item() < 0.1


def test_shipped_files_import_no_circle():
    """Issue 13: modeling_unime.py <-> sentence_transformers_module.py was an import circle. Follow the relative
    imports transformers itself sees (its regex also matches imports inside functions) from modeling_unime.py."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_imports

    package = Path(__file__).resolve().parents[1] / "modeling_unime"
    graph = {path.stem: sorted(get_relative_imports(path)) for path in package.glob("*.py")}
    assert graph["sentence_transformers_module"] == []

    def cycle_from(name, trail):
        if name in trail:
            return trail[trail.index(name):] + [name]
        for dependency in graph.get(name, []):
            found = cycle_from(dependency, trail + [name])
            if found:
                return found
        return None

    assert cycle_from("modeling_unime", []) is None
