"""Stage-2 trainer (training/hard_negative.py): logging, skipping, learning, the example, 2 processes.

The tiny end-to-end run trains a random tiny Qwen2-VL (LoRA r16 with dropout, GradCache chunks of
4, the paper's loss settings: tau 0.02, k 8, beta 0.1) for 150 steps on MMEB-format pairs
"<|image_1|> Represent the given image for classification." + a drawn shape -> "a red shape", and
measures held-out pairs (new drawings, in-batch retrieval among the 8 colour names) before and after.
Measured: accuracy 0.156 -> 0.812 (chance 0.125), held-out loss 4.30 -> 0.58, logged training loss
2.47 -> 0.86 (the test prints them)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.losses import hard_negative_infonce_loss
from training.mmeb_data import MMEBCollator, load_mmeb_train
from training.demo.tiny_models import tiny_unime

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (130, 40, 170), "brown": (130, 75, 25), "pink": (245, 120, 190), "gray": (120, 120, 120)}
SHAPES = ("circle", "square")
CLASSIFY = "<|image_1|> Represent the given image for classification."
STAT_KEYS = ("mean_positive_similarity", "mean_hard_negative_similarity", "false_negative_fraction",
             "rows_with_false_negatives_fraction", "rows_short_of_k", "rows_without_negatives", "skipped_pairs")


def draw_shape(colour, shape, rng, size=56):
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 40, 3)))
    radius = int(rng.integers(12, 22))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
    return image


def write_split(root, split, per_class, rng):
    """Blocks of 8 rows, one per colour (the class; the shape varies): with sequential sampling a
    batch of 8 has no duplicate target."""
    records = []
    for k in range(per_class):
        for colour in COLOURS:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            path = f"img/{split}_{colour}_{k}.png"
            draw_shape(colour, shape, rng).save(root / path)
            records.append({"qry": CLASSIFY, "qry_image_path": path, "pos_text": f"a {colour} shape",
                            "pos_image_path": ""})
    file = root / f"{split}.jsonl"
    file.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return file


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    return root, write_split(root, "train", 20, rng), write_split(root, "eval", 4, rng)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                    save_merged_model=False, disable_tqdm=True, per_device_train_batch_size=8, image_size=56,
                    train_sampling_strategy="sequential", logging_steps=1, seed=0)
    return HardNegativeConfig(**{**settings, **overrides})


def test_config_defaults_and_validation(tmp_path):
    args = HardNegativeConfig(output_dir=str(tmp_path))
    assert (args.lora_rank, args.contrastive_temperature, args.num_hard_negatives, args.false_negative_margin,
            args.gradcache_chunk_size, args.image_size) == (16, 0.02, 8, 0.1, None, 336)
    assert not hasattr(args, "temperature")
    for bad in ({"contrastive_temperature": 0.0}, {"num_hard_negatives": 0}, {"gradcache_chunk_size": -1},
                {"image_size": 0}, {"false_negative_margin": "0.1"}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            HardNegativeConfig(output_dir=str(tmp_path), **bad)
    assert HardNegativeConfig(output_dir=str(tmp_path), num_hard_negatives=None,
                              false_negative_margin=None).num_hard_negatives is None


def test_stats_are_logged_and_equal_an_independent_computation(tmp_path, shapes):
    root, train_file, _ = shapes
    train = load_mmeb_train(train_file)
    model, processor = tiny_unime("qwen2_vl")
    collator = MMEBCollator(processor, image_root=root, image_size=56)
    first_batch = collator([train[i] for i in range(8)])
    with torch.no_grad():  # LoRA B starts at zero, so step 1 sees exactly this model
        query = model(**first_batch["query"]).embeddings
        target = model(**first_batch["target"]).embeddings
    expected_loss, expected = hard_negative_infonce_loss(query, target, temperature=0.02, num_hard_negatives=8,
                                                         false_negative_margin=0.1)

    trainer = UniMEHardNegativeTrainer(model, config(tmp_path, max_steps=2), processor=processor,
                                       train_dataset=train, data_collator=collator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(key in entry for entry in logs for key in STAT_KEYS)
    assert logs[0]["loss"] == pytest.approx(expected_loss.item(), abs=1e-5)
    for key, value in expected.to_dict().items():
        assert logs[0][key] == pytest.approx(value, abs=2e-6), key
    assert logs[0]["skipped_pairs"] == 0


def test_skipped_pairs_are_counted_and_logged(tmp_path, shapes):
    root, train_file, _ = shapes
    rows = [json.loads(line) for line in train_file.read_text().splitlines()[:8]]
    rows[3]["qry_image_path"] = "img/does_not_exist.png"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model, processor = tiny_unime("qwen2_vl")
    collator = MMEBCollator(processor, image_root=root, image_size=56, skip_bad_images=True)
    trainer = UniMEHardNegativeTrainer(model, config(tmp_path, max_steps=1), processor=processor,
                                       train_dataset=load_mmeb_train(data), data_collator=collator)
    trainer.train()
    assert trainer.num_skipped_pairs == 1
    assert trainer.state.log_history[0]["skipped_pairs"] == 1


def test_gradcache_needs_a_chunking_collator(tmp_path, shapes):
    root, train_file, _ = shapes
    model, processor = tiny_unime("qwen2_vl")
    collator = MMEBCollator(processor, image_root=root, image_size=56)  # no chunk_size
    trainer = UniMEHardNegativeTrainer(model, config(tmp_path, max_steps=1, gradcache_chunk_size=4),
                                       processor=processor, train_dataset=load_mmeb_train(train_file),
                                       data_collator=collator)
    with pytest.raises(ValueError, match="collator returned one unchunked 'query' batch"):
        trainer.train()
    default = UniMEHardNegativeTrainer(tiny_unime("qwen2_vl")[0], config(tmp_path, gradcache_chunk_size=4),
                                       processor=processor).data_collator
    assert isinstance(default, MMEBCollator) and (default.chunk_size, default.image_size) == (4, 56)


def held_out_metrics(model, collator, eval_data):
    """Mean in-batch retrieval accuracy (image query -> its class name among the 8) and loss."""
    accuracies, losses = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(eval_data), len(COLOURS)):
            batch = collator([eval_data[i] for i in range(start, start + len(COLOURS))])
            query, target = model(**batch["query"]).embeddings, model(**batch["target"]).embeddings
            accuracies.append((query @ target.T).argmax(dim=1).eq(torch.arange(len(COLOURS))).float().mean().item())
            losses.append(hard_negative_infonce_loss(query, target)[0].item())
    model.train()
    return float(np.mean(accuracies)), float(np.mean(losses))


def test_tiny_training_run_learns_held_out_pairs(tmp_path, shapes):
    root, train_file, eval_file = shapes
    model, processor = tiny_unime("qwen2_vl")
    args = config(tmp_path, max_steps=150, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
                  gradcache_chunk_size=4, logging_steps=20)
    collator = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=4)
    eval_collator = MMEBCollator(processor, image_root=root, image_size=56)
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor, train_dataset=load_mmeb_train(train_file),
                                       data_collator=collator)
    eval_data = load_mmeb_train(eval_file)
    accuracy_before, loss_before = held_out_metrics(trainer.model, eval_collator, eval_data)
    trainer.train()
    accuracy_after, loss_after = held_out_metrics(trainer.model, eval_collator, eval_data)
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"held-out accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}, held-out loss {loss_before:.3f} -> "
          f"{loss_after:.3f}, logged train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}")
    assert accuracy_before <= 0.25
    assert accuracy_after >= 0.5
    assert loss_after < 0.5 * loss_before
    assert np.mean(train_losses[-3:]) < 0.7 * train_losses[0]


def _free_local_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env():
    # The example scripts import the installed package (no sys.path edits): this checkout's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)  # keep gloo on 127.0.0.1
    return env


def test_example_script_runs_the_tiny_recipe_from_a_stage1_checkpoint(tmp_path, shapes):
    root, train_file, _ = shapes
    stage1 = tmp_path / "stage1_merged"
    model, processor = tiny_unime("qwen2_vl")
    model.save_pretrained(stage1)
    processor.save_pretrained(stage1)
    out = tmp_path / "stage2"
    command = [sys.executable, "examples/train_stage2.py", "--config", "examples/configs/stage2_tiny.yaml",
               "--stage1_model", str(stage1), "--dataset", str(train_file), "--image_root", str(root),
               "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "rows_with_false_negatives_fraction" in completed.stdout + completed.stderr
    assert (out / "merged" / "config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_two_processes_match_one_process_with_and_without_gradcache(tmp_path):
    output = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_local_port()}",
               str(REPO_ROOT / "tests" / "scripts" / "stage2_ddp_check.py"), str(tmp_path / "work"), str(output)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == 0, f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    result = json.loads(output.read_text())
    print(json.dumps(result, indent=1))
    assert result["world_size"] == 2 and result["ddp_wrapped"] == "DistributedDataParallel"
    for case in ("gradcache", "no_gradcache"):
        assert result[case]["num_gradients"] == 28  # every LoRA tensor of the tiny model got a gradient
        assert result[case]["loss_max_abs_diff"] < 1e-12
        # float64; measured ~4e-15 of gradients ~10
        assert result[case]["grad_max_abs_diff"] < 1e-10 * result[case]["grad_max_abs"]
    accumulation = result["gradcache_accumulation_2"]
    assert accumulation["grad_max_abs_diff_vs_half_reference"] < 1e-10 * result["gradcache"]["grad_max_abs"]
    assert accumulation["grad_max_abs_diff_vs_reference"] > 0.1 * result["gradcache"]["grad_max_abs"]


def test_column_mapping_reads_a_users_table(tmp_path):
    """Issue 13 item 7: `{MMEB field: column}`; unmapped absent fields and empty cells become ""."""
    from training.mmeb_data import load_mmeb_train

    table = tmp_path / "mine.csv"
    table.write_text("caption,image_file,hint\nred circle,img/a.png,\nblue square,img/b.png,x\n")
    rows = load_mmeb_train(table, columns={"qry": "caption", "pos_image_path": "image_file", "pos_text": "hint"})
    assert [dict(row) for row in rows] == [
        {"qry": "red circle", "qry_image_path": "", "pos_text": "", "pos_image_path": "img/a.png",
         "subset_row": 0, "subset": str(table)},
        {"qry": "blue square", "qry_image_path": "", "pos_text": "x", "pos_image_path": "img/b.png",
         "subset_row": 1, "subset": str(table)},
    ]
    with pytest.raises(ValueError, match=r"^columns: unknown fields \['query'\]"):
        load_mmeb_train(table, columns={"query": "caption"})
    with pytest.raises(ValueError, match=r"^file '.*mine\.csv' has no columns \['text'\]; its columns are "
                                         r"\['caption', 'image_file', 'hint'\]"):
        load_mmeb_train(table, columns={"qry": "text"})


def test_resume_from_checkpoint_values(tmp_path):
    """Issue 13 item 2: `true`/`false` strings from the command line, the latest checkpoint, bad paths."""
    from training.trainer_base import resolve_resume_from_checkpoint

    assert resolve_resume_from_checkpoint("false", tmp_path) is None
    assert resolve_resume_from_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        resolve_resume_from_checkpoint("true", tmp_path)
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resolve_resume_from_checkpoint("true", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_from_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume_from_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match=r"'.*checkpoint-3' is not a folder"):
        resolve_resume_from_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path)
