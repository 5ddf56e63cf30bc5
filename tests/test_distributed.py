"""training/distributed.py: gathered losses on 2 ranks equal the single-process full-batch losses.

The check itself runs in tests/scripts/distributed_loss_check.py under torchrun (gloo, CPU, float64);
this module launches it once and asserts on the JSON it writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.distributed import gather_with_grad, world_info

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "scripts" / "distributed_loss_check.py"
FLOAT64_TOLERANCE = 1e-6
MATCHING_CASES = [
    "hard_negative_equal_shards",
    "hard_negative_unequal_shards",
    "distillation_equal_shards",
    "distillation_unequal_shards",
]


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((name for name in names if name.startswith("lo")), None)


@pytest.fixture(scope="module")
def distributed_result(tmp_path_factory) -> dict:
    output_path = tmp_path_factory.mktemp("distributed") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback  # keep gloo on 127.0.0.1
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_local_port()}",
        str(SCRIPT), str(output_path),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    return json.loads(output_path.read_text())


@pytest.mark.parametrize("case", MATCHING_CASES)
def test_gathered_loss_and_ddp_gradients_match_single_process(distributed_result, case):
    assert distributed_result["world_size"] == 2
    assert distributed_result["dtype"] == "torch.float64"
    result = distributed_result["cases"][case]
    print(f"{case}: loss diff {result['loss_max_abs_diff']:.3g}, grad diff {result['grad_max_abs_diff']:.3g}")
    assert result["loss_max_abs_diff"] <= FLOAT64_TOLERANCE, result
    assert result["grad_max_abs_diff"] <= FLOAT64_TOLERANCE, result
    assert result["grad_max_abs"] > 1e-3, "the check needs non-trivial gradients to mean anything"


def test_hard_negative_cases_exercise_filter_and_repetition(distributed_result):
    for case in ("hard_negative_equal_shards", "hard_negative_unequal_shards"):
        stats = distributed_result["cases"][case]["single_process_stats"]
        assert stats["false_negative_fraction"] > 0, (case, stats)
        assert stats["rows_short_of_k"] > 0, (case, stats)


def test_gather_keeping_only_local_gradient_is_detected(distributed_result):
    # The VLM2Vec-style gather (local tensor back in its slot) gives 1/world_size of the gradient
    # after DDP averaging; the comparison above must be able to see that.
    result = distributed_result["cases"]["control_local_slot_gather"]
    assert result["loss_max_abs_diff"] <= FLOAT64_TOLERANCE
    assert result["grad_max_abs_diff"] > 1e-3, result


def test_single_process_gather_is_identity():
    assert world_info() == (0, 1)
    tensor = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(tensor) is tensor


def test_gather_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        gather_with_grad([1.0, 2.0])
