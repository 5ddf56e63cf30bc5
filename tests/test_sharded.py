"""FSDP through `accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` on 2 CPU ranks
equals one process: both stages' trainers, LoRA, GradCache (stage 2), 2 AdamW steps, float64.

tests/scripts/sharded_train.py runs the same tiny training once on one process (global batch 8) and
once under the shipped FSDP config with 2 processes (4 each; `--num_processes 2 --mixed_precision no`
on the command line, everything else from the file). The FSDP run also resumes stage 2 from a copy of
its checkpoint-1. Two launches in all; the file took 250 s on a shared, loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import _free_local_port, _loopback_interface

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "scripts" / "sharded_train.py"
FSDP_CONFIG = REPO_ROOT / "examples" / "accelerate_configs" / "fsdp.yaml"
# Measured: 1.7e-15 (stage 1) and 2.2e-16 (stage 2) after 2 AdamW steps of lr 1e-2 in float64.
FLOAT64_TOLERANCE = 1e-12
LORA_SCALING = 8 / 4  # lora_alpha (default 2 x rank) / rank


def _run(command, cwd, env):
    completed = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{command[:4]} failed:\n{output[-6000:]}"
    return output


def run_single_and_fsdp(work):
    """Directories of the single-process run and of the FSDP run, and the FSDP console output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback  # keep gloo on 127.0.0.1
    _run([sys.executable, str(SCRIPT), str(work / "single"), "--per_device", "8"], work, env)
    console = _run([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_local_port()),
        str(SCRIPT), str(work / "fsdp"), "--per_device", "4", "--resume_stage", "2",
    ], work, env)  # fmt: skip
    return work / "single", work / "fsdp", console


def _max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def test_fsdp_on_two_cpu_processes_equals_one_process(tmp_path):
    # One test for all checks: the runs are the expensive part, and pytest-xdist would repeat a
    # module fixture on each worker that gets one of several tests.
    runs = run_single_and_fsdp(tmp_path)
    for stage in (1, 2):
        check_fsdp_run_is_sharded_fsdp2(runs, stage)
        check_fsdp_steps_equal_single_process_steps(runs, stage)
        check_fsdp_merged_model_is_base_plus_lora_and_reloads(runs, stage)
    check_resume_from_fsdp_checkpoint_equals_uninterrupted_run(runs)


def check_fsdp_run_is_sharded_fsdp2(runs, stage):
    _, fsdp, console = runs
    run = json.loads((fsdp / f"stage{stage}" / "run" / "run.json").read_text())
    assert run["distributed_type"] == "DistributedType.FSDP"
    assert run["model_class"] == "FSDPPeftModel"  # fully_shard (FSDP2) of the PEFT-wrapped UniME model
    assert run["world_size"] == 2
    # Every weight (frozen base and LoRA) is a DTensor; rank 0 holds half of the parameters.
    assert run["sharded_tensors"] > 0
    assert run["full_parameters"] / 2 <= run["local_parameters"] < 0.51 * run["full_parameters"]
    assert "Traceback" not in console
    ours = [line for line in console.splitlines() if "Warning" in line and ("/training/" in line or "modeling_unime" in line)]
    assert not ours, ours


def check_fsdp_steps_equal_single_process_steps(runs, stage):
    single, fsdp, _ = runs
    reference = load_file(single / f"stage{stage}" / "run" / "final_trainable.safetensors")
    initial = load_file(single / f"stage{stage}" / "run" / "initial_trainable.safetensors")
    sharded = load_file(fsdp / f"stage{stage}" / "run" / "final_trainable.safetensors")
    difference = _max_abs_diff(reference, sharded)
    moved = min((reference[key] - initial[key]).abs().max().item() for key in reference)
    print(f"stage {stage}: {len(reference)} LoRA tensors, max |FSDP - single| = {difference:.3g}, "
          f"smallest max update = {moved:.3g}")
    assert len(reference) == 28  # 2 layers x 7 projections x (A, B)
    assert all(tensor.dtype == torch.float64 for tensor in sharded.values())
    assert moved > 1e-3, "every LoRA tensor must have moved, or the comparison means little"
    assert difference <= FLOAT64_TOLERANCE
    single_losses = json.loads((single / f"stage{stage}" / "run" / "run.json").read_text())["losses"]
    fsdp_losses = json.loads((fsdp / f"stage{stage}" / "run" / "run.json").read_text())["losses"]
    assert len(single_losses) == 2 and fsdp_losses == pytest.approx(single_losses, abs=1e-12)


def check_fsdp_merged_model_is_base_plus_lora_and_reloads(runs, stage):
    from transformers import AutoModel

    from training.demo.tiny_models import tiny_unime

    single, fsdp, _ = runs
    merged = load_file(fsdp / f"stage{stage}" / "run" / "merged" / "model.safetensors")
    lora = load_file(fsdp / f"stage{stage}" / "run" / "final_trainable.safetensors")
    base = tiny_unime("qwen2_vl")[0].double().state_dict()  # the scripts' seed-0 model
    checked = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight")
        expected = base[name] + LORA_SCALING * b @ a  # W + (alpha / r) B A
        assert (merged[name] - expected).abs().max().item() < 1e-6, name  # the merge adds in float32
        checked += 1
    assert checked == 14
    untouched = [key for key in merged if "visual" in key]
    assert untouched and all(torch.equal(merged[key], base[key]) for key in untouched)
    single_merged = load_file(single / f"stage{stage}" / "run" / "merged" / "model.safetensors")
    assert _max_abs_diff(single_merged, merged) <= 1e-6

    model = AutoModel.from_pretrained(fsdp / f"stage{stage}" / "run" / "merged", trust_remote_code=True)
    reloaded = model.state_dict()
    assert all(torch.equal(reloaded[key], merged[key]) for key in merged)


def check_resume_from_fsdp_checkpoint_equals_uninterrupted_run(runs):
    _, fsdp, _ = runs
    checkpoint = fsdp / "stage2" / "run" / "checkpoint-1"
    # accelerate's FSDP checkpoint: the gathered model and the optimizer state, one file each.
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    uninterrupted = load_file(fsdp / "stage2" / "run" / "final_trainable.safetensors")
    resumed = load_file(fsdp / "stage2" / "resumed" / "final_trainable.safetensors")
    difference = _max_abs_diff(uninterrupted, resumed)
    print(f"resumed from checkpoint-1: max |resumed - uninterrupted| = {difference:.3g}")
    assert difference <= FLOAT64_TOLERANCE
    state = json.loads((fsdp / "stage2" / "resumed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# ---- DeepSpeed: not run here (see docs/training.md, "Scaling out"); what can be checked without it ----


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_parse_into_the_intended_plugin(name, stage, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = REPO_ROOT / "examples" / "accelerate_configs" / f"{name}.yaml"
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "train.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert args.use_deepspeed and args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    # ZeRO-3 must gather 16-bit weights on save, or trainer.save_model writes no adapter weights.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


class FakeDeepSpeedEngine:
    """Records what accelerate's `DeepSpeedEngineWrapper` asks of a DeepSpeed engine. `backward`
    divides by the accumulation steps unless `scale_wrt_gas=False`, as `DeepSpeedEngine.backward` does."""

    def __init__(self, gradient_accumulation_steps):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.boundaries, self.backward_kwargs, self.steps = [], [], 0

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.boundaries.append(is_boundary)

    def backward(self, loss, scale_wrt_gas=True, **kwargs):
        self.backward_kwargs.append({"scale_wrt_gas": scale_wrt_gas, **kwargs})
        (loss / self.gradient_accumulation_steps if scale_wrt_gas else loss).backward()

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_gradcache_under_deepspeed_reaches_the_boundary_once_and_scales_once(tmp_path, accumulation_steps):
    from unittest.mock import PropertyMock, patch

    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper  # importable without deepspeed

    sys.path.insert(0, str(SCRIPT.parent))
    import sharded_train

    args = dict(sharded_train.COMMON, max_steps=1, per_device_train_batch_size=6, save_merged_model=False)
    trainer = sharded_train.stage2(args, tmp_path)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])  # 3 + 3 chunks of 2
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, batch)  # the plain single-process path
    reference = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)

    engine = FakeDeepSpeedEngine(accumulation_steps)
    trainer.accelerator.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
    trainer.current_gradient_accumulation_steps = accumulation_steps
    with patch.object(Accelerator, "distributed_type", new_callable=PropertyMock,
                      return_value=DistributedType.DEEPSPEED):
        trainer.training_step(trainer.model, batch)
    assert engine.boundaries == [False] * 5 + [True]  # only the last chunk ends the batch
    assert engine.steps == 1
    assert engine.backward_kwargs == [{"scale_wrt_gas": False}] * 6
    assert trainer.accelerator.sync_gradients  # restored after the non-last chunks
    gradients = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    difference = max((gradients[n] - reference[n] / accumulation_steps).abs().max().item() for n in reference)
    assert difference <= FLOAT64_TOLERANCE
    assert max(g.abs().max().item() for g in reference.values()) > 1e-3
