"""Loading a UniME checkpoint is silent and one step (issue 12, observation 1).

`AutoModel`, `AutoProcessor` and `SentenceTransformer` with `trust_remote_code=True`, in a fresh process with
stdin closed, started from another working directory where this project is not importable: no "Do you wish to
run the custom code?" prompt, no "You are using a model of type unime ..." warning, no stall, and from the Hub at
most one "A new version of the following files was downloaded" notice. The whole console output is checked: every
line must be one of transformers' "Loading weights" progress bars (or, from the Hub, the one notice).
"""

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.fake_hub import fake_hub  # noqa: F401  (the fixture)
from training.demo.tiny_models import tiny_unime

LOAD_ALL_THREE = """
import sys
for _name in ("modeling_unime", "training"):  # as if this project were not installed
    sys.modules[_name] = None
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoProcessor

source, out = sys.argv[1], sys.argv[2]
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
model = AutoModel.from_pretrained(source, trust_remote_code=True)
st_model = SentenceTransformer(source, trust_remote_code=True)
torch.save({
    "processor": type(processor).__name__,
    "encode": model.encode(["a dog"]),  # no processor= : the model carries its own
    "st": st_model.encode(["a dog"], convert_to_tensor=True).cpu(),
}, out)
"""

PROGRESS_BAR = re.compile(r"^Loading weights: +\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]$")
NOTICE_START = "A new version of the following files was downloaded from"


def console_lines(text):
    """Non-empty lines of a captured console, with tqdm's carriage-return redraws split apart."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def run_fresh(tmp_path, source, env):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    (workdir / "load.py").write_text(LOAD_ALL_THREE)
    env = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), HF_MODULES_CACHE=str(tmp_path / "modules"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "load.py", str(source), str(tmp_path / "out.pt")], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr, elapsed, torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_unime("qwen2_vl")


def test_fresh_process_load_from_a_folder_is_silent(tiny, tmp_path):
    model, processor = tiny
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}

    console, elapsed, out = run_fresh(tmp_path, checkpoint, env)

    unexpected = [line for line in console_lines(console) if not PROGRESS_BAR.match(line)]
    assert unexpected == [], console
    assert elapsed < 60  # a prompt left unanswered would stall 15 s per load before failing
    assert out["processor"] == "UniMEProcessor"
    expected = model.encode(["a dog"], processor=processor)
    assert torch.equal(out["encode"], expected)
    assert torch.equal(out["st"], expected)


def test_fresh_process_load_from_the_hub_prints_at_most_one_notice(tiny, fake_hub, tmp_path):
    model, processor = tiny
    model.push_to_hub("user/unime-console")
    processor.push_to_hub("user/unime-console")

    console, _, out = run_fresh(tmp_path, "user/unime-console", dict(os.environ))

    lines = console_lines(console)
    notices = [index for index, line in enumerate(lines) if line.startswith(NOTICE_START)]
    assert len(notices) <= 1, console
    if notices:  # the notice is: its first line, "- file" lines, and its closing sentence
        first = notices[0]
        end = first + 1
        while end < len(lines) and lines[end].startswith("- "):
            end += 1
        assert lines[end].startswith(". Make sure to double-check"), console
        lines = lines[:first] + lines[end + 1:]
    unexpected = [line for line in lines if not PROGRESS_BAR.match(line)]
    assert unexpected == [], console
    assert torch.equal(out["encode"], model.encode(["a dog"], processor=processor))
