"""Matryoshka embeddings: loss value against a plain loop, both trainers, GradCache exactness (one and
two processes), the trained dims in the model config, evaluation at truncated sizes."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_unime import UniMEConfig, UniMEModel
from training.distillation import DistillationConfig, UniMEDistillationTrainer
import training.evaluation as evaluation
from training.evaluation import ReplayEncoder, compositional_accuracy, evaluate_compositional
from training.gradcache import gradcache_step
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.losses import check_matryoshka, distillation_loss, hard_negative_infonce_loss, matryoshka_loss
from training.demo.tiny_models import tiny_unime

from conftest import drawn_image  # noqa: I001

REPO_ROOT = Path(__file__).resolve().parents[1]
DIMS, WEIGHTS = [4, 12, 32], [0.5, 1.0, 2.0]


def loop_normalise(row):
    """L2-normalise one embedding row (a list of floats), written out."""
    norm = math.sqrt(sum(x * x for x in row))
    return [x / norm for x in row]


def loop_infonce(query, target, temperature):
    """Plain in-batch InfoNCE (every other target a negative), loops over rows and columns."""
    total = 0.0
    for i, q in enumerate(query):
        logits = [sum(a * b for a, b in zip(q, t)) / temperature for t in target]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(x - top) for x in logits))
        total += log_sum - logits[i]
    return total / len(query)


def loop_kd_forward(student, teacher, temperature):
    """Forward KL(P_teacher || P_student) of the row-wise softmax of the off-diagonal similarities."""
    total = 0.0
    for i in range(len(student)):
        others = [j for j in range(len(student)) if j != i]

        def log_softmax(vectors):
            logits = [sum(a * b for a, b in zip(vectors[i], vectors[j])) / temperature for j in others]
            top = max(logits)
            log_sum = top + math.log(sum(math.exp(x - top) for x in logits))
            return [x - log_sum for x in logits]
        log_s, log_t = log_softmax(student), log_softmax(teacher)
        total += sum(math.exp(t) * (t - s) for s, t in zip(log_s, log_t))
    return total / len(student)


def test_matryoshka_loss_equals_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(6, 32, generator=generator, dtype=torch.float64), dim=-1)
    target = torch.nn.functional.normalize(torch.randn(6, 32, generator=generator, dtype=torch.float64), dim=-1)
    teacher = torch.nn.functional.normalize(torch.randn(6, 20, generator=generator, dtype=torch.float64), dim=-1)

    def infonce(q, t):
        return hard_negative_infonce_loss(q, t, temperature=0.05, num_hard_negatives=None, false_negative_margin=None)
    loss, per_dim = matryoshka_loss(infonce, (query, target), DIMS, WEIGHTS)
    expected = sum(w * loop_infonce([loop_normalise(r[:d]) for r in query.tolist()],
                                    [loop_normalise(r[:d]) for r in target.tolist()], 0.05)
                   for d, w in zip(DIMS, WEIGHTS))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert sorted(per_dim) == DIMS

    kd, _ = matryoshka_loss(lambda s: distillation_loss(s, teacher, temperature=0.1), (query,), DIMS, WEIGHTS)
    expected_kd = sum(w * loop_kd_forward([loop_normalise(r[:d]) for r in query.tolist()], teacher.tolist(), 0.1)
                      for d, w in zip(DIMS, WEIGHTS))
    assert kd.item() == pytest.approx(expected_kd, rel=1e-10)
    # a single full-size dim is the plain loss
    plain, _ = matryoshka_loss(infonce, (query, target), [32])
    assert plain.item() == pytest.approx(loop_infonce(query.tolist(), target.tolist(), 0.05), rel=1e-12)


@pytest.mark.parametrize("dims, weights, message", [
    ([], None, "non-empty list"),
    ([8, 8], None, "strictly increasing"),
    ([16, 8], None, "strictly increasing"),
    ([0, 8], None, "positive ints"),
    ([4.0, 8], None, "positive ints"),
    ([4, 8], [1.0], "one number per dim"),
    ([4, 8], [1.0, -1.0], ">= 0"),
    ([4, 8], [0.0, 0.0], "at least one positive"),
])
def test_bad_matryoshka_settings_are_refused(tmp_path, dims, weights, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_matryoshka(dims, weights)
    with pytest.raises((ValueError, TypeError), match=message):
        HardNegativeConfig(output_dir=str(tmp_path), matryoshka_dims=dims, matryoshka_weights=weights)
    with pytest.raises((ValueError, TypeError), match=message):
        DistillationConfig(output_dir=str(tmp_path), matryoshka_dims=dims, matryoshka_weights=weights)


def test_dims_beyond_the_embedding_are_refused():
    query = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    with pytest.raises(ValueError, match="exceed the embedding dimension 16"):
        matryoshka_loss(lambda q, t: hard_negative_infonce_loss(q, t), (query, query), [8, 32])
    with pytest.raises(ValueError, match="exceed the embedding dimension 32"):
        UniMEConfig(backbone_config=tiny_unime("qwen2_vl")[0].config.backbone_config, matryoshka_dims=[16, 64])
    with pytest.raises(ValueError, match="matryoshka_weights is set"):
        HardNegativeConfig(output_dir="out", matryoshka_weights=[1.0])


def stage2_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                    save_merged_model=False, disable_tqdm=True, lora_rank=4, lora_dropout=0.0,
                    contrastive_temperature=0.05, num_hard_negatives=3, false_negative_margin=0.05,
                    matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
    return HardNegativeConfig(**{**settings, **overrides})


IMAGES = [drawn_image(seed, size=(36 + 4 * seed, 32)) for seed in range(4)]
QUERIES = [("<|image_1|> What is shown?", IMAGES[0]), ("find the red circle", None), (None, IMAGES[1]),
           ("a blue square", None), ("<|image_1|> Describe it.", IMAGES[2])]
TARGETS = [("a cat", None), (None, IMAGES[3]), ("two dogs on grass", None), (None, IMAGES[0]), ("blue", None)]


def process(processor, items):
    batch = processor(text=[t for t, _ in items], images=[i for _, i in items], prompt_style="instruction")
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def test_stage2_gradcache_matches_plain_backprop_with_matryoshka(tmp_path):
    """The trainer's contrastive loss (Matryoshka sum) under GradCache (chunks of 2) gives the LoRA
    gradients of one backward over the whole batch, and the loss is the loop formula."""
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEHardNegativeTrainer(model=model.double(), args=stage2_args(tmp_path), processor=processor)
    assert trainer.unime_model().config.matryoshka_dims == DIMS
    torch.manual_seed(1)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    lora = trainer.model.train()

    query = lora(**process(processor, QUERIES)).embeddings
    target = lora(**process(processor, TARGETS)).embeddings
    loss, _ = trainer.contrastive_loss(query, target)
    expected = sum(w * hard_negative_infonce_loss(
        torch.nn.functional.normalize(query[:, :d], dim=-1), torch.nn.functional.normalize(target[:, :d], dim=-1),
        temperature=0.05, num_hard_negatives=3, false_negative_margin=0.05)[0] for d, w in zip(DIMS, WEIGHTS))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    reference = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.zero_grad(set_to_none=True)

    chunks = [[process(processor, items[i:i + 2]) for i in range(0, 5, 2)] for items in (QUERIES, TARGETS)]
    cached_loss, _ = gradcache_step(lora, chunks[0], chunks[1], trainer.contrastive_loss)
    gradients = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    scale = max(g.abs().max().item() for g in reference.values())
    worst = max((gradients[n] - reference[n]).abs().max().item() for n in reference)
    print(f"GradCache vs plain backprop with Matryoshka: max |grad diff| {worst:.2e} of {scale:.2e}")
    assert scale > 1e-3 and worst <= 1e-10 * scale
    # the prefix terms matter: gradients of the full-size loss alone differ
    lora.zero_grad(set_to_none=True)
    full_only = hard_negative_infonce_loss(lora(**process(processor, QUERIES)).embeddings,
                                           lora(**process(processor, TARGETS)).embeddings, temperature=0.05,
                                           num_hard_negatives=3, false_negative_margin=0.05)[0]
    full_only.backward()
    assert max((p.grad - reference[n]).abs().max().item()
               for n, p in lora.named_parameters() if p.requires_grad) > 1e-3 * scale


def test_stage1_loss_is_the_weighted_sum_over_prefixes(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_rank=0,
                              kd_temperature=0.05, matryoshka_dims=[8, 32], matryoshka_weights=[2.0, 1.0])
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor)
    assert model.config.matryoshka_dims == [8, 32]
    texts = ["a dog", "two cats on a mat", "a red car", "the sea at night", "bread"]
    teacher = torch.nn.functional.normalize(torch.randn(5, 12, generator=torch.Generator().manual_seed(3)), dim=-1)
    batch = {**processor(text=texts), "teacher_embeddings": teacher}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        student = model(**processor(text=texts)).embeddings.double()
    expected = sum(w * loop_kd_forward([loop_normalise(r[:d]) for r in student.tolist()], teacher.double().tolist(),
                                       0.05) for d, w in ((8, 2.0), (32, 1.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_trained_dims_travel_with_the_checkpoint(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    UniMEHardNegativeTrainer(model=model, args=stage2_args(tmp_path, lora_rank=0), processor=processor)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["matryoshka_dims"] == DIMS
    assert UniMEModel.from_pretrained(tmp_path / "ckpt").config.matryoshka_dims == DIMS


def test_evaluation_reports_each_trained_dimension():
    """`ReplayEncoder` scores the recorded embeddings again at d dims; compared with truncating by hand."""
    generator = torch.Generator().manual_seed(0)
    table = {}

    def encode_fn(items, prompt_style):
        for item in items:
            table.setdefault(str(item), torch.nn.functional.normalize(torch.randn(32, generator=generator), dim=-1))
        return torch.stack([table[str(item)] for item in items])

    rows = [{"image_path": f"i{k}", "caption": f"c{k}", "negative_caption": f"n{k}", "group": "g"} for k in range(40)]

    recorder = ReplayEncoder(encode_fn)
    original = evaluation.load_image  # images stand in as their path strings here
    evaluation.load_image = lambda path, image_root=None, image_size=None: f"img:{path}"
    try:
        full = evaluate_compositional(rows, recorder)
        at_8 = evaluate_compositional(rows, recorder.at_dim(8))
    finally:
        evaluation.load_image = original
    assert recorder.dim == 32

    def cut(key):
        return torch.nn.functional.normalize(table[key][:8], dim=-1)
    images = torch.stack([cut(f"img:i{k}") for k in range(40)])
    positives = torch.stack([cut(f"c{k}") for k in range(40)])
    negatives = torch.stack([cut(f"n{k}") for k in range(40)])
    expected = compositional_accuracy(images, positives, negatives, ["g"] * 40)
    assert at_8["overall"] == pytest.approx(expected["overall"])
    assert at_8 != full
    with pytest.raises(RuntimeError, match="did not"):
        recorder.at_dim(8)(["x"], "summary")


def _free_local_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process_with_matryoshka(tmp_path):
    output = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_local_port()}",
               str(REPO_ROOT / "tests" / "scripts" / "matryoshka_ddp_check.py"), str(tmp_path / "work"), str(output)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    result = json.loads(output.read_text())
    print(json.dumps(result, indent=1))
    assert result["world_size"] == 2
    for case in ("gradcache", "no_gradcache"):
        assert result[case]["num_gradients"] == 28
        assert result[case]["loss_max_abs_diff"] < 1e-12
        assert result[case]["grad_max_abs_diff"] < 1e-10 * result[case]["grad_max_abs"]


def test_truncate_dim_round_trip_through_a_saved_checkpoint_and_sentence_transformers(tmp_path, images):
    """Trained dims recorded by a trainer -> saved -> reloaded: `encode(truncate_dim=d)` is the first d
    dims of the raw pooled state, re-normalised; an untrained d is refused; sentence-transformers'
    `truncate_dim` gives the same vectors."""
    from sentence_transformers import SentenceTransformer

    model, processor = tiny_unime("qwen2_vl", seed=5)
    args = HardNegativeConfig(str(tmp_path / "run"), matryoshka_dims=[8, 16, 32], lora_rank=0, report_to="none")
    UniMEHardNegativeTrainer(model=model, args=args, processor=processor)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    reloaded = UniMEModel.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.matryoshka_dims == [8, 16, 32]

    items = ["a red square", images[0], {"image": images[1], "text": "two circles"}]
    raw = reloaded.encode(items, normalize_embeddings=False)
    for dim in (8, 16):
        prefix = raw[:, :dim]
        expected = prefix / prefix.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(reloaded.encode(items, truncate_dim=dim), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"truncate_dim=12 is not one of the dimensions this model was trained for"):
        reloaded.encode(items, truncate_dim=12)

    # sentence-transformers slices after its Normalize module and re-normalises only when asked
    # (its own convention): the same direction, hence the same cosine scores, and with
    # normalize_embeddings=True the same vectors.
    st = SentenceTransformer(str(tmp_path / "ckpt"), trust_remote_code=True, truncate_dim=16)
    ours = reloaded.encode(items[:1], truncate_dim=16)
    renormalised = torch.as_tensor(st.encode(items[:1], normalize_embeddings=True))
    torch.testing.assert_close(renormalised, ours, atol=1e-5, rtol=0)
    sliced = torch.as_tensor(st.encode(items[:1]))
    full = raw[:1] / raw[:1].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sliced, full[:, :16], atol=1e-5, rtol=0)
