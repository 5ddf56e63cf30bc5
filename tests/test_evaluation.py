"""Tests for training/evaluation.py: metrics against hand-computed cases and loop references, the MMEB
harness on files written here, and the Trainer callback on a real tiny Trainer."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.callbacks import EmbeddingEvalCallback
from training.evaluation import (
    load_mmeb_datasets,
    TIE_TOLERANCE,
    compositional_accuracy,
    encoder_from_model,
    evaluate_compositional,
    evaluate_mmeb,
    evaluate_retrieval,
    mmeb_summary,
    model_evaluation,
    precision_at_1,
    retrieval_recall,
    write_results,
)

# ---------------------------------------------------------------------------------------------
# Loop references: the definitions written the obvious way
# ---------------------------------------------------------------------------------------------


def reference_precision_at_1(scores, tol=TIE_TOLERANCE):
    hits = [all(row[0] > other + tol for other in row[1:]) for row in scores.tolist()]
    return sum(hits) / len(hits)


def reference_recall(scores, positives, k, tol=TIE_TOLERANCE):
    """scores: list of rows; positives: list of sets of candidate indices."""
    hits = 0
    for row, positive in zip(scores, positives):
        best = max(row[j] for j in positive)
        rank = sum(1 for j, value in enumerate(row) if j not in positive and value >= best - tol)
        hits += rank < k
    return hits / len(scores)


# ---------------------------------------------------------------------------------------------
# Precision@1
# ---------------------------------------------------------------------------------------------


def test_precision_at_1_hand_cases():
    scores = torch.tensor([
        [0.9, 0.1, 0.2],          # clear hit
        [0.5, 0.5, 0.1],          # exact tie with the ground truth: miss
        [0.2, 0.3, 0.1],          # distractor wins
        [0.4, 0.4 + 5e-7, 0.0],   # within tie tolerance: miss
        [0.4, 0.4 - 5e-6, 0.0],   # beyond tolerance: hit
    ])
    assert precision_at_1(scores) == pytest.approx(2 / 5)
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[1, 1] = False            # a copy of the ground truth does not compete
    mask[2, 1] = False
    assert precision_at_1(scores, mask) == pytest.approx(4 / 5)


def test_precision_at_1_degenerate_and_edge_cases():
    assert precision_at_1(torch.full((4, 10), 0.3)) == 0.0          # collapsed encoder scores nothing
    assert precision_at_1(torch.tensor([[0.1], [0.5]])) == 1.0      # nothing to beat
    assert precision_at_1(torch.tensor([[float("nan"), 0.1]])) == 0.0
    with pytest.raises(ValueError, match="num_queries"):
        precision_at_1(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="candidate_mask shape"):
        precision_at_1(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


def test_precision_at_1_matches_loop_reference_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (200, 7), generator=generator).float() / 4  # many exact ties
    assert precision_at_1(scores) == pytest.approx(reference_precision_at_1(scores))


# ---------------------------------------------------------------------------------------------
# Retrieval Recall@K
# ---------------------------------------------------------------------------------------------


def test_retrieval_recall_hand_case_with_several_captions():
    # image_emb = identity, so text_emb rows *are* the text->image scores.
    scores = torch.tensor([
        [0.9, 0.1, 0.0],   # caption 0 -> image 0: rank 0
        [0.5, 0.6, 0.5],   # caption 1 -> image 0: tie with image 2 counts against -> rank 2
        [0.2, 0.8, 0.1],   # caption 2 -> image 1: rank 0
        [0.3, 0.2, 0.1],   # caption 3 -> image 1: rank 1
        [0.3, 0.3, 0.3],   # caption 4 -> image 2: all tied -> rank 2
    ])
    text_to_image = [0, 0, 1, 1, 2]
    metrics = retrieval_recall(scores, torch.eye(3), text_to_image, ks=(1, 2, 3))
    assert metrics["t2i_R@1"] == pytest.approx(2 / 5)
    assert metrics["t2i_R@2"] == pytest.approx(3 / 5)
    assert metrics["t2i_R@3"] == 1.0
    # image->text: image 0 best positive 0.9 (caption 0), nothing else >= 0.9 -> rank 0.
    # image 1 best positive 0.8, negatives 0.1, 0.6, 0.0, 0.3 -> rank 0.
    # image 2 best positive 0.3 (caption 4); negatives 0.0, 0.5, 0.1, 0.1 -> 0.5 beats it -> rank 1.
    assert metrics["i2t_R@1"] == pytest.approx(2 / 3)
    assert metrics["i2t_R@2"] == 1.0


def test_retrieval_recall_collapsed_encoder_is_pessimistic():
    metrics = retrieval_recall(torch.ones(20, 4), torch.ones(10, 4), [i // 2 for i in range(20)], ks=(1, 5, 10))
    # every image ties: 9 negatives rank above each caption's image, 18 captions above each image's
    assert metrics == {"t2i_R@1": 0.0, "t2i_R@5": 0.0, "t2i_R@10": 1.0,
                       "i2t_R@1": 0.0, "i2t_R@5": 0.0, "i2t_R@10": 0.0}


def test_retrieval_recall_matches_loop_reference():
    generator = torch.Generator().manual_seed(1)
    text_emb = torch.randint(-2, 3, (30, 5), generator=generator).float()
    image_emb = torch.randint(-2, 3, (12, 5), generator=generator).float()
    text_to_image = [i % 12 for i in range(30)]
    metrics = retrieval_recall(text_emb, image_emb, text_to_image, ks=(1, 3, 5))
    scores = (text_emb @ image_emb.T).tolist()
    image_scores = (image_emb @ text_emb.T).tolist()
    captions_of = [{t for t, i in enumerate(text_to_image) if i == image} for image in range(12)]
    for k in (1, 3, 5):
        assert metrics[f"t2i_R@{k}"] == pytest.approx(reference_recall(scores, [{i} for i in text_to_image], k))
        assert metrics[f"i2t_R@{k}"] == pytest.approx(reference_recall(image_scores, captions_of, k))


@pytest.mark.parametrize("text_to_image, ks, match", [
    ([0, 0, 0], (1,), "have no caption"),
    ([0, 1, 5], (1,), r"text_to_image\[2\]"),
    ([0, 1], (1,), "2 entries for 3 texts"),
    ([0, 1, 1], (0,), "positive ints"),
])
def test_retrieval_recall_rejects_bad_inputs(text_to_image, ks, match):
    with pytest.raises(ValueError, match=match):
        retrieval_recall(torch.ones(3, 2), torch.ones(2, 2), text_to_image, ks=ks)


# ---------------------------------------------------------------------------------------------
# Compositional accuracy
# ---------------------------------------------------------------------------------------------


def test_compositional_accuracy_hand_case():
    image = torch.tensor([[1.0, 0.0]] * 5)
    positive = torch.tensor([[0.9, 0.0], [0.5, 0.0], [0.1, 0.0], [0.7, 0.0], [0.3, 0.0]])
    negative = torch.tensor([[0.2, 0.0], [0.5, 0.0], [0.4, 0.0], [0.1, 0.0], [0.3, 5.0]])
    groups = ["swap", "swap", "replace", "replace", "add"]
    # sims pos/neg: .9>.2 ok, .5=.5 tie wrong, .1<.4 wrong, .7>.1 ok, .3=.3 tie wrong
    assert compositional_accuracy(image, positive, negative, groups) == pytest.approx(
        {"add": 0.0, "replace": 0.5, "swap": 0.5, "overall": 0.4})
    with pytest.raises(ValueError, match="2 groups for 5 samples"):
        compositional_accuracy(image, positive, negative, groups[:2])
    with pytest.raises(ValueError, match="reserved"):
        compositional_accuracy(image, positive, negative, ["overall"] * 5)


# ---------------------------------------------------------------------------------------------
# Task runners with a fake encoder whose answers are known
# ---------------------------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
BASIS = {"red": [1.0, 0, 0, 0], "green": [0, 1.0, 0, 0], "blue": [0, 0, 1.0, 0]}


class FakeEncoder:
    """Texts map through `texts`; an image maps to the basis vector of its colour; a fused item adds
    the two. Records every call."""

    def __init__(self, texts, expected_size=None):
        self.texts, self.expected_size, self.calls = texts, expected_size, []

    def image_vector(self, image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        if self.expected_size is not None:
            assert image.size == self.expected_size
        colour = {rgb: name for name, rgb in COLOURS.items()}[image.getpixel((0, 0))]
        return torch.tensor(BASIS[colour])

    def vector(self, item):
        if isinstance(item, str):
            return torch.tensor(self.texts[item])
        if isinstance(item, dict):
            return torch.tensor(self.texts[item["text"]]) + self.image_vector(item["image"])
        return self.image_vector(item)

    def __call__(self, items, prompt_style):
        self.calls.append((list(items), prompt_style))
        return torch.stack([self.vector(item) for item in items])


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (4, 4), rgb).save(root / f"{name}.png")
    return root


CLS_QUERY = "<|image_1|> Represent the given image for classification."
MMEB_TEXTS = {CLS_QUERY: [0.0] * 4, "find red": BASIS["red"], "find nothing": [1.0, 1.0, 1.0, 0],
              **{name: BASIS[name] for name in COLOURS}, "": [0.0] * 4}


def mmeb_rows():
    def cls_row(image, candidates):
        return {"qry_text": CLS_QUERY, "qry_img_path": f"{image}.png", "tgt_text": candidates,
                "tgt_img_path": [""] * len(candidates)}
    classification = [
        cls_row("red", ["red", "green", "blue"]),       # hit
        cls_row("green", ["green", "red", "blue"]),     # hit
        cls_row("blue", ["red", "green", "blue"]),      # wrong ground truth label: miss
        cls_row("green", ["green", "green", "red"]),    # copy of the ground truth does not compete: hit
    ]
    images = ["red.png", "green.png", "blue.png"]
    t2i = [
        {"qry_text": "find red", "qry_img_path": "", "tgt_text": ["", "", ""], "tgt_img_path": images},
        {"qry_text": "find nothing", "qry_img_path": None, "tgt_text": [None] * 3, "tgt_img_path": images},
    ]
    return {"ImageNet_1K": classification, "EDIS": t2i}


EXPECTED_MMEB = {"ImageNet_1K": 0.75, "EDIS": 0.5, "average": 0.625, "Classification": 0.75,
                 "IND": 0.75, "Retrieval": 0.5, "OOD": 0.5, "Overall": 0.625}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("fmt", ["dict", "jsonl", "parquet"])
def test_evaluate_mmeb_scores_known_answers(fmt, tmp_path, image_root):
    datasets = mmeb_rows()
    if fmt != "dict":
        data_dir = tmp_path / fmt
        data_dir.mkdir()
        for name, rows in datasets.items():
            if fmt == "jsonl":
                write_jsonl(data_dir / f"{name}.jsonl", rows)
            else:
                pq.write_table(pa.Table.from_pylist(rows), data_dir / f"{name}.parquet")
        datasets = data_dir
    encoder = FakeEncoder(MMEB_TEXTS, expected_size=(8, 8))
    assert evaluate_mmeb(datasets, encoder, image_root=image_root, image_size=8) == pytest.approx(EXPECTED_MMEB)
    assert {style for _, style in encoder.calls} == {"instruction"}
    encoded = [item for items, _ in encoder.calls for item in items]
    # ImageNet_1K: 3 fused queries + 3 label texts; EDIS: 2 query texts + 3 images
    assert len(encoded) == 11
    assert sorted(item for item in encoded if isinstance(item, str)) == sorted(
        ["red", "green", "blue", "find red", "find nothing"])


def test_evaluate_mmeb_chunking_gives_the_same_scores(image_root):
    scores = evaluate_mmeb(mmeb_rows(), FakeEncoder(MMEB_TEXTS), image_root=image_root, chunk_size=1)
    assert scores == pytest.approx(EXPECTED_MMEB)


def test_mmeb_summary_groups_only_mmeb_names():
    summary = mmeb_summary({"ImageNet-A": 0.2, "gqa": 0.4, "MSCOCO": 0.9, "toy": 0.1})
    assert summary == pytest.approx({"average": 0.4, "Classification": 0.2, "OOD": 0.3, "VQA": 0.4,
                                     "Grounding": 0.9, "IND": 0.9, "Overall": 0.5})


@pytest.mark.parametrize("bad_row, match", [
    ({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"]}, r"row 1: missing field\(s\) \['tgt_img_path'\]"),
    ({"qry_text": "q", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []}, "row 1: empty candidate list"),
    ({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": [""]}, "row 1: tgt_text has 2"),
    ({"qry_text": "", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}, "row 1: query needs"),
    ({"qry_text": "q", "qry_img_path": "", "tgt_text": "a", "tgt_img_path": [""]},
     "row 1: tgt_text and tgt_img_path must be lists"),
])
def test_evaluate_mmeb_rejects_malformed_rows(bad_row, match):
    good = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}
    with pytest.raises(ValueError, match="dataset 'toy' " + match):
        evaluate_mmeb({"toy": [good, bad_row]}, FakeEncoder({"q": [1.0], "a": [1.0]}))


def test_evaluate_mmeb_names_missing_image(tmp_path):
    rows = [{"qry_text": "q", "qry_img_path": "missing.png", "tgt_text": ["a"], "tgt_img_path": [""]}]
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        evaluate_mmeb({"toy": rows}, FakeEncoder({"q": [1.0], "a": [1.0]}), image_root=tmp_path)


def test_evaluate_mmeb_rejects_wrong_encoder_output():
    rows = [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}]
    with pytest.raises(ValueError, match=r"encode_fn must return a \[2, dim\] tensor"):
        evaluate_mmeb({"toy": rows}, lambda items, style: torch.zeros(1, 3))


def test_evaluate_retrieval_matches_metric_on_known_embeddings(image_root):
    rows = [{"image_path": "red.png", "captions": ["a red one", "crimson"]},
            {"image_path": "green.png", "captions": ["a green one", "crimson"]},  # shared caption text
            {"image_path": "blue.png", "captions": ["a blue one"]}]
    texts = {"a red one": BASIS["red"], "crimson": BASIS["red"], "a green one": BASIS["blue"],
             "a blue one": BASIS["blue"]}
    encoder = FakeEncoder(texts)
    metrics = evaluate_retrieval(rows, encoder, image_root=image_root, ks=(1, 2))
    text_emb = torch.tensor([texts[t] for t in ["a red one", "crimson", "a green one", "crimson", "a blue one"]])
    image_emb = torch.tensor([BASIS["red"], BASIS["green"], BASIS["blue"]])
    assert metrics == retrieval_recall(text_emb, image_emb, [0, 0, 1, 1, 2], ks=(1, 2))
    # "a green one" embeds as blue and the green image's "crimson" as red: 3 of 5 captions hit
    assert metrics["t2i_R@1"] == pytest.approx(3 / 5)
    assert {style for _, style in encoder.calls} == {"summary"}
    assert sum(len(items) for items, _ in encoder.calls) == 3 + 4  # "crimson" embedded once


def test_evaluate_retrieval_with_mmeb_instructions(image_root):
    """i2t: images with the query instruction vs raw captions; t2i: instructed captions vs images
    with the target instruction; every embedding in instruction style."""
    rows = [{"image_path": "red.png", "captions": ["a red one"]},
            {"image_path": "green.png", "captions": ["a green one"]}]
    instructions = {"image_query": "IQ", "text_query": "find: {}", "image_target": "IT"}
    # The instruction text shifts each embedding: IQ makes green images look red (an i2t miss),
    # IT adds nothing; "find: ..." maps to the right colour.
    texts = {"IQ": [0.0, 0, 0, 0], "IT": [0.0, 0, 0, 0], "a red one": BASIS["red"], "a green one": BASIS["red"],
             "find: a red one": BASIS["red"], "find: a green one": BASIS["green"]}
    encoder = FakeEncoder(texts)
    metrics = evaluate_retrieval(rows, encoder, image_root=image_root, ks=(1,), instructions=instructions)
    # t2i: both instructed captions find their image. i2t: red image -> both captions tie (pessimistic
    # miss); green image -> its caption embeds as red, a miss.
    assert metrics == {"t2i_R@1": 1.0, "i2t_R@1": 0.0}
    assert {style for _, style in encoder.calls} == {"instruction"}
    image_items = [item for items, _ in encoder.calls for item in items if isinstance(item, dict)]
    assert sorted({item["text"] for item in image_items}) == ["IQ", "IT"]
    with pytest.raises(ValueError, match="instructions miss"):
        evaluate_retrieval(rows, encoder, image_root=image_root, instructions={"image_query": "IQ"})


def test_evaluate_compositional_known_answers(image_root):
    rows = [{"image_path": "red.png", "caption": "red", "negative_caption": "green", "group": "replace"},
            {"image_path": "green.png", "caption": "green", "negative_caption": "lime", "group": "replace"},
            {"image_path": "blue.png", "caption": "blue", "negative_caption": "red", "group": "swap"}]
    texts = {**{name: BASIS[name] for name in COLOURS}, "lime": BASIS["green"]}
    metrics = evaluate_compositional(rows, FakeEncoder(texts), image_root=image_root)
    assert metrics == pytest.approx({"replace": 0.5, "swap": 1.0, "overall": 2 / 3})
    with pytest.raises(ValueError, match=r"compositional row 0: missing or empty field\(s\) \['group'\]"):
        evaluate_compositional([{**rows[0], "group": ""}], FakeEncoder(texts), image_root=image_root)


def test_encoder_from_model_passes_prompt_style_and_options():
    class FakeModel:
        def encode(self, items, **kwargs):
            self.kwargs = kwargs
            return torch.zeros(len(items), 2)
    model, processor = FakeModel(), object()
    out = encoder_from_model(model, processor, batch_size=7)(["a", "b"], "instruction")
    assert out.shape == (2, 2)
    assert model.kwargs == {"processor": processor, "batch_size": 7, "show_progress_bar": False,
                            "prompt_style": "instruction"}

    def runner(encode_fn, rows):
        return {"rows": len(rows), "dim": encode_fn(rows, "summary").shape[1]}

    assert model_evaluation(runner, processor, batch_size=7, rows=["a", "b", "c"])(model) == {"rows": 3, "dim": 2}
    assert model.kwargs["batch_size"] == 7 and model.kwargs["prompt_style"] == "summary"


def test_write_results(tmp_path):
    results = {"mmeb": {"ImageNet-1K": 0.5, "average": 0.25}, "retrieval": {"t2i_R@1": 1.0}}
    json_path, markdown_path = write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text()) == results
    assert markdown_path.read_text() == (
        "## mmeb\n\n| metric | score (%) |\n| --- | ---: |\n| ImageNet-1K | 50.00 |\n| average | 25.00 |\n\n"
        "## retrieval\n\n| metric | score (%) |\n| --- | ---: |\n| t2i_R@1 | 100.00 |\n")
    with pytest.raises(ValueError, match="results\\['mmeb'\\]"):
        write_results({"mmeb": {"a": "high"}}, tmp_path)


# ---------------------------------------------------------------------------------------------
# EmbeddingEvalCallback inside a real Trainer
# ---------------------------------------------------------------------------------------------


class TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, labels=None):
        prediction = self.linear(x).squeeze(-1)
        return {"loss": ((prediction - labels) ** 2).mean(), "logits": prediction}


class PairDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"x": torch.full((3,), float(index) / 16), "labels": torch.tensor(float(index % 3))}


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.training_at_step_begin = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.training_at_step_begin.append(model.training)


def make_trainer(tmp_path, max_steps, callbacks=()):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=0.01, report_to="none", save_strategy="no", logging_steps=1000,
                             disable_tqdm=True, use_cpu=True)
    return Trainer(model=TinyRegressor(), args=args, train_dataset=PairDataset(), callbacks=list(callbacks))


def test_callback_logs_into_trainer_log_history_and_other_callbacks(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"score": float(len(seen)), "R@1": 0.5}

    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[recorder])
    EmbeddingEvalCallback(eval_fn, eval_steps=2, metric_prefix="eval_toy/").attach(trainer)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "eval_toy/score" in entry]
    assert [(entry["step"], entry["eval_toy/score"], entry["eval_toy/R@1"]) for entry in logged] == [
        (2, 1.0, 0.5), (4, 2.0, 0.5), (5, 3.0, 0.5)]
    assert [log["eval_toy/score"] for log in recorder.logs if "eval_toy/score" in log] == [1.0, 2.0, 3.0]
    # the last evaluation runs inside the last step, before the trainer's closing summary log
    summary_index = next(i for i, entry in enumerate(trainer.state.log_history) if "train_runtime" in entry)
    assert trainer.state.log_history.index(logged[-1]) < summary_index
    assert seen == [(False, False)] * 3                        # eval mode, no grad
    assert recorder.training_at_step_begin == [True] * 5       # train mode restored


def test_callback_must_be_attached(tmp_path):
    callback = EmbeddingEvalCallback(lambda model: {"x": 1.0}, eval_steps=1)
    with pytest.raises(RuntimeError, match="attach"):
        make_trainer(tmp_path, max_steps=1, callbacks=[callback]).train()


def test_callback_rejects_bad_arguments_and_metrics(tmp_path):
    with pytest.raises(ValueError, match="eval_steps"):
        EmbeddingEvalCallback(lambda model: {}, eval_steps=0)
    with pytest.raises(TypeError, match="callable"):
        EmbeddingEvalCallback({"x": 1.0}, eval_steps=1)
    trainer = make_trainer(tmp_path, max_steps=1)
    EmbeddingEvalCallback(lambda model: {"x": "good"}, eval_steps=1).attach(trainer)
    with pytest.raises(ValueError, match="metric name: number"):
        trainer.train()
    assert trainer.model.training  # restored even though the metrics were rejected


def test_callback_keeps_the_trainers_loss_logs(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.args.logging_steps = 2
    EmbeddingEvalCallback(lambda model: {"x": 1.0}, eval_steps=2, metric_prefix="eval_toy/").attach(trainer)
    trainer.train()
    loss_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    eval_steps = [entry["step"] for entry in trainer.state.log_history if "eval_toy/x" in entry]
    assert loss_steps == [2, 4] and eval_steps == [2, 4]


def test_load_mmeb_datasets_reads_the_hub_layout_with_one_folder_per_dataset(tmp_path):
    first, second = mmeb_rows()["ImageNet_1K"][:2], mmeb_rows()["ImageNet_1K"][2:3]
    (tmp_path / "ImageNet-1K").mkdir()
    pq.write_table(pa.Table.from_pylist(first[:1]), tmp_path / "ImageNet-1K" / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(first[1:]), tmp_path / "ImageNet-1K" / "test-00001-of-00002.parquet")
    write_jsonl(tmp_path / "VOC2007.jsonl", second)
    loaded = load_mmeb_datasets(tmp_path)
    assert loaded == {"ImageNet-1K": first, "VOC2007": second}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no MMEB dataset files"):
        load_mmeb_datasets(tmp_path / "empty")
