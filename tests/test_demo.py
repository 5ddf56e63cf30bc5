"""A shortened run of the README's main job (examples/demo.py --quick): artefacts, reload, learning."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_quick_demo_trains_evaluates_and_reloads(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--quick", "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1",
                                                                             "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    for artefact in ("report.md", "training_curves.png", "results.json", "final_model/config.json",
                     "final_model/model.safetensors", "final_model/modeling_unime.py", "final_model/README.md"):
        assert (out / artefact).is_file(), artefact
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    assert summary["reload_max_abs_diff"] <= 1e-5
    before, after = summary["results"]["untrained"], summary["results"]["after stage 2"]

    def retrieval_r5(results):
        return results["retrieval"]["t2i_R@5"] + results["retrieval"]["i2t_R@5"]

    assert retrieval_r5(after) > retrieval_r5(before) + 0.15, (before["retrieval"], after["retrieval"])
    assert after["mmeb"]["average"] > before["mmeb"]["average"] + 0.08, (before["mmeb"], after["mmeb"])
    report = (out / "report.md").read_text()
    assert "| after stage 2 |" in report and "trained from random weights" in report
    card = (out / "final_model" / "README.md").read_text()
    assert "distillation" in card and "hard_negative" in card
