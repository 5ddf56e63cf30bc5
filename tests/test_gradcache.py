"""GradCache gives the parameter gradients of one backward over the whole contrastive batch.

Tiny Qwen2-VL and LLaVA-NeXT backbones with LoRA, float64, mixed text / image / image+text items.
With LoRA dropout on, the reference is plain autograd over all chunks at once (one graph, one
`loss.backward()`) with the same RNG stream, so both see the same dropout masks only if GradCache
replays each chunk's RNG state; a control without the replay must differ. With dropout off, the
reference is the unchunked batch (one processor call per side).

Measured (float64, LoRA gradients of magnitude 0.3-9): max |grad difference| <= 1.8e-15 against
full-graph backprop (both families, chunk sizes 1-6, with and without gradient checkpointing);
against the unchunked batch 1.3e-15 for Qwen2-VL and 1.6e-7 (of 5.4) for LLaVA-NeXT, whose RoPE
tables are computed in float32 at absolute positions that shift with a chunk's left padding.
"""

import pytest
import torch

from training.gradcache import RandContext, gradcache_step
from training.lora import add_lora, unwrap_unime
from training.losses import hard_negative_infonce_loss
from training.demo.tiny_models import tiny_unime

from conftest import drawn_image  # noqa: I001


IMAGES = [drawn_image(seed, size=(40 + 4 * seed, 36)) for seed in range(6)]
QUERIES = [("<|image_1|> What colour is the shape?", IMAGES[0]), (None, IMAGES[1]), ("find the cat", None),
           ("<|image_1|> Describe the picture.", IMAGES[2]), ("a red square on grass", None), (None, IMAGES[3])]
TARGETS = [("red", None), (None, IMAGES[4]), ("<|image_1|> a cat", IMAGES[5]),
           ("a long description of several things in a row", None), (None, IMAGES[0]), ("blue", None)]


def loss_fn(query, target):
    # k=3 of 5 candidates and a margin that filters some: the top-k selection matters.
    return hard_negative_infonce_loss(query, target, temperature=0.05, num_hard_negatives=3, false_negative_margin=0.05)


@pytest.fixture(scope="module", params=["qwen2_vl", "llava_next"])
def lora_model(request):
    model, processor = tiny_unime(request.param)
    model = add_lora(model.double(), rank=4, alpha=8, dropout=0.2)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; non-zero B makes the A gradients non-trivial too
            torch.nn.init.normal_(parameter, std=0.05)
    return request.param, model.train(), processor


def process(processor, items):
    batch = processor(text=[text for text, _ in items], images=[image for _, image in items],
                      prompt_style="instruction")
    return {key: value.double() if value.is_floating_point() else value for key, value in batch.items()}


def chunks_of(processor, items, size):
    return [process(processor, items[start:start + size]) for start in range(0, len(items), size)]


def set_lora_dropout(model, p):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" in name:
            module.p = p


def enable_checkpointing(model):
    # transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_* (old names deprecated).
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def disable_checkpointing(model):
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def take_gradients(model):
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return gradients


def full_graph_gradients(model, query_chunks, target_chunks, seed):
    """Independent reference: every chunk forward with autograd, one loss, one backward."""
    torch.manual_seed(seed)
    query = torch.cat([model(**chunk).embeddings for chunk in query_chunks])
    target = torch.cat([model(**chunk).embeddings for chunk in target_chunks])
    loss, _ = loss_fn(query, target)
    loss.backward()
    return loss.detach(), take_gradients(model)


def gradcache_gradients(model, query_chunks, target_chunks, seed, loss_scale=1.0):
    torch.manual_seed(seed)
    loss, _ = gradcache_step(model, query_chunks, target_chunks, loss_fn, loss_scale=loss_scale)
    return loss, take_gradients(model)


def max_difference(gradients, reference):
    return max((gradients[name] - reference[name]).abs().max().item() for name in reference)


def max_magnitude(gradients):
    return max(gradient.abs().max().item() for gradient in gradients.values())


def test_rand_context_replays_then_restores_the_outer_stream():
    torch.manual_seed(3)
    context = RandContext()
    first = torch.rand(4)
    after_first = torch.rand(4)
    torch.manual_seed(3)
    torch.rand(4)
    with context:
        replayed = torch.rand(4)
    assert torch.equal(replayed, first)
    assert torch.equal(torch.rand(4), after_first)  # the replay did not consume the outer stream


@pytest.mark.parametrize("query_chunk, target_chunk, checkpointing",
                         [(1, 1, False), (2, 4, False), (4, 3, False), (6, 6, False), (2, 3, True)])
def test_gradients_equal_full_graph_backprop_with_lora_dropout(lora_model, query_chunk, target_chunk, checkpointing):
    family, model, processor = lora_model
    set_lora_dropout(model, 0.2)
    query_chunks = chunks_of(processor, QUERIES, query_chunk)
    target_chunks = chunks_of(processor, TARGETS, target_chunk)
    backbone = unwrap_unime(model)
    layer = backbone.backbone.language_model.layers[0]
    if checkpointing:
        enable_checkpointing(backbone)
    checkpointed = []  # forwards of layer 0 that went through torch's checkpoint
    checkpoint = getattr(layer, "_gradient_checkpointing_func", None)

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint(*args, **kwargs)

    layer._gradient_checkpointing_func = counting_checkpoint
    try:
        ref_loss, reference = full_graph_gradients(model, query_chunks, target_chunks, seed=11)
        loss, gradients = gradcache_gradients(model, query_chunks, target_chunks, seed=11)
    finally:
        if checkpoint is None:
            del layer._gradient_checkpointing_func
        else:
            layer._gradient_checkpointing_func = checkpoint
        if checkpointing:
            disable_checkpointing(backbone)
    # With checkpointing, every forward with autograd (reference and GradCache pass 2) is checkpointed.
    assert len(checkpointed) == (2 * (len(query_chunks) + len(target_chunks)) if checkpointing else 0)
    assert max_magnitude(reference) > 0.1
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    assert max_difference(gradients, reference) < 1e-11, family


def test_without_rng_replay_gradients_differ(lora_model, monkeypatch):
    """Control: the comparison above can fail. Dropout masks differ between the passes if the
    RNG state is not replayed, and so do the gradients."""
    _, model, processor = lora_model
    set_lora_dropout(model, 0.2)
    query_chunks, target_chunks = chunks_of(processor, QUERIES, 2), chunks_of(processor, TARGETS, 2)
    _, reference = full_graph_gradients(model, query_chunks, target_chunks, seed=11)
    monkeypatch.setattr(RandContext, "__enter__", lambda self: None)
    monkeypatch.setattr(RandContext, "__exit__", lambda self, *exc: None)
    _, gradients = gradcache_gradients(model, query_chunks, target_chunks, seed=11)
    assert max_difference(gradients, reference) > 1e-3 * max_magnitude(reference)


def test_gradients_equal_unchunked_batch_without_dropout(lora_model):
    family, model, processor = lora_model
    set_lora_dropout(model, 0.0)
    try:
        query = model(**process(processor, QUERIES)).embeddings
        target = model(**process(processor, TARGETS)).embeddings
        ref_loss, _ = loss_fn(query, target)
        ref_loss.backward()
        reference = take_gradients(model)
        for query_chunk, target_chunk in [(1, 2), (4, 4)]:
            loss, gradients = gradcache_gradients(model, chunks_of(processor, QUERIES, query_chunk),
                                                  chunks_of(processor, TARGETS, target_chunk), seed=0)
            # Qwen2-VL positions ignore padding: exact. LLaVA-NeXT: float32 RoPE tables at
            # padding-shifted positions (measured 1.6e-7 of gradients ~5).
            tolerance = 1e-12 if family == "qwen2_vl" else 1e-6
            assert loss.item() == pytest.approx(ref_loss.item(), abs=tolerance)
            assert max_difference(gradients, reference) < tolerance * max_magnitude(reference)
    finally:
        set_lora_dropout(model, 0.2)


def test_loss_scale_scales_gradients_not_the_returned_loss(lora_model):
    _, model, processor = lora_model
    query_chunks, target_chunks = chunks_of(processor, QUERIES, 3), chunks_of(processor, TARGETS, 3)
    loss, gradients = gradcache_gradients(model, query_chunks, target_chunks, seed=5)
    scaled_loss, scaled = gradcache_gradients(model, query_chunks, target_chunks, seed=5, loss_scale=0.25)
    assert scaled_loss.item() == loss.item()
    assert max_difference(scaled, {name: 0.25 * grad for name, grad in gradients.items()}) < 1e-14


def test_rejects_unpaired_chunks(lora_model):
    _, model, processor = lora_model
    with pytest.raises(ValueError, match="6 queries but 4 targets"):
        gradcache_step(model, chunks_of(processor, QUERIES, 3), chunks_of(processor, TARGETS[:4], 2), loss_fn)
    with pytest.raises(ValueError, match="at least one query chunk"):
        gradcache_step(model, [], chunks_of(processor, TARGETS, 2), loss_fn)
