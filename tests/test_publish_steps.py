"""Every step of the atomic folder publish, failed one at a time.

The machinery is `modeling_unime.atomic.publish_directory` (used by `save_merged_model` /
`save_atomically` and every other save) and the trainers' checkpoint publish
(`UniMETrainerBase._save_checkpoint`). The steps are found by counting the filesystem calls that rename
or remove (`os.replace`, `os.rename`, `shutil.rmtree`, `shutil.move`), so the tests follow whatever
order an implementation uses. For each step N:

- crash: a forked child runs the public function and `os._exit`s just before (or just after) call N,
  like a kill (no `finally`, no cleanup);
- error: call N raises `OSError` in-process (a full disk, a permission change).

The contract (COMMON.md: "a failed save never changes what was there") is that the target is then
either the complete old folder or the complete new one. On Linux the swap itself is one
`renameat2(RENAME_EXCHANGE)` (not one of the counted calls: it cannot half-happen); the two-rename
fallback for other systems is tested in tests/test_atomic.py.
"""

import copy
import os
import shutil
import signal
import time

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers.trainer_utils import get_last_checkpoint

from training.distillation import DistillationConfig, UniMEDistillationTrainer
from modeling_unime.atomic import publish_directory
from training.lora import save_atomically
from training.demo.tiny_models import tiny_unime

CRASHED = 75
MUTATING_CALLS = [(os, "replace"), (os, "rename"), (shutil, "rmtree"), (shutil, "move")]


class FailAt:
    """Patch the renaming/removing calls; at call number `at` (1-based) crash or raise."""

    def __init__(self, at, mode):
        self.at, self.mode, self.calls, self.saved = at, mode, 0, []

    def __enter__(self):
        for module, name in MUTATING_CALLS:
            original = getattr(module, name)
            self.saved.append((module, name, original))
            setattr(module, name, self._wrap(original))
        return self

    def __exit__(self, *exc_info):
        for module, name, original in self.saved:
            setattr(module, name, original)

    def _wrap(self, original):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at and self.mode == "crash-before":
                os._exit(CRASHED)
            if self.calls == self.at and self.mode == "error":
                raise OSError(f"injected failure at filesystem call {self.at}")
            result = original(*args, **kwargs)
            if self.calls == self.at and self.mode == "crash-after":
                os._exit(CRASHED)
            return result

        return call


def in_child(function, timeout=300):
    """Run `function()` in a forked child; return its exit status (0 = finished, CRASHED = killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            function()
        except BaseException:
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError("the forked child stalled")


def write_tree(directory, tag):
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text(f'{{"version": "{tag}"}}')
    (directory / "sub" / "weights.bin").write_bytes(tag.encode() * 1000)
    return directory


def snapshot(directory):
    if not directory.is_dir():
        return None
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def hidden_snapshots(parent, name):
    return [snapshot(path) for path in parent.iterdir() if path.name.startswith(f".{name}") and path.is_dir()]


def publish_outcomes(tmp_path, mode):
    """For each step N of `publish_directory(staging, target)` over an existing target:
    (N, target content, hidden siblings' contents, old, new). Stops once a run finishes without failing."""
    outcomes = []
    for at in range(1, 20):
        root = tmp_path / f"{mode}-{at}"
        old = snapshot(write_tree(root / "model", "old"))
        new = snapshot(write_tree(root / ".model.tmp-x", "new"))

        def publish():
            with FailAt(at, mode):
                publish_directory(root / ".model.tmp-x", root / "model")

        if mode == "error":
            try:
                publish()
                finished = True
            except OSError:
                finished = False
        else:
            status = in_child(publish)
            assert status in (0, CRASHED), status
            finished = status == 0
        outcomes.append((at, snapshot(root / "model"), hidden_snapshots(root, "model"), old, new))
        if finished:
            assert snapshot(root / "model") == new
            return outcomes
    raise AssertionError("publish_directory never finished")


@pytest.mark.parametrize("mode", ["crash-before", "crash-after", "error"])
def test_publish_never_leaves_a_partial_target_or_loses_the_old_folder(tmp_path, mode):
    outcomes = publish_outcomes(tmp_path, mode)
    assert len(outcomes) >= 2  # at least one step really failed
    for at, target, hidden, old, new in outcomes:
        assert target in (old, new, None), f"step {at}: partial target"
        assert target == new or old in [target, *hidden], f"step {at}: the old folder is lost"
        assert target is not None or new in hidden, f"step {at}: the new folder is lost"


@pytest.mark.parametrize("mode", ["crash-before", "crash-after", "error"])
def test_publish_leaves_the_old_or_the_new_folder_at_every_step(tmp_path, mode):
    for at, target, _, old, new in publish_outcomes(tmp_path, mode):
        assert target in (old, new), f"step {at}: target is {'absent' if target is None else 'mixed'}"


def test_publish_to_a_new_name_and_save_atomically_failures(tmp_path):
    new = snapshot(write_tree(tmp_path / ".fresh.tmp", "new"))
    with FailAt(1, "error"), pytest.raises(OSError, match="injected"):
        publish_directory(tmp_path / ".fresh.tmp", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and snapshot(tmp_path / ".fresh.tmp") == new
    publish_directory(tmp_path / ".fresh.tmp", tmp_path / "fresh")
    assert snapshot(tmp_path / "fresh") == new and not (tmp_path / ".fresh.tmp").exists()

    # save_atomically: a write that fails halfway leaves the old folder byte for byte.
    old = snapshot(write_tree(tmp_path / "merged", "old"))

    def half_write(directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        save_atomically(half_write, tmp_path / "merged")
    assert snapshot(tmp_path / "merged") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"]
    save_atomically(lambda directory: write_tree(directory / "x", "v2"), tmp_path / "merged")
    assert snapshot(tmp_path / "merged") == {"x/config.json": b'{"version": "v2"}', "x/sub/weights.bin": b"v2" * 1000}


# ----------------------------------------------------------------------------- trainer checkpoints


CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "trainer_state.json", "training_args.bin"}


def train_with_checkpoints(output_dir, model, processor):
    generator = torch.Generator().manual_seed(0)
    teacher = F.normalize(torch.randn(8, 8, generator=generator), dim=-1)
    rows = [{"text": f"sentence {i} about a topic", "teacher_text": teacher[i].tolist()} for i in range(8)]
    args = DistillationConfig(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True,
                              save_merged_model=False, per_device_train_batch_size=4, max_steps=2, save_steps=1,
                              save_strategy="steps", save_total_limit=1, logging_steps=1, seed=0,
                              dataloader_num_workers=0)
    UniMEDistillationTrainer(model=model, args=args, processor=processor,
                             train_dataset=datasets.Dataset.from_list(rows)).train()


def assert_visible_checkpoints_complete(output_dir, step):
    visible = sorted(p for p in output_dir.glob("checkpoint-*") if p.is_dir())
    for checkpoint in visible:
        names = {p.name for p in checkpoint.iterdir()}
        assert CHECKPOINT_FILES <= names, f"step {step}: {checkpoint.name} lacks {CHECKPOINT_FILES - names}"
        state = (checkpoint / "trainer_state.json").read_text()
        assert f'"global_step": {checkpoint.name.split("-")[1]}' in state
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    assert last is None or os.path.basename(last) in {p.name for p in visible}
    return [p.name for p in visible]


class CheckAround(FailAt):
    """Check the invariant on disk just before and just after every renaming/removing call: what a
    crash at that instant would leave (a crash does not change the disk)."""

    def __init__(self, check):
        super().__init__(at=None, mode=None)
        self.check, self.seen = check, []

    def _wrap(self, original):
        def call(*args, **kwargs):
            self.calls += 1
            self.seen.append(tuple(self.check(f"before call {self.calls}")))
            result = original(*args, **kwargs)
            self.seen.append(tuple(self.check(f"after call {self.calls}")))
            return result

        return call


def test_a_crash_at_every_step_of_a_checkpoint_save_leaves_only_complete_checkpoints(tmp_path):
    output_dir = tmp_path / "run"
    model, processor = tiny_unime("qwen2_vl")
    with CheckAround(lambda where: assert_visible_checkpoints_complete(output_dir, where)) as probe:
        train_with_checkpoints(output_dir, model, processor)
    assert probe.calls >= 2  # at least the publish of each of the two saves
    assert ("checkpoint-1",) in probe.seen and ("checkpoint-1", "checkpoint-2") in probe.seen
    assert assert_visible_checkpoints_complete(output_dir, "end") == ["checkpoint-2"]  # save_total_limit=1


def test_a_failure_at_every_step_of_a_checkpoint_save_leaves_only_complete_checkpoints(tmp_path):
    base_model, processor = tiny_unime("qwen2_vl")
    for at in range(1, 40):
        output_dir = tmp_path / f"run-{at}"
        try:
            with FailAt(at, "error"):
                train_with_checkpoints(output_dir, copy.deepcopy(base_model), processor)
        except OSError as error:
            assert f"call {at}" in str(error)
            assert_visible_checkpoints_complete(output_dir, at)
            continue
        assert assert_visible_checkpoints_complete(output_dir, "end") == ["checkpoint-2"]
        break
    assert at >= 3  # several steps really failed
