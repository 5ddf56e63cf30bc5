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

    console, _, out = run_fresh(tmp_path, checkpoint, env)

    unexpected = [line for line in console_lines(console) if not PROGRESS_BAR.match(line)]
    assert unexpected == [], console
    assert out["processor"] == "UniMEProcessor"
    expected = model.encode(["a dog"], processor=processor)
    assert torch.equal(out["encode"], expected)
    assert torch.equal(out["st"], expected)


def split_notices(lines):
    """(notices as lists of lines, the other lines): a notice is its first line, `- file` lines, and its end."""
    notices, others, index = [], [], 0
    while index < len(lines):
        if not lines[index].removeprefix("[transformers] ").startswith(NOTICE_START):
            others.append(lines[index])
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].startswith("- "):
            end += 1
        assert lines[end].startswith(". Make sure to double-check"), lines[index:end + 1]
        notices.append(lines[index:end + 1])
        index = end + 1
    return notices, others


@pytest.fixture(scope="module")
def hub_load(tiny, tmp_path_factory):
    """Push the tiny checkpoint to a fake Hub and load it in a fresh process: (console lines, outputs)."""
    from tests.fake_hub import FakeHub, point_hub_clients_at

    model, processor = tiny
    tmp_path = tmp_path_factory.mktemp("hub_load")
    with FakeHub(tmp_path / "repos") as hub, pytest.MonkeyPatch.context() as patch:
        point_hub_clients_at(hub.endpoint, tmp_path / "home", patch)
        model.push_to_hub("user/unime-console")
        processor.push_to_hub("user/unime-console")
        console, _, out = run_fresh(tmp_path, "user/unime-console", dict(os.environ))
    return console_lines(console), out


def test_fresh_process_load_from_the_hub_is_silent_but_for_new_code_notices(tiny, hub_load):
    model, processor = tiny
    lines, out = hub_load
    notices, others = split_notices(lines)
    unexpected = [line for line in others if not PROGRESS_BAR.match(line)]
    assert unexpected == [], "\n".join(lines)
    listed = sorted(line[2:] for notice in notices for line in notice[1:-1])
    assert listed == ["modeling_unime.py"]  # one bundled code file (modeling_unime/bundle.py)
    assert torch.equal(out["encode"], model.encode(["a dog"], processor=processor))


def test_fresh_process_load_from_the_hub_prints_at_most_one_notice(hub_load):
    notices, _ = split_notices(hub_load[0])
    assert len(notices) <= 1, notices
