"""The frozen vision tower runs once, without autograd, and nothing the training sees changes.

Reference = the backbone's own forward on `pixel_values` (today's path: with checkpointing, its
backward recomputes and backpropagates through the frozen tower). Lever = `training.gradcache.embed`
/ `gradcache_step`, which feed precomputed features (`mm_encoder_outputs`). Embeddings and LoRA
gradients must be *bit-identical* (torch.equal, float64), for Qwen2-VL and the LLaVA families; the
vision tower must run once per chunk and never in backward; with vision LoRA it still trains.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import gradcache
from training.demo.tiny_models import tiny_unime
from training.gradcache import embed, gradcache_step
from training.lora import add_lora, unwrap_unime
from training.losses import hard_negative_infonce_loss
from training.vision_features import vision_trains, with_image_features

from conftest import drawn_image  # noqa: I001

IMAGES = [drawn_image(seed, size=(40 + 4 * seed, 36)) for seed in range(4)]
QUERIES = [("<|image_1|> What colour is the shape?", IMAGES[0]), (None, IMAGES[1]), ("find the cat", None),
           ("<|image_1|> Describe it.", IMAGES[2])]
TARGETS = [("red", None), (None, IMAGES[3]), ("a cat", None), ("blue square", None)]


def loss_fn(query, target):
    return hard_negative_infonce_loss(query, target, temperature=0.05, num_hard_negatives=2, false_negative_margin=0.05)


def lora_model(family, scope="language_model"):
    model, processor = tiny_unime(family)
    model = add_lora(model.double(), rank=4, alpha=8, dropout=0.0, scope=scope)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # non-zero B so that every LoRA weight gets a non-trivial gradient
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train(), processor


def process(processor, items):
    batch = processor(text=[text for text, _ in items], images=[image for _, image in items],
                      prompt_style="instruction")
    return {key: value.double() if value.is_floating_point() else value for key, value in batch.items()}


def vision_module(backbone):
    return getattr(backbone, "visual", None) or backbone.vision_tower


def first_vision_block(backbone):
    tower = vision_module(backbone)
    return tower.blocks[0] if hasattr(tower, "blocks") else tower.encoder.layers[0]


def count_vision_runs(backbone):
    """List that gets one entry per forward of the vision tower's first block (checkpoint
    recomputation included): whether autograd was recording."""
    runs = []
    hook = first_vision_block(backbone).register_forward_hook(lambda m, i, o: runs.append(torch.is_grad_enabled()))
    return runs, hook


def vision_classes(backbone):
    """Class names of modules that exist only in the vision part (FlopCounterMode names modules by class)."""
    language = {type(m).__name__ for m in backbone.language_model.modules()}
    return {type(m).__name__ for m in vision_module(backbone).modules()} - language


def backward_vision_flops(backbone, loss):
    """Run `loss.backward()`; return the FLOPs it spent inside vision-only modules (recompute + backprop)."""
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    names = vision_classes(backbone)
    return sum(sum(counts.values()) for key, counts in counter.get_flop_counts().items()
               if key != "Global" and key.split(".")[0] in names)


def take_gradients(model):
    # (LLaVA reads the second-to-last CLIP layer: the last one's LoRA weights get no gradient.)
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def set_checkpointing(model, on):
    unime = unwrap_unime(model)
    if on:
        if hasattr(unime, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns)
            unime.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            unime.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(unime, "activation_checkpointing_disable", None) or unime.gradient_checkpointing_disable)()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plain_step_gradients_bit_identical_and_vision_never_backpropagated(family, checkpointing):
    model, processor = lora_model(family)
    query, target = process(processor, QUERIES), process(processor, TARGETS)
    backbone = unwrap_unime(model).backbone
    assert not vision_trains(backbone)
    set_checkpointing(model, checkpointing)
    runs, handle = count_vision_runs(backbone)
    try:
        reference_embeddings = model(**query).embeddings
        loss = loss_fn(reference_embeddings, model(**target).embeddings)[0]
        reference_vision_backward = backward_vision_flops(backbone, loss)
        reference, reference_runs = take_gradients(model), list(runs)
        runs.clear()
        embeddings = embed(model, query)
        lever_loss = loss_fn(embeddings, embed(model, target))[0]
        lever_vision_backward = backward_vision_flops(backbone, lever_loss)
        gradients = take_gradients(model)
    finally:
        handle.remove()
        set_checkpointing(model, False)
    assert torch.equal(embeddings, reference_embeddings)
    assert torch.equal(lever_loss, loss)
    assert reference.keys() == gradients.keys() and len(gradients) > 0
    assert all("lora_" in name for name in gradients)
    assert gradients.keys() == reference.keys()
    for name in reference:
        assert torch.equal(gradients[name], reference[name]), name
    assert max(g.abs().max().item() for g in gradients.values()) > 1e-3
    # Today's path: the tower records a graph, and with checkpointing (which hooks the patch
    # embedding) backward recomputes and backpropagates it. The lever: one forward per batch with
    # images (query and target), no graph, so backward spends nothing there.
    assert reference_runs == [True, True] and runs == [False, False]
    assert (reference_vision_backward > 0) == checkpointing
    assert lever_vision_backward == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_gradcache_runs_the_vision_tower_once_with_bit_identical_gradients(family, monkeypatch):
    model, processor = lora_model(family)
    query_chunks = [process(processor, QUERIES[:2]), process(processor, QUERIES[2:])]
    target_chunks = [process(processor, TARGETS[:3]), process(processor, TARGETS[3:])]
    backbone = unwrap_unime(model).backbone
    runs, handle = count_vision_runs(backbone)
    try:
        with monkeypatch.context() as patch:  # today's GradCache: pixel_values into both passes
            patch.setattr(gradcache, "with_image_features", lambda model, chunk: chunk)
            reference_loss, _ = gradcache_step(model, query_chunks, target_chunks, loss_fn)
        reference, reference_runs = take_gradients(model), list(runs)
        runs.clear()
        loss, _ = gradcache_step(model, query_chunks, target_chunks, loss_fn)
        gradients = take_gradients(model)
    finally:
        handle.remove()
    chunks_with_images = 3  # query chunks 1 and 2, target chunk 1
    assert reference_runs == [False] * chunks_with_images + [True] * chunks_with_images
    assert runs == [False] * chunks_with_images
    assert torch.equal(loss, reference_loss)
    assert gradients.keys() == reference.keys()
    for name in reference:
        assert torch.equal(gradients[name], reference[name]), name


def test_features_replace_pixel_values_only_when_the_vision_tower_is_frozen():
    model, processor = lora_model("qwen2_vl")
    batch = process(processor, QUERIES)
    prepared = with_image_features(model, batch)
    assert "pixel_values" not in prepared and set(prepared["mm_encoder_outputs"]) == {"image"}
    assert prepared["mm_encoder_outputs"]["image"].get("last_hidden_state") is None  # per-patch states dropped
    assert [f.shape[0] for f in prepared["mm_encoder_outputs"]["image"].pooler_output] == \
        [int(n) for n in batch["image_grid_thw"].prod(-1) // 4]
    text_only = process(processor, TARGETS[2:])
    assert with_image_features(model, text_only) is text_only


def test_vision_lora_still_trains_through_the_tower():
    """`lora_scope="all"` adapts the CLIP tower's q/k/v/o projections: the tower runs with autograd and
    its LoRA weights get gradients, equal to the backbone's own forward."""
    model, processor = lora_model("llava", scope="all")
    backbone = unwrap_unime(model).backbone
    assert vision_trains(backbone)
    query = process(processor, QUERIES)
    assert with_image_features(model, query) is query
    direction = torch.randn(unwrap_unime(model).config.text_hidden_size, dtype=torch.float64)
    (embed(model, query) @ direction).sum().backward()
    gradients = take_gradients(model)
    (model(**query).embeddings @ direction).sum().backward()
    reference = take_gradients(model)
    vision = [name for name in gradients if "vision_tower" in name]
    assert vision and all(gradients[name].abs().sum() > 0 for name in vision)
    assert gradients.keys() == reference.keys()
    for name in reference:
        assert torch.equal(gradients[name], reference[name]), name
