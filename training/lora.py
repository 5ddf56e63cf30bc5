"""LoRA on a UniME model (peft) and saving the merged model as a standalone UniME checkpoint."""

import copy
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from transformers.dynamic_module_utils import custom_object_save

from modeling_unime.adapter_checkpoint import BASE_RECORD_KEY, base_model_record
from modeling_unime.atomic import atomic_directory
from modeling_unime.bundle import write_bundle
from modeling_unime.sentence_transformers_module import write_sentence_transformers_files

# Linear layers of the Qwen2 / Llama / Mistral decoder blocks every supported backbone uses.
LANGUAGE_MODEL_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SCOPES = ("language_model", "all")


def lora_targets(model, target_modules=LANGUAGE_MODEL_LINEAR_LAYERS, scope="language_model"):
    """What peft's `target_modules` gets for `scope`.

    `"language_model"`: the linear layers named in `target_modules` inside the language model (a regex).
    `"all"` (the paper's stage-2 "all parameters within the MLLM" reading): those, plus every linear layer
    of the vision tower and projector, whose names differ by family (CLIP/SigLIP `q_proj`..`fc2`, Qwen
    `qkv`, `proj`, `fc1`/`linear_fc1`, mergers and projectors): a list of full module names.
    """
    if scope not in LORA_SCOPES:
        raise ValueError(f"lora scope {scope!r}; expected one of {LORA_SCOPES}")
    if scope == "language_model":
        return rf".*\.language_model\..*\.({'|'.join(target_modules)})"
    names = []
    for name, module in model.named_modules():
        in_language_model = ".language_model." in f".{name}."
        if isinstance(module, torch.nn.Linear) and (
            not in_language_model or name.rsplit(".", 1)[-1] in target_modules
        ):
            names.append(name)
    return names


def add_lora(model, rank=16, alpha=None, dropout=0.05, target_modules=LANGUAGE_MODEL_LINEAR_LAYERS,
             scope="language_model"):
    """Wrap `model` (a [`UniMEModel`]) with LoRA adapters; every other weight is frozen.

    Args:
        rank (`int`): LoRA rank (paper: 32 in stage 1, 16 in stage 2).
        alpha (`int`, *optional*): LoRA alpha; defaults to `2 * rank`.
        dropout (`float`): LoRA dropout.
        target_modules (`tuple[str]`): linear-layer names to adapt.
        scope (`str`): `"language_model"` or `"all"`.

    Returns:
        `peft.PeftModel` whose `base_model.model` is the UniME model.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model already has LoRA adapters; merge them first (merge_lora) before adding new ones")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=lora_targets(model, target_modules, scope),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour of
        # `is_activation_checkpointing`: the warning is about peft's code, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model):
    """Return the plain UniME model with LoRA weights merged in (a no-op for a model without LoRA)."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def unwrap_unime(model):
    """The [`UniMEModel`] inside a PeftModel / DDP / compiled wrapper."""
    while True:
        if isinstance(model, PeftModel):
            model = model.base_model.model
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_atomically(write, output_dir):
    """Call `write(staging_dir)` and make the result `output_dir` only once it is complete, readable by
    others (see `modeling_unime.atomic`): a failure or crash leaves the previous `output_dir` as it was."""
    with atomic_directory(output_dir) as staging:
        write(staging)
    return Path(output_dir)


def merged_state_dict(peft_model, full_state_dict=None):
    """State dict of the UniME model with every active LoRA adapter folded in (W + scale * B A),
    under the plain UniME key names; the modules themselves are not touched, so training can go on
    with bit-identical weights.

    `full_state_dict`: the PEFT model's whole state dict when its parameters are sharded (FSDP:
    `accelerator.get_state_dict`, gathered on the main process); W, A and B are then read from it.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    prefix = "base_model.model."
    deltas = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        weight = module.get_base_layer().weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(
                f"{name}: cannot fold LoRA into {weight.dtype} (quantised) weights; reload the backbone in "
                "16/32-bit, load the adapters on it and save the merged model from there"
            )
        adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
        if full_state_dict is None:
            delta = sum(module.get_delta_weight(adapter) for adapter in adapters)
        else:  # get_delta_weight's formula, on the gathered A and B
            delta = sum(transpose(full_state_dict[f"{name}.lora_B.{adapter}.weight"]
                                  @ full_state_dict[f"{name}.lora_A.{adapter}.weight"], module.fan_in_fan_out)
                        * module.scaling[adapter] for adapter in adapters)
        deltas[f"{name}.base_layer.weight"] = delta
    merged = {}
    for key, tensor in (peft_model.state_dict() if full_state_dict is None else full_state_dict).items():
        if "lora_" in key:
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key].float()).to(tensor.dtype)
        key = key[len(prefix):] if key.startswith(prefix) else key
        merged[key.replace(".base_layer.", ".")] = tensor.detach()
    return merged


def save_merged_model(model, processor, output_dir, safe_serialization=True, full_state_dict=None):
    """Save `model` (UniME, optionally LoRA-wrapped) as a standalone UniME checkpoint with its processor.

    LoRA adapters are folded into the saved weights only (`merged_state_dict`); the live model is
    unchanged, so training can continue. The directory appears only once complete (see `save_atomically`) and loads with
    `AutoModel.from_pretrained(output_dir, trust_remote_code=True)`. `full_state_dict`: see `merged_state_dict`.
    """
    unime = unwrap_unime(model)
    peft_model = model if isinstance(model, PeftModel) else None

    def write(directory):
        state_dict = full_state_dict if peft_model is None else merged_state_dict(peft_model, full_state_dict)
        unime.save_pretrained(directory, state_dict=state_dict, safe_serialization=safe_serialization)
        if processor is not None:
            processor.save_pretrained(directory)

    return save_atomically(write, output_dir)


def write_adapter_checkpoint_config(peft_model, directory, final_directory=None):
    """Add the UniME `config.json` (with the base-model record), code and sentence-transformers files to a
    folder where `peft_model.save_pretrained` wrote LoRA adapters, so that the folder loads with
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` from any directory or machine (see
    `modeling_unime/adapter_checkpoint.py`).

    Args:
        peft_model (`PeftModel`): the LoRA-wrapped UniME model whose adapters are in `directory`.
        directory (`str` or `os.PathLike`): the folder being written.
        final_directory (`str` or `os.PathLike`, *optional*): where the folder will live once published,
            if it is being written elsewhere first (the relative path to the base is taken from there).
    """
    unime = unwrap_unime(peft_model)
    base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    config = copy.deepcopy(unime.config)
    setattr(config, BASE_RECORD_KEY, base_model_record(base, final_directory or directory))
    custom_object_save(unime, directory, config=config)
    config.save_pretrained(directory)
    write_sentence_transformers_files(directory, config)
    write_bundle(directory)
