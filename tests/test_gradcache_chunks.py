"""GradCache chunks bounded by a token budget (image tokens included), with unchanged gradients."""

import datasets
import pytest
import torch
from PIL import Image

from training.gradcache import gradcache_step
from training.hard_negative import HardNegativeConfig
from training.lora import add_lora
from training.losses import hard_negative_infonce_loss
from training.mmeb_data import MMEBCollator, load_mmeb_train
from training.demo.tiny_models import tiny_unime

LONG = "a long target sentence that goes on and on about many different things " * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "img").mkdir()
    for i in range(6):
        Image.new("RGB", (40, 32), (30 * i, 200 - 20 * i, 90)).save(root / "img" / f"{i}.png")
    records = [{"qry": "<|image_1|> Represent the image", "qry_image_path": f"img/{i}.png",
                "pos_text": LONG if i in (2, 3) else f"label {i}", "pos_image_path": ""} for i in range(6)]
    rows = list(load_mmeb_train(datasets.Dataset.from_list(records)))
    model, processor = tiny_unime("qwen2_vl")
    return rows, root, model, processor


def row_tokens(processor, batch):
    """Real tokens of each row, counted on the processed batch."""
    return batch["attention_mask"].sum(dim=1).tolist()


def test_chunks_close_at_the_token_budget(setup):
    rows, root, _, processor = setup
    whole = MMEBCollator(processor, image_root=root, image_size=56)(rows)
    lengths = row_tokens(processor, whole["target"])
    short, long = lengths[0], lengths[2]
    assert long > 3 * short and lengths == [short, short, long, long, short, short]
    budget = 2 * long  # two long targets fit; a short row after a long pair would pad to 3 x long
    batch = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=4, max_tokens_per_chunk=budget)(rows)
    assert [chunk["input_ids"].shape[0] for chunk in batch["target"]] == [2, 2, 2]
    assert [chunk["input_ids"].shape[0] for chunk in batch["query"]] == [4, 2]  # queries are all short
    for chunk in batch["target"]:
        assert chunk["input_ids"].numel() <= budget
    tiny = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=4, max_tokens_per_chunk=1)(rows)
    assert [chunk["input_ids"].shape[0] for chunk in tiny["target"]] == [1] * 6  # a row over budget goes alone


def test_budgeted_chunks_give_the_unchunked_gradients(setup):
    rows, root, model, processor = setup
    model = add_lora(tiny_unime("qwen2_vl")[0].double(), rank=4, alpha=8, dropout=0.0).train()
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)

    def as_double(batch):
        return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}

    def loss_fn(query, target):
        return hard_negative_infonce_loss(query, target, temperature=0.05, num_hard_negatives=3)

    whole = MMEBCollator(processor, image_root=root, image_size=56)(rows)
    loss, _ = loss_fn(model(**as_double(whole["query"])).embeddings, model(**as_double(whole["target"])).embeddings)
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    chunked = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=4, max_tokens_per_chunk=40)(rows)
    gradcache_step(model, [as_double(c) for c in chunked["query"]], [as_double(c) for c in chunked["target"]],
                   loss_fn)
    # Chunks pad differently from the whole batch; position tables are float32, so equality is to
    # float32 rounding of the positions, not to float64 (test_gradcache compares chunk layouts exactly).
    scale = max(g.abs().max().item() for g in reference.values())
    for name, gradient in reference.items():
        assert (dict(model.named_parameters())[name].grad - gradient).abs().max().item() < 1e-6 * scale, name


def test_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="max_tokens_per_chunk needs chunk_size"):
        MMEBCollator(None, max_tokens_per_chunk=100)
    with pytest.raises(ValueError, match="max_tokens_per_chunk must be >= 1 or None, got 0"):
        MMEBCollator(None, chunk_size=2, max_tokens_per_chunk=0)
    with pytest.raises(ValueError, match="gradcache_max_tokens bounds GradCache chunks: set gradcache_chunk_size"):
        HardNegativeConfig("out", gradcache_max_tokens=100, report_to="none")


@pytest.mark.parametrize("scope", ["language_model", "all"])
def test_images_reach_the_device_one_chunk_at_a_time(setup, scope):
    """`prepare` (the Trainer's move to the device; here a copy we can watch) gets one chunk at a time: when it
    is called, no earlier chunk's moved pixels are still alive, with the vision tower frozen (its features
    are cached and the pixels dropped) or trained (the chunk is moved again at each pass). Gradients are
    those of the chunks used where they are."""
    import weakref

    rows, root, _, processor = setup
    chunked = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=2)(rows)

    def loss_fn(query, target):
        return hard_negative_infonce_loss(query, target, temperature=0.05, num_hard_negatives=3)

    def gradients(prepare):
        torch.manual_seed(0)
        model = add_lora(tiny_unime("qwen2_vl")[0], rank=4, alpha=8, dropout=0.0, scope=scope).train()
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
        gradcache_step(model, chunked["query"], chunked["target"], loss_fn, prepare=prepare)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    moved_pixels, alive_at_call = [], []

    def prepare(chunk):
        alive_at_call.append(sum(ref() is not None for ref in moved_pixels))
        moved = {key: value.clone() if torch.is_tensor(value) else value for key, value in chunk.items()}
        if "pixel_values" in moved:
            moved_pixels.append(weakref.ref(moved["pixel_values"]))
        return moved

    watched = gradients(prepare)
    image_chunks = len(chunked["query"])  # every query has an image, no target has one
    assert len(moved_pixels) == image_chunks * (1 if scope == "language_model" else 3)
    assert max(alive_at_call) == 0
    reference = gradients(None)
    assert watched.keys() == reference.keys()
    for name, gradient in reference.items():
        assert torch.equal(watched[name], gradient), name
