"""Frozen vision tower: run it once, without autograd, and hand its output to the backbone.

With LoRA on the language model only (the default), no vision weight trains, so the vision tower
(and, for LLaVA, the projector) needs its forward and nothing else. Left inside the backbone's
forward it costs more: gradient checkpointing's `enable_input_require_grads` hooks *every*
`PreTrainedModel`'s input embeddings, the vision patch embedding included, so backward recomputes
and backpropagates through every frozen vision block; and GradCache's second pass recomputes the
tower although its output is the same as in the first pass.

`with_image_features` computes the image features of a processor batch under `torch.no_grad()`
with the backbone's own `get_image_features` and returns the batch with `mm_encoder_outputs`
(transformers' input for precomputed multimodal encoder outputs) in place of `pixel_values`. The
backbone's forward then skips its vision tower and scatters the given features into the input
embeddings exactly as it would have, so embeddings and LoRA gradients are bit-identical
(tests/test_vision_features.py). When any vision parameter trains (`lora_scope="all"`), the batch
is returned unchanged and the tower runs with autograd as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from .lora import unwrap_unime

# Fields of the vision output that the backbone's forward never reads and that hold per-patch or
# per-layer states (megabytes per image): dropped so that caching the output costs little.
_UNUSED_OUTPUT_FIELDS = ("last_hidden_state", "hidden_states", "attentions")


def vision_trains(backbone: torch.nn.Module) -> bool:
    """Whether any backbone parameter outside the language model requires grad (vision tower,
    projector / merger)."""
    language_model = {id(p) for p in backbone.language_model.parameters()}
    return any(p.requires_grad for p in backbone.parameters() if id(p) not in language_model)


def _sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 shards `module`'s parameters (DTensors, gathered only inside the wrapped forward):
    calling `get_image_features` directly would mix sharded and plain tensors, so the vision tower is
    left to the backbone's own forward there (it is still frozen, so no weight gets a gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def _image_feature_arguments(backbone, batch: Mapping) -> dict:
    """The batch entries `backbone.get_image_features` takes by name (`image_grid_thw`, `image_sizes`, ...)."""
    parameters = inspect.signature(backbone.get_image_features).parameters.values()
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {name: batch[name] for name in names if name != "pixel_values" and batch.get(name) is not None}


def image_features(backbone: torch.nn.Module, batch: Mapping):
    """`get_image_features` output of a processor batch with images, computed without autograd.

    Returns:
        The backbone's `BaseModelOutputWithPooling` (its `pooler_output` holds one `[tokens_i, hidden]`
        tensor per image), without the per-patch / per-layer fields the forward does not read.
    """
    with torch.no_grad():
        output = backbone.get_image_features(batch["pixel_values"], return_dict=True,
                                             **_image_feature_arguments(backbone, batch))
    return type(output)(**{key: value for key, value in output.items() if key not in _UNUSED_OUTPUT_FIELDS})


def with_image_features(model: torch.nn.Module, batch: Mapping) -> Mapping:
    """`batch` with its images' features precomputed (no autograd) when no vision weight trains.

    Args:
        model: a UniME model, possibly wrapped (PEFT, DDP, compiled).
        batch: a processor batch (`input_ids`, `attention_mask`, `pixel_values`, ...).

    Returns:
        A new dict without `pixel_values` and with `mm_encoder_outputs={"image": ...}`, or `batch`
        itself when it has no images, already has features, or a vision parameter trains.
    """
    if batch.get("pixel_values") is None or batch.get("mm_encoder_outputs") is not None:
        return batch
    backbone = unwrap_unime(model).backbone
    if vision_trains(backbone) or _sharded(backbone):
        return batch
    features = image_features(backbone, batch)
    return {**{key: value for key, value in batch.items() if key != "pixel_values"},
            "mm_encoder_outputs": {"image": features}}
