"""Benchmarks: each one runs on the tiny CPU setting (a smoke test, nothing is timed against a goal),
and the FLOP formula behind their TFLOP/s and MFU columns matches torch's own FLOP counter."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import efficiency, encode, train_step
from benchmarks.common import (
    build_generation_model,
    build_processor,
    forward_flops,
    load_tokenizer,
    make_images,
    make_texts,
    unime_from_generation_model,
)

FAST = ["--warmup", "0", "--repeats", "1", "--cpu-threads", "1"]


@pytest.fixture(autouse=True)
def restore_cpu_threads():
    """`--cpu-threads` sets torch's global thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_make_texts_has_the_requested_token_counts():
    tokenizer = load_tokenizer()
    texts = make_texts(tokenizer, 30, 10, 40, seed=1)
    counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert all(10 <= count <= 40 for count in counts)
    assert len(set(counts)) > 5  # lengths vary across the range
    assert make_texts(tokenizer, 30, 10, 40, seed=1) == texts


def test_encode_benchmark_runs_and_both_paths_agree(tmp_path):
    path = tmp_path / "encode.json"
    assert encode.main(["--items", "2", *FAST, "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["environment"]["size"] == "tiny"
    workloads = {w["workload"]: w for w in record["workloads"]}
    assert list(workloads) == ["short_text", "long_text", "image"]
    for workload in workloads.values():
        assert workload["items"] == 2
        assert workload["max_abs_diff"] <= 1e-5 and workload["agree"]
        assert workload["min_cosine"] > 1 - 1e-5
        for path_name in ("official", "unime"):
            assert workload[path_name]["items_per_s"] == pytest.approx(2 / workload[path_name]["seconds"])
            assert workload[path_name]["tflops"] > 0
        assert workload["speedup"] == pytest.approx(workload["official"]["seconds"] / workload["unime"]["seconds"])
    # 200-400-token texts are ~10x the 10-40-token ones (plus the same template on both).
    assert workloads["long_text"]["mean_tokens"] - workloads["short_text"]["mean_tokens"] >= 160


def test_encode_benchmark_exits_1_when_embeddings_disagree(tmp_path):
    assert encode.main(["--items", "2", "--workloads", "short_text", "--tolerance", "-1", *FAST]) == 1


TRAIN_CASES = {
    "plain": [],
    "plain_no_checkpointing": ["--no-gradient-checkpointing"],
    "gradcache": ["--gradcache-chunk-size", "2", "--profile", "{tmp}/profile.txt"],
}


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    """Each train-step configuration run once on 4 pairs: case -> (exit status, result record, tmp dir)."""
    results = {}
    for case, extra in TRAIN_CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        extra = [arg.format(tmp=tmp) for arg in extra]
        status = train_step.main(["--batch-size", "4", *FAST, *extra, "--json", str(tmp / "train.json")])
        results[case] = (status, json.loads((tmp / "train.json").read_text())["result"], tmp)
    return results


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_step_benchmark_runs(train_results, case):
    status, result, _ = train_results[case]
    assert status == 0 and result["status"] == "ok"
    assert result["batch_size"] == 4 and result["lora_rank"] == 16 and result["lora_weights"] > 0
    assert result["gradcache_chunk_size"] == (2 if case == "gradcache" else None)
    assert result["pairs_per_s"] == pytest.approx(4 / result["seconds_per_step"])
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["mfu_percent"] == pytest.approx(100 * result["model_tflops"] / 790.0)
    if case == "plain_no_checkpointing":
        assert result["vision_backward"] is False  # nothing upstream of the frozen tower needs a gradient


def test_train_step_profile_names_the_step_phases(train_results):
    profile_text = (train_results["gradcache"][2] / "profile.txt").read_text()
    assert "gradcache_step" in profile_text and "optimizer" in profile_text and "aten::" in profile_text


def test_gradcache_and_plain_steps_compute_the_same_first_loss(train_results):
    """LoRA B starts at zero, so the first step's loss does not depend on how the batch is chunked
    or on dropout (with --warmup 0 --repeats 1 the reported loss is the first step's)."""
    losses = [train_results[case][1]["loss"] for case in TRAIN_CASES]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


@pytest.fixture(scope="module")
def eager_tiny_model():
    processor = build_processor("tiny")
    generation_model = build_generation_model("tiny", len(processor.tokenizer), "cpu", torch.float32, "eager")
    return unime_from_generation_model(generation_model, processor), processor


@pytest.mark.parametrize("inputs", ["text", "image", "fused"])
def test_forward_flop_formula_matches_torch_flop_counter(inputs, eager_tiny_model):
    """One unpadded item through eager attention: torch counts every matmul, attention in full
    (L^2, not the causal half the benchmarks count for the language model)."""
    model, processor = eager_tiny_model
    tokenizer = processor.tokenizer
    kwargs = {"text": make_texts(tokenizer, 1, 30, 30)} if inputs == "text" else {"images": make_images(1, 100)}
    if inputs == "fused":
        kwargs["text"] = make_texts(tokenizer, 1, 12, 12)
    batch = processor(**kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    flops = forward_flops(model.backbone, batch)
    expected = (flops["language_linear"] + 2 * flops["language_attention"]
                + flops["vision_linear"] + flops["vision_attention"])
    assert (flops["vision_linear"] > 0) == (inputs != "text")
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_efficiency_benchmark_counts_every_lever(tmp_path, capsys):
    """Tiny model, counted FLOPs: after the levers every mode executes within 5% of its minimum, the
    frozen vision tower gets no backward, GradCache's pass 1 no longer re-runs the vision tower, and
    encode pads <= 5% at every batch size; before, the same counts show the waste."""
    path = tmp_path / "efficiency.json"
    assert efficiency.main(["--encode-items", "36", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    rows = {(r["mode"], r["when"]): r for r in record["training_tflop_per_pair"]}
    assert set(rows) == {(mode, when) for mode in ("plain", "plain + memory saving", "GradCache")
                         for when in ("before", "after")}
    for (mode, when), row in rows.items():
        phases = ("vision_fwd", "vision_bwd", "lm_fwd", "lm_bwd", "gradcache_pass1")
        assert row["executed"] == pytest.approx(sum(row[p] for p in phases), rel=1e-12)
        assert row["model"] == pytest.approx(rows[("plain", "after")]["vision_fwd"]
                                             + 3 * rows[("plain", "after")]["lm_fwd"], rel=1e-12)
        if when == "after":
            assert row["vision_bwd"] == 0
            assert row["executed_over_minimum"] <= 1.05, mode
    plain = rows[("plain", "after")]
    assert rows[("plain + memory saving", "before")]["vision_bwd"] > 0  # checkpointing hooked the tower
    assert rows[("GradCache", "after")]["vision_fwd"] == pytest.approx(plain["vision_fwd"], rel=1e-12)
    before_pass1 = rows[("GradCache", "before")]["gradcache_pass1"]
    after_pass1 = rows[("GradCache", "after")]["gradcache_pass1"]
    assert before_pass1 - after_pass1 == pytest.approx(plain["vision_fwd"], rel=1e-9)  # vision ran again
    assert rows[("GradCache", "before")]["executed_over_minimum"] > 1.5
    for row in record["encode"]:
        assert row["after_ratio"] <= 1.05 and row["before_ratio"] >= row["after_ratio"]
    out = capsys.readouterr().out
    assert "executed/minimum" in out and "processed/real" in out and "tiny Qwen2-VL as is" in out
