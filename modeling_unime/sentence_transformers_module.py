"""`SentenceTransformer(checkpoint, trust_remote_code=True)` for UniME checkpoints.

Every saved UniME checkpoint carries a `modules.json` naming one module, [`UniMESentenceTransformer`],
whose code ships in the checkpoint next to `modeling_unime.py` (sentence-transformers resolves it with
transformers' dynamic-module loader, hence `trust_remote_code=True`). The module wraps the checkpoint's
own `UniMEModel` and `UniMEProcessor` and embeds through `UniMEModel.encode`, so sentence-transformers
and transformers users get the same vectors from one code path: same prompt templates, same
last-token pooling, same modality-homogeneous sub-batches.

This file imports no sentence-transformers code (the module is duck-typed to sentence-transformers'
`InputModule` interface): it also ships inside checkpoints loaded with plain transformers, where
sentence-transformers may not be installed.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

MODULE_CLASS_REF = "modeling_unime.UniMESentenceTransformer"  # in the bundled modeling_unime.py (bundle.py)
MODULES_FILE = "modules.json"
SENTENCE_TRANSFORMERS_CONFIG_FILE = "config_sentence_transformers.json"

NORMALIZE_MODULE = {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"}


def _st_item(item, index):
    """One sentence-transformers input as a `UniMEModel.encode` item: the same rule as there, a `str` is text
    (even when a file of that name exists); images are `PIL.Image`, `pathlib.Path` or `{"image": ...}`."""
    if isinstance(item, (list, tuple)):
        # ValueError, not TypeError: sentence-transformers retries `preprocess` differently on a TypeError.
        raise ValueError(
            f"item {index}: text pairs and chat-style message lists are not UniME inputs; pass a str, a PIL.Image, "
            "a pathlib.Path or a dict {'image': ..., 'text': ...}"
        )
    return item


class UniMESentenceTransformer(torch.nn.Module):
    """sentence-transformers input module around a [`UniMEModel`] and its [`UniMEProcessor`].

    Inputs are what `UniMEModel.encode` takes: `str` (text), `PIL.Image` or `pathlib.Path` (image), and
    `{"image": ..., "text": ...}` (fused). `SentenceTransformer.encode(prompt=...)` becomes UniME's
    `instruction` (MMEB instruction style), so `encode_query` / `encode_document` use the `prompts` of
    `config_sentence_transformers.json`; `prompt_style="instruction"` is accepted as an encode keyword too.
    The module returns the raw pooled state; a `Normalize` module follows it when `config.normalize`, and
    sentence-transformers applies `truncate_dim`, `normalize_embeddings` and `precision` itself. Inference only: `forward` runs under `torch.inference_mode()`; train with the UniME
    trainers, which optimise exactly these embeddings.
    """

    save_in_root = True
    forward_kwargs = {"prompt_style"}

    def __init__(self, model, processor):
        super().__init__()
        self.model = model
        self.processor = processor

    def __repr__(self):
        backbone = type(self.model.backbone).__name__
        return f"UniMESentenceTransformer(backbone={backbone}, embedding_dimension={self.get_embedding_dimension()})"

    @property
    def modalities(self):
        # "message" is listed only because sentence-transformers labels every mixed-modality batch
        # "message" and refuses it unless the first module lists it; chat-style message dicts
        # themselves are refused by `UniMEModel.encode` with a ValueError naming the item.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_seq_length(self):
        """Longest formatted input in tokens (template and image tokens included); longer texts are cut, as
        `UniMEModel.encode(max_length=...)` does. Setting it sets `config.max_sequence_tokens` (saved)."""
        return self.model.config.max_sequence_length

    @max_seq_length.setter
    def max_seq_length(self, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_seq_length must be a positive int or None, got {value!r}")
        self.model.config.max_sequence_tokens = value

    def get_embedding_dimension(self):
        return self.model.config.text_hidden_size

    def preprocess(self, inputs, prompt=None, **kwargs):
        """Validate the batch; the UniME processor runs in `forward`, inside `UniMEModel.encode`.

        Returns:
            `dict` with `unime_items` (the batch as `encode` items) and `unime_instruction` (the prompt).
        """
        items = [_st_item(item, index) for index, item in enumerate(inputs)]
        return {"unime_items": items, "unime_instruction": prompt or None}

    def forward(self, features, prompt_style="summary", **kwargs):
        """Embed the batch prepared by `preprocess`.

        Returns:
            `features` plus `sentence_embedding`: `torch.FloatTensor` `[batch_size, hidden_size]` on the
            model's device, exactly `UniMEModel.encode(items, batch_size=batch_size, normalize_embeddings=False)`.
        """
        items = features["unime_items"]
        features["sentence_embedding"] = self.model.encode(
            items,
            processor=self.processor,
            batch_size=len(items),
            show_progress_bar=False,
            prompt_style=prompt_style,
            instruction=features.get("unime_instruction"),
            normalize_embeddings=False,
            max_length=self.max_seq_length,
            device=None,
        )
        return features

    def __reduce__(self):
        # sentence-transformers' multi-process pool pickles its modules for each worker, and transformers
        # installs output-capturing forward hooks (local functions pickle refuses) on some backbones'
        # modules at their first forward. Send what rebuilds the module instead: config, weights, processor.
        dtype = next(self.model.parameters()).dtype
        return (_rebuild, (type(self), type(self.model), self.model.config, self.model.state_dict(), dtype,
                           self.processor))

    def save(self, output_path, *args, **kwargs):
        self.model.save_pretrained(output_path)
        self.processor.save_pretrained(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path,
        subfolder="",
        token=None,
        cache_folder=None,
        revision=None,
        local_files_only=False,
        trust_remote_code=False,
        model_kwargs=None,
        processor_kwargs=None,
        config_kwargs=None,
        **kwargs,
    ):
        """Build the module from a checkpoint (sentence-transformers' module-loading signature).

        `model_kwargs` (e.g. `dtype`, `attn_implementation`) and `config_kwargs` go to
        `UniMEModel.from_pretrained`, `processor_kwargs` to `UniMEProcessor.from_pretrained`. Both are
        loaded with transformers' Auto classes (the checkpoint's own code, as sentence-transformers loaded
        this module), so this file imports neither: `modeling_unime.py` imports it, not the reverse.
        """
        hub_kwargs = {"token": token, "cache_dir": cache_folder, "revision": revision,
                      "local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        model = AutoModel.from_pretrained(model_name_or_path, **hub_kwargs, **(config_kwargs or {}),
                                          **(model_kwargs or {}))
        processor = AutoProcessor.from_pretrained(model_name_or_path, **hub_kwargs, **(processor_kwargs or {}))
        return cls(model.eval(), processor)


def _rebuild(module_class, model_class, config, state_dict, dtype, processor):
    """Inverse of `UniMESentenceTransformer.__reduce__`."""
    model = model_class(config).to(dtype)
    model.load_state_dict(state_dict)
    return module_class(model.eval(), processor)


def write_sentence_transformers_files(directory, config):
    """Write `modules.json` and `config_sentence_transformers.json` so that sentence-transformers loads
    `directory` with [`UniMESentenceTransformer`] (then `Normalize` when `config.normalize`) and the
    config's named `prompts`; the module's code is copied by `save_pretrained` along with the other files
    `modeling_unime.py` imports. Existing files are left alone (they may come from `SentenceTransformer.save`)."""
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS_REF}]
    if config.normalize:
        modules.append(NORMALIZE_MODULE)
    settings = {"model_type": "SentenceTransformer", "prompts": dict(getattr(config, "prompts", None) or {}),
                "default_prompt_name": None, "similarity_fn_name": "cosine"}
    for name, content in ((MODULES_FILE, modules), (SENTENCE_TRANSFORMERS_CONFIG_FILE, settings)):
        path = directory / name
        if not path.exists():
            path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
