"""Export a UniME model as its backbone's native checkpoint, for engines that serve embeddings.

vLLM (`--runner pooling`), sentence-transformers and plain transformers all load a
`*ForConditionalGeneration` checkpoint without remote code. `save_for_serving` writes one:

    config.json                  native `architectures` (e.g. Qwen2VLForConditionalGeneration), plus
                                 `is_matryoshka` / `matryoshka_dimensions` when the model was trained for them
    model*.safetensors           the backbone's weights in the native key layout, LoRA folded in; the LM head is
                                 tied to the input embeddings (`tie_word_embeddings`, see `tie_lm_head`)
    tokenizer / image processor  the backbone's files, `processor_config.json` naming the native processor
    chat_template.jinja          renders UniME's prompt from one chat message (text, image or both)
    modules.json, 1_Pooling/, 2_Normalize/, sentence_bert_config.json, config_sentence_transformers.json
                                 sentence-transformers metadata: last-token pooling + normalisation, the
                                 pooling file in the current and the legacy format at once

The embedding of an item is then the released recipe: the last-token final hidden state of the
chat-template prompt, L2-normalised.
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from .prompts import TEXT_PLACEHOLDER

POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
# Legacy module paths: vLLM releases before mid-2026 recognise only these; sentence-transformers 6 maps them.
TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE_TYPE = "sentence_transformers.models.Normalize"
LEGACY_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
IMAGE_PART_TYPES = ("image", "image_url", "image_pil", "image_embeds")


def serving_chat_template(prompt_templates):
    """A Jinja chat template that renders UniME's summary prompt from chat messages.

    The text parts of all messages are concatenated into the item's text; any image part makes it an
    image (or image+text) item. The result is exactly `prompt_templates["text" | "image" | "fused"]`
    with `<sent>` replaced by the text, whatever `add_generation_prompt` says (the prompt already
    ends where the embedding is read; vLLM's embedding endpoint does not set it).

    Args:
        prompt_templates (`dict[str, str]`): `UniMEProcessor.prompt_templates`.

    Returns:
        `str`: the template.
    """
    pieces = {}
    for key in ("text", "fused"):
        template = prompt_templates[key]
        if template.count(TEXT_PLACEHOLDER) != 1:
            raise ValueError(f"prompt_templates[{key!r}] must contain {TEXT_PLACEHOLDER!r} once, got {template!r}")
        pieces[key] = [json.dumps(part, ensure_ascii=False) for part in template.split(TEXT_PLACEHOLDER)]
    image = json.dumps(prompt_templates["image"], ensure_ascii=False)
    return (
        "{%- set ns = namespace(text='', image=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = ns.text + message['content'] -%}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] in {list(IMAGE_PART_TYPES)!r} -%}}{{%- set ns.image = true -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}"
        f"{{%- if ns.image and ns.text -%}}{{{{ {pieces['fused'][0]} + ns.text + {pieces['fused'][1]} }}}}"
        f"{{%- elif ns.image -%}}{{{{ {image} }}}}"
        f"{{%- else -%}}{{{{ {pieces['text'][0]} + ns.text + {pieces['text'][1]} }}}}{{%- endif -%}}"
    )


def _lora_deltas(model):
    """`{weight key: W_delta}` of the unmerged LoRA layers inside `model` (peft duck-typed: this file
    ships inside checkpoints, which depend on torch + transformers only)."""
    deltas = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")) or getattr(module, "merged", False):
            continue
        adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
        if adapters:
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(adapter) for adapter in adapters)
    return deltas


def native_state_dict(model):
    """The backbone's weights under its `*ForConditionalGeneration` key names.

    UniME keys `backbone.<name>` become `model.<name>`; LoRA adapters (peft layers injected into the
    model) are folded in as `W + scale * B A`. There is no `lm_head.weight` (see `tie_lm_head`).
    `save_pretrained` of the native class then writes the layout its checkpoints use on the Hub.

    Returns:
        `dict[str, torch.Tensor]`, tensors detached (shared with the model except for merged layers).
    """
    deltas = _lora_deltas(model)
    state = {}
    for key, tensor in model.state_dict().items():
        if "lora_" in key:
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key].to(tensor.device).float()).to(tensor.dtype)
        key = key.replace(".base_layer.", ".")
        if not key.startswith("backbone."):
            raise ValueError(f"unexpected weight {key!r} outside the backbone; cannot write a native checkpoint")
        state["model." + key[len("backbone."):]] = tensor.detach()
    return state


def tie_lm_head(config):
    """Mark `config` (a backbone config, changed in place) as tying the LM head to the input embeddings.

    A UniME model has no LM head. A tied head is complete without a tensor of its own, so
    `AutoModelForImageTextToText`, `AutoModel` and vLLM load the export with nothing missing and
    nothing unexpected, and the file carries no useless copy of the embedding matrix. Embeddings never
    read the head; text generated from an export is meaningless.
    """
    config.tie_word_embeddings = True
    text_config = config.get_text_config()
    if text_config is not config and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = True
    return config


def pooling_config(embedding_dimension):
    """The sentence-transformers pooling config, readable in both formats.

    Current readers (sentence-transformers 6) take `pooling_mode: "lasttoken"` and drop the boolean
    flags; legacy readers (vLLM before mid-2026, old sentence-transformers) take the boolean
    `pooling_mode_*` flags. `pooling_mode_lasttoken` is the only true flag and comes before
    `include_prompt` (vLLM takes the first true key). The dimension is written under its legacy name
    `word_embedding_dimension` only: old sentence-transformers refuse an unknown `embedding_dimension`
    keyword, while sentence-transformers 6 renames the legacy key (with a deprecation notice).
    """
    config = {"word_embedding_dimension": embedding_dimension}
    config.update({flag: False for flag in LEGACY_POOLING_FLAGS})
    config.update({"pooling_mode_lasttoken": True, "pooling_mode": "lasttoken", "include_prompt": True})
    return config


def write_sentence_transformers_metadata(directory, embedding_dimension, max_seq_length=None, normalize=True):
    """Write `modules.json` (Transformer -> Pooling[ -> Normalize]) and the modules' configs into `directory`."""
    directory = Path(directory)
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_MODULE},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": POOLING_MODULE}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": NORMALIZE_MODULE_TYPE})
        (directory / NORMALIZE_DIR).mkdir(exist_ok=True)
        (directory / NORMALIZE_DIR / "config.json").write_text("{}\n", encoding="utf-8")
    (directory / POOLING_DIR).mkdir(exist_ok=True)
    files = {
        "modules.json": modules,
        f"{POOLING_DIR}/config.json": pooling_config(embedding_dimension),
        "sentence_bert_config.json": {
            "max_seq_length": max_seq_length, "do_lower_case": False, "transformer_task": "feature-extraction",
            # Every input (text, image, image+text) goes through the chat template, i.e. UniME's prompt.
            "modality_config": {modality: dict(forward, **({"format": "structured"} if modality == "message" else {}))
                                for modality in ("text", "image", "message")},
            "module_output_name": "token_embeddings",
        },
        "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "prompts": {},
                                              "default_prompt_name": None, "similarity_fn_name": "cosine"},
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _write_processor(processor, directory, chat_template):
    """Tokenizer, image processor (native class name), chat template and native processor settings."""
    from .processing_unime import BACKBONE_PROCESSOR_CLASSES

    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    path = Path(directory) / "preprocessor_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    # `...ImageProcessorPil` is a transformers-5 backend name; the base name lets every reader pick its backend.
    settings["image_processor_type"] = settings["image_processor_type"].removesuffix("Pil").removesuffix("Fast")
    settings["processor_class"] = BACKBONE_PROCESSOR_CLASSES[processor.backbone_family]
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = Path(directory) / "tokenizer_config.json"
    tokenizer_settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    tokenizer_settings.pop("chat_template", None)
    tokenizer_settings["padding_side"] = "left"
    tokenizer_config.write_text(json.dumps(tokenizer_settings, indent=2) + "\n", encoding="utf-8")
    (Path(directory) / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    processor_settings = dict(processor.backbone_processor_kwargs,
                              processor_class=BACKBONE_PROCESSOR_CLASSES[processor.backbone_family])
    (Path(directory) / "processor_config.json").write_text(json.dumps(processor_settings, indent=2) + "\n",
                                                          encoding="utf-8")


def _publish(staging, output_dir):
    """Rename the complete `staging` dir to `output_dir`, replacing an existing one (never left partial)."""
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, backup)
        os.replace(staging, output_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


def save_for_serving(model, save_directory, processor=None, max_shard_size="5GB", push_to_hub=False, repo_id=None,
                     **push_kwargs):
    """Write `model` as its backbone's native checkpoint (see the module docstring for the files).

    Args:
        model ([`UniMEModel`]): possibly with LoRA layers injected (peft); they are folded in.
        save_directory (`str` or `Path`): created or replaced once complete (written to a sibling temp dir).
        processor ([`UniMEProcessor`], *optional*): its tokenizer, image processor and prompt templates
            are written; without it the export has weights and config only (no chat template).
        max_shard_size (`str`): as in `save_pretrained`.
        push_to_hub (`bool`): then upload the folder to `repo_id` (default: the folder's name).
        **push_kwargs: `HfApi.upload_folder` keywords (`token`, `private` goes to `create_repo`, `commit_message`, ...).

    Returns:
        `Path` of the written directory.
    """
    if processor is not None and processor.backbone_family != model.config.backbone_family:
        raise ValueError(f"processor is for {processor.backbone_family!r} but the model's backbone is "
                         f"{model.config.backbone_family!r}")
    output_dir = Path(save_directory).absolute()
    config = tie_lm_head(copy.deepcopy(model.config.backbone_config))
    dims = getattr(model.config, "matryoshka_dims", None)
    if dims:
        config.is_matryoshka = True
        config.matryoshka_dimensions = sorted({int(d) for d in dims}, reverse=True)
    with torch.device("meta"):
        native = AutoModelForImageTextToText.from_config(config)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        native.save_pretrained(staging, state_dict=native_state_dict(model), max_shard_size=max_shard_size)
        if processor is not None:
            _write_processor(processor, staging, serving_chat_template(processor.prompt_templates))
        write_sentence_transformers_metadata(staging, model.config.text_hidden_size, model.config.max_sequence_tokens,
                                             normalize=model.config.normalize)
        os.chmod(staging, 0o755)
        _publish(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        private = push_kwargs.pop("private", None)
        repo = api.create_repo(repo_id or output_dir.name, private=private, token=push_kwargs.get("token"),
                               exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(output_dir), **push_kwargs)
    return output_dir
