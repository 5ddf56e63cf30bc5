"""Nothing lost (issue 14): every save we own leaves either the old folder or the complete new one, never a
mix, and what it writes is readable by others as the umask allows. Each save is failed mid-way with a
monkeypatched writer and the folder compared byte for byte; each step of the folder swap is failed too."""

import json
import os
import shutil
import stat
import tempfile

import datasets
import pytest
import torch
import transformers.modeling_utils as modeling_utils
from transformers.trainer_utils import get_last_checkpoint

import modeling_unime.atomic as atomic
import training.teacher_cache as teacher_cache
from modeling_unime import UniMEModel, UniMEProcessor
from training.evaluation import write_results
from training.lora import add_lora, save_merged_model
from training.teacher import build_teacher_cache
from training.trainer_base import remove_leftover_staging


def snapshot(folder):
    """`{relative path: bytes}` of every file under `folder`, plus the names next to it (staging leftovers)."""
    files = {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
    return files, sorted(entry.name for entry in folder.parent.iterdir())


@pytest.fixture(scope="module")
def saved(qwen2_vl_model, tmp_path_factory):
    """A complete checkpoint (model + processor) to save over, and a model with changed weights."""
    model, processor = qwen2_vl_model
    root = tmp_path_factory.mktemp("atomic")
    model.save_pretrained(root / "good")
    processor.save_pretrained(root / "good")
    return root / "good"


@pytest.fixture
def target(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    return folder


def half_written(original):
    def write(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")
    return write


def test_failed_model_save_leaves_the_old_checkpoint(qwen2_vl_model, target, monkeypatch):
    model, _ = qwen2_vl_model
    before = snapshot(target)
    monkeypatch.setattr(modeling_utils, "safe_save_file", half_written(modeling_utils.safe_save_file))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert snapshot(target) == before


def test_failed_processor_save_leaves_the_old_checkpoint(qwen2_vl_model, target, monkeypatch):
    _, processor = qwen2_vl_model
    (target / "chat_template.jinja").write_text("{{ 'the old template' }}")  # differs from what a save writes
    before = snapshot(target)

    def fail(self, path):  # the last file of a processor save; the chat template and tokenizer are written
        open(path, "w").write('{"half')
        raise OSError("disk full")

    monkeypatch.setattr(UniMEProcessor, "to_json_file", fail)
    with pytest.raises(OSError, match="disk full"):
        processor.save_pretrained(target)
    assert snapshot(target) == before


def test_failed_merged_save_leaves_the_old_checkpoint(target, monkeypatch):
    from training.demo.tiny_models import tiny_unime

    model, processor = tiny_unime("qwen2_vl")
    before = snapshot(target)
    monkeypatch.setattr(UniMEProcessor, "to_json_file", lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_merged_model(add_lora(model, rank=2), processor, target)
    assert snapshot(target) == before


def test_failed_teacher_cache_save_leaves_the_old_cache(tmp_path, monkeypatch):
    table = datasets.Dataset.from_dict({"text": ["a cat", "a dog"]})
    path = tmp_path / "cache.safetensors"
    build_teacher_cache(table, None, lambda texts: torch.ones(len(texts), 4), path, teacher_name="ones",
                        show_progress_bar=False)
    before = snapshot(tmp_path)
    monkeypatch.setattr(teacher_cache, "save_file", half_written(teacher_cache.save_file))
    with pytest.raises(OSError, match="disk full"):
        build_teacher_cache(table, None, lambda texts: torch.zeros(len(texts), 4), path, teacher_name="zeros",
                            show_progress_bar=False, overwrite=True)
    assert snapshot(tmp_path) == before


def test_failed_results_write_leaves_the_old_results(tmp_path, monkeypatch):
    write_results({"task": {"acc": 0.5}}, tmp_path)
    before = snapshot(tmp_path)

    def fail(self, text, encoding=None):
        raise OSError("disk full")

    monkeypatch.setattr(type(tmp_path), "write_text", fail)
    with pytest.raises(OSError, match="disk full"):
        write_results({"task": {"acc": 0.75}}, tmp_path)
    assert snapshot(tmp_path) == before


def new_folder(path, text):
    path.mkdir()
    (path / "weights").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "file").write_text(text)
    return path


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failed_rename_in_the_swap_leaves_the_old_folder(tmp_path, monkeypatch, failing_call):
    """Without an atomic exchange (not Linux, or a filesystem without RENAME_EXCHANGE): call 1 moves the old
    folder aside, call 2 moves the new one in; either failing leaves the old."""
    monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)
    target = new_folder(tmp_path / "model", "old")
    staging = new_folder(tmp_path / ".model.tmp", "new")
    before = snapshot(target)
    calls = []
    real_replace = os.replace

    def replace(source, destination):
        calls.append((source, destination))
        if len(calls) == failing_call:
            raise OSError("rename failed")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic.publish_directory(staging, target)
    files, names = snapshot(target)
    assert files == before[0] and ".model.old" not in names


def test_a_failed_cleanup_after_the_swap_keeps_the_new_folder_and_the_next_save_clears_it(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)  # the two-rename swap
    target = new_folder(tmp_path / "model", "old")
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, ignore_errors=False: None)  # removal "fails"
    atomic.publish_directory(new_folder(tmp_path / ".model.tmp", "new"), target)
    assert (target / "weights").read_text() == "new" and (tmp_path / ".model.old").is_dir()
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    with atomic.atomic_directory(target) as staging:
        (staging / "weights").write_text("newer")
    assert sorted(os.listdir(tmp_path)) == ["model"] and (target / "weights").read_text() == "newer"


def test_the_swap_is_one_atomic_exchange_where_the_system_has_one(tmp_path, monkeypatch):
    """On Linux the old and new folders trade places in one `renameat2(RENAME_EXCHANGE)`: no rename or
    removal runs before the target is the new folder, and a failed clean-up of the old copy only leaves
    `.model.tmp`, which the next save clears."""
    if not atomic.exchange_paths(new_folder(tmp_path / "a", "a"), new_folder(tmp_path / "b", "b")):
        pytest.skip("this system or filesystem has no atomic exchange; the two-rename swap is tested above")
    assert (tmp_path / "a" / "weights").read_text() == "b" and (tmp_path / "b" / "weights").read_text() == "a"
    target = new_folder(tmp_path / "model", "old")
    calls = []
    monkeypatch.setattr(atomic.os, "replace", lambda *args: calls.append(args))
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, ignore_errors=False: calls.append(path))
    atomic.publish_directory(new_folder(tmp_path / ".model.tmp", "new"), target)
    assert (target / "weights").read_text() == "new" and (tmp_path / ".model.tmp" / "weights").read_text() == "old"
    assert calls == [tmp_path / ".model.tmp"]  # only the clean-up, after the exchange
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    monkeypatch.undo()
    with atomic.atomic_directory(target) as staging:
        (staging / "weights").write_text("newer")
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "model"] and (target / "weights").read_text() == "newer"


def killed_between_the_renames(tmp_path):
    """What a SIGKILL between `os.replace(target, backup)` and `os.replace(staging, target)` leaves."""
    new_folder(tmp_path / ".model.old", "old")
    new_folder(tmp_path / ".model.tmp", "half")
    return tmp_path / "model"


def test_the_next_save_after_a_kill_mid_swap_restores_or_replaces(tmp_path):
    target = killed_between_the_renames(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as staging:
            (staging / "weights").write_text("new")
            raise RuntimeError("this save fails too")
    assert (target / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    (tmp_path / "again").mkdir()
    killed_between_the_renames(tmp_path / "again")
    with atomic.atomic_directory(tmp_path / "again" / "model") as staging:
        (staging / "weights").write_text("new")
    assert (tmp_path / "again" / "model" / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path / "again")) == ["model"]


def test_leftover_checkpoint_staging_is_never_resumed_and_is_cleared(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-2", ".checkpoint-4.partial/checkpoint-4", ".checkpoint-3.old", ".checkpoint-3.tmp"):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_text(json.dumps({"global_step": int(name.split("-")[1][0])}))
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    remove_leftover_staging(str(run))
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-3"]  # the complete old checkpoint-3 is back
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-3")


def test_model_and_processor_saves_keep_each_others_files(qwen2_vl_model, target):
    model, processor = qwen2_vl_model
    (target / "README.md").write_text("# My model\nwritten by a person\n")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard")
    (target / "notes.txt").write_text("mine")
    model.save_pretrained(target)
    processor.save_pretrained(target)
    names = set(os.listdir(target))
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "notes.txt"} <= names
    assert "model-00001-of-00002.safetensors" not in names
    assert (target / "README.md").read_text() == "# My model\nwritten by a person\n"
    assert UniMEModel.from_pretrained(target).config.model_type == "unime"


def modes(folder):
    """`(set of folder modes, set of file modes)` of `folder` and everything in it."""
    entries = [folder, *folder.rglob("*")]
    return ({stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_dir()},
            {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_file()})


@pytest.mark.parametrize("mask, expected", [(0o022, ({0o755}, {0o644})), (0o077, ({0o700}, {0o600}))])
def test_saved_folders_follow_the_umask(qwen2_vl_model, tmp_path, mask, expected):
    model, processor = qwen2_vl_model
    old_mask = os.umask(mask)
    try:
        model.save_pretrained(tmp_path / "model")
        processor.save_pretrained(tmp_path / "model")
        table = datasets.Dataset.from_dict({"text": ["a", "b"]})
        build_teacher_cache(table, None, lambda texts: torch.ones(len(texts), 2), tmp_path / "cache.safetensors",
                            teacher_name="ones", show_progress_bar=False)
        staging = tempfile.mkdtemp(dir=tmp_path)  # 0700, as Trainer staging folders are created
        open(os.path.join(staging, "adapter_model.safetensors"), "w").close()
        os.chmod(os.path.join(staging, "adapter_model.safetensors"), 0o600)
        atomic.publish_directory(staging, tmp_path / "checkpoint-1")
    finally:
        os.umask(old_mask)
    for folder in ("model", "checkpoint-1"):
        assert modes(tmp_path / folder) == expected, folder
    assert {stat.S_IMODE((tmp_path / "cache.safetensors").stat().st_mode)} == expected[1]
