"""Reliability (issue 7): a killed run resumes exactly, saves are atomic, a non-finite loss stops cleanly.

The resume and kill tests run the real training script `tests/scripts/resume_run.py` in subprocesses
and SIGKILL them; see its docstring for the tiny runs (4 steps, a checkpoint every step).
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.trainer_utils import get_last_checkpoint

from training.distillation import DistillationConfig, UniMEDistillationTrainer
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.lora import save_atomically
from training.mmeb_data import MMEBCollator, load_mmeb_train
from training.demo.tiny_models import tiny_unime

REPO_ROOT = Path(__file__).resolve().parents[1]
RESUME_SCRIPT = REPO_ROOT / "tests" / "scripts" / "resume_run.py"
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
TIMEOUT = 240


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def spawn():
    """`spawn(arguments, log_path) -> Popen` of a Python subprocess; any still running at teardown is killed."""
    processes = []

    def start(arguments, log_path):
        with open(log_path, "w") as log:  # the child keeps its own handle
            processes.append(subprocess.Popen([sys.executable, *map(str, arguments)], cwd=REPO_ROOT,
                                              env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
        return processes[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def launch_run(spawn, stage, output_dir, *extra):
    """resume_run.py: STAGE, 4 steps, a checkpoint every step, into `output_dir` (log next to it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return spawn([RESUME_SCRIPT, stage, 4, 1, output_dir, *extra], output_dir.parent / f"{output_dir.name}.log")


def read_log(path):
    return Path(path).read_text()[-4000:] if Path(path).exists() else ""


def wait_for_file(path, process, log_path, timeout=TIMEOUT):
    """Poll until `path` exists; fail with the log if the process exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"process exited ({process.returncode}) before writing {path}:\n{read_log(log_path)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {path}:\n{read_log(log_path)}")
        time.sleep(0.1)


def sigkill(process):
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def finish(process, log_path):
    assert process.wait(timeout=TIMEOUT) == 0, read_log(log_path)


def final_parameters(output_dir):
    return load_file(str(output_dir / "final_trainable.safetensors"))


def assert_complete_checkpoint(directory):
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    assert not missing, f"{directory} lacks {missing}"
    state = json.loads((directory / "trainer_state.json").read_text())
    assert state["global_step"] == int(directory.name.split("-")[1])


@pytest.mark.parametrize("stage, kill_point", [(1, "mid-step"), (2, "mid-save")])
def test_killed_run_resumes_to_bitwise_identical_parameters(tmp_path, spawn, stage, kill_point):
    """Exact (torch.equal), not a tolerance: on CPU with one thread the resumed run repeats every
    operation of the uninterrupted one on the same data with the same RNG draws.

    4 steps, a checkpoint after every step, LoRA dropout 0.1, AdamW + linear schedule, random sampling
    (3 batches per epoch: the resumed run starts mid-epoch and crosses an epoch boundary). The run is
    SIGKILLed after checkpoint-2: stage 1 with step 3's gradients computed but not applied; stage 2
    (GradCache, chunks of 2) in the middle of writing checkpoint-3. `resume_from_checkpoint=True`
    must then pick checkpoint-2, never the partial checkpoint-3. Stage 2 also resumes a copy of
    checkpoint-2 without its RNG state: that run must differ, so dropout really depends on the
    restored RNG and the comparison can fail.
    """
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = launch_run(spawn, stage, reference_dir)
    stall = ["--stall_after", 2] if kill_point == "mid-step" else ["--stall_in_save", 3]
    interrupted = launch_run(spawn, stage, interrupted_dir, *stall)
    wait_for_file(interrupted_dir / "stalled", interrupted, tmp_path / "interrupted.log")
    sigkill(interrupted)

    assert_complete_checkpoint(interrupted_dir / "checkpoint-2")
    assert not (interrupted_dir / "checkpoint-3").exists()
    assert get_last_checkpoint(str(interrupted_dir)) == str(interrupted_dir / "checkpoint-2")
    if kill_point == "mid-save":  # the kill landed after the first file of checkpoint-3 was written
        assert (interrupted_dir / ".checkpoint-3.partial" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    control_dir = tmp_path / "control"
    if stage == 2:
        shutil.copytree(interrupted_dir / "checkpoint-2", control_dir / "checkpoint-2")
        shutil.copytree(interrupted_dir / "data", control_dir / "data")
        (control_dir / "checkpoint-2" / "rng_state.pth").unlink()
    runs = {"resumed": (launch_run(spawn, stage, interrupted_dir, "--resume"), tmp_path / "interrupted.log")}
    if stage == 2:
        runs["control"] = (launch_run(spawn, stage, control_dir, "--resume"), tmp_path / "control.log")
    for process, log_path in [(reference, tmp_path / "reference.log"), *runs.values()]:
        finish(process, log_path)

    expected, resumed = final_parameters(reference_dir), final_parameters(interrupted_dir)
    assert len(expected) == 28  # LoRA A and B of 7 layers x 2 blocks
    assert expected.keys() == resumed.keys()
    different = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    losses = json.loads((reference_dir / "losses.json").read_text())
    assert json.loads((interrupted_dir / "losses.json").read_text()) == losses and len(losses) == 4
    assert not (interrupted_dir / ".checkpoint-3.partial").exists()  # a stale partial save is cleared on re-save
    if stage == 2:
        control = final_parameters(control_dir)
        assert max((control[name] - expected[name]).abs().max().item() for name in expected) > 1e-6


# ---- atomic merged-model saves ---------------------------------------------------------------

SLOW_MERGED_SAVE = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    import torch
    import transformers.modeling_utils as modeling_utils
    sys.path.insert(0, sys.argv[1])
    from training.lora import add_lora, save_merged_model
    from training.demo.tiny_models import tiny_unime

    target = Path(sys.argv[2])
    model, processor = tiny_unime("qwen2_vl")
    model = add_lora(model, rank=2)
    save_merged_model(model, processor, target)  # the old, complete checkpoint
    (target.parent / "old.sha256").write_text(hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    original = modeling_utils.safe_save_file

    def slow_save(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        (target.parent / "stalled").write_text(str(filename))
        time.sleep(600)

    modeling_utils.safe_save_file = slow_save
    save_merged_model(model, processor, target)  # killed after writing the new weights
    """
)


def test_killed_merged_save_leaves_the_old_checkpoint_whole(tmp_path, spawn):
    """`save_merged_model` over an existing checkpoint, SIGKILLed right after the new weights file is
    written: the target is still the old complete checkpoint (same bytes, loads with AutoModel), and
    the half-written copy sits in a hidden `.merged.tmp` staging folder that nothing loads."""
    target = tmp_path / "merged"
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_MERGED_SAVE)
    process = spawn([script, REPO_ROOT, target], tmp_path / "save.log")
    wait_for_file(tmp_path / "stalled", process, tmp_path / "save.log")
    sigkill(process)
    staged = Path((tmp_path / "stalled").read_text())
    assert staged.parent.name == "..merged.tmp.tmp" and staged.is_file()  # killed mid-save (model save inside the merged save)
    assert not (staged.parent / "processor_config.json").exists()
    old_digest = (tmp_path / "old.sha256").read_text()
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest() == old_digest
    assert hashlib.sha256(staged.read_bytes()).hexdigest() != old_digest
    assert (target / "processor_config.json").is_file()
    loaded = AutoModel.from_pretrained(str(target), trust_remote_code=True)
    assert loaded.config.model_type == "unime"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]


def test_failed_save_to_a_new_directory_leaves_nothing_under_its_name(tmp_path):
    def write(directory):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(write, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []  # neither `merged` nor its staging folder


# ---- a non-finite loss stops training --------------------------------------------------------


def trainable_state(trainer):
    return {name: tensor.clone() for name, tensor in get_peft_model_state_dict(trainer.model).items()}


def assert_checkpoint_holds(checkpoint, state):
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[name], state[name]) and torch.isfinite(state[name]).all() for name in saved)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_teacher_embedding_stops_stage1_naming_step_and_micro_batch(tmp_path, bad_value):
    """Row 6's teacher embedding is NaN/Inf. Sequential sampling, 2 rows per micro-batch and 2
    micro-batches per step: the row is in micro-batch 2 of optimizer step 2. Training raises there,
    checkpoint-1 stays the last checkpoint and equals the live weights (step 2 was never applied)."""
    teacher = torch.nn.functional.normalize(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    teacher[6, 2] = bad_value
    table = datasets.Dataset.from_dict({"text": [f"sentence {i} about a cat" for i in range(8)],
                                        "teacher_text": teacher.tolist()}).with_format("torch")
    model, processor = tiny_unime("qwen2_vl")
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, lora_rank=4,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                              save_strategy="steps", save_steps=1, train_sampling_strategy="sequential",
                              logging_steps=1, save_merged_model=True)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor, train_dataset=table)
    with pytest.raises(FloatingPointError, match=r"optimizer step 2 \(micro-batch 2 of 2 .*Last checkpoint: "
                                                 rf"{tmp_path / 'checkpoint-1'}"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no checkpoint-2, no merged model
    assert_checkpoint_holds(tmp_path / "checkpoint-1", trainable_state(trainer))


class PoisonPixels:
    """A collator whose `call`-th batch has NaN pixels in its first query chunk (NaN embeddings)."""

    def __init__(self, collator, call):
        self.collator, self.call, self.calls = collator, call, 0

    def __call__(self, rows):
        batch = self.collator(rows)
        self.calls += 1
        if self.calls == self.call:
            batch["query"][0]["pixel_values"].fill_(math.nan)
        return batch


def test_nan_embeddings_stop_stage2_gradcache_before_the_step_is_applied(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    table = datasets.Dataset.from_list([{"qry": "<|image_1|> Represent the image.", "qry_image_path": f"{i}.png",
                                         "pos_text": f"picture {i}", "pos_image_path": ""} for i in range(8)])
    model, processor = tiny_unime("qwen2_vl")
    collator = PoisonPixels(MMEBCollator(processor, image_root=root, image_size=28, chunk_size=2), call=2)
    out = tmp_path / "out"
    args = HardNegativeConfig(output_dir=str(out), use_cpu=True, report_to=[], disable_tqdm=True, lora_rank=4,
                              per_device_train_batch_size=4, gradcache_chunk_size=2, image_size=28, max_steps=2,
                              save_strategy="steps", save_steps=1, logging_steps=1, save_merged_model=False)
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor, train_dataset=load_mmeb_train(table),
                                       data_collator=collator)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at optimizer step 2 "
                                                 r"\(micro-batch 1 of 1"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert_checkpoint_holds(out / "checkpoint-1", trainable_state(trainer))


def test_finite_losses_pass_through_unchanged(tmp_path):
    """The check returns the loss it was given (no copy, no rescaling) and counts micro-batches per step."""
    model, processor = tiny_unime("qwen2_vl")
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_rank=2,
                              gradient_accumulation_steps=3)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor)
    loss = torch.tensor(1.25)
    assert trainer.check_finite_loss(loss) is loss and trainer.check_finite_loss(loss) is loss
    with pytest.raises(FloatingPointError,
                       match=r"step 1 \(micro-batch 3 of 3 in that step, epoch 0.00\).*Last checkpoint: none"):
        trainer.check_finite_loss(torch.tensor(-math.inf))


# ---- untrusted checkpoints --------------------------------------------------------------------


def test_pickled_unime_checkpoint_is_refused_unless_opted_in(qwen2_vl_model, tmp_path):
    """A `.bin`-only UniME checkpoint is refused, by AutoModel (in this process it resolves to our
    registered class) and by the checkpoint's own copy of `UniMEModel` (what AutoModel +
    trust_remote_code runs where this project is not installed); `use_safetensors=False` opts in."""
    pickled = tmp_path / "pickled"
    qwen2_vl_model[0].save_pretrained(pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    remote_class = get_class_from_dynamic_module("modeling_unime.UniMEModel", str(pickled))
    assert remote_class.__module__.startswith("transformers_modules")  # the checkpoint's code, not ours
    loaders = (partial(AutoModel.from_pretrained, trust_remote_code=True), remote_class.from_pretrained)
    for load in loaders:
        with pytest.raises(OSError, match=r"no file named model\.safetensors found in directory .*pickled"):
            load(str(pickled))
        loaded_state = load(str(pickled), use_safetensors=False).state_dict()
        assert all(torch.equal(loaded_state[name], tensor) for name, tensor in state.items())


TORCH_LOAD = re.compile(r"\btorch\.load\(|\bfrom\s+torch\s+import\s+[^\n]*\bload\b|\bpickle\.loads?\(")


def unsafe_loads(text):
    """`(line, call)` of every `torch.load(...)` without `weights_only=True`, `from torch import load`
    and `pickle.load(s)`; calls inside strings (scripts run in subprocesses) count too."""
    found = []
    for match in TORCH_LOAD.finditer(text):
        depth, end = 0, match.end()
        if match.group().startswith("torch.load("):
            depth = 1
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
        call = text[match.start():end]
        if not re.search(r"\bweights_only\s*=\s*True\b", call) or not call.startswith("torch.load("):
            found.append((text.count("\n", 0, match.start()) + 1, call.strip()))
    return found


def test_our_code_never_unpickles():
    assert unsafe_loads("x = torch.load(path)\ny = torch.load(f, map_location=m,\n weights_only=False)") == [
        (1, "torch.load(path)"), (2, "torch.load(f, map_location=m,\n weights_only=False)")]
    assert unsafe_loads("torch.load(open(p), map_location='cpu', weights_only=True)") == []
    assert [line for line, _ in unsafe_loads("import pickle\npickle.loads(b)\nfrom torch import save, load")] == [2, 3]
    offenders = [f"{path.relative_to(REPO_ROOT)}:{line}: {call}"
                 for folder in ("modeling_unime", "training", "examples", "benchmarks")
                 for path in sorted((REPO_ROOT / folder).rglob("*.py"))
                 for line, call in unsafe_loads(path.read_text(encoding="utf-8"))]
    assert not offenders, "unpickling without weights_only=True:\n" + "\n".join(offenders)
