"""UniME configuration."""

from transformers import AutoConfig, PretrainedConfig

from .prompts import SUPPORTED_BACKBONES, family_for_model_type, validate_prompt_templates

# MMEB writes one retrieval instruction per task ("Retrieve an image of this news caption.", ...); this
# is a task-neutral one in the same style. Documents are embedded without an instruction, as in MMEB.
DEFAULT_QUERY_INSTRUCTION = "Retrieve the image or passage that matches this query:"
DEFAULT_PROMPTS = {"query": DEFAULT_QUERY_INSTRUCTION, "document": ""}


class UniMEConfig(PretrainedConfig):
    r"""
    Configuration of a [`UniMEModel`]: a multimodal LLM backbone used as an embedding model.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the wrapped backbone (Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT or LLaVA-OneVision),
            serialised with its own `model_type`. The base model (no LM head) is built from it.
        backbone_family (`str`, *optional*):
            Prompt family; derived from `backbone_config.model_type` when not given.
        pooling (`str`, *optional*, defaults to `"last"`):
            How token states become one vector. Only `"last"` (the last non-padding token, which is the
            end of the prompt template) is supported, as in UniME.
        normalize (`bool`, *optional*, defaults to `True`):
            L2-normalise the embeddings.
        prompt_templates (`dict[str, str]`, *optional*):
            The templates the processor applies (`text`, `image`, `fused`, `image_token`), recorded with
            the checkpoint so a saved model documents how its inputs were formatted.
        max_sequence_tokens (`int`, *optional*):
            Longest formatted input in tokens (prompt template and image tokens included). `encode` cuts
            the user's text to fit, never the template or an image. Defaults to the backbone language
            model's `max_position_embeddings`. The old name `max_length` is still read (from the
            constructor and from older `config.json` files): transformers treats a config attribute
            named `max_length` as a generation parameter and refuses to save it.
        prompts (`dict[str, str]`, *optional*):
            Named instructions for `encode(prompt_name=...)`, `encode_query` and `encode_document` (an
            empty string means no instruction). Defaults to an MMEB-style retrieval instruction for
            `"query"` and none for `"document"`; also written to `config_sentence_transformers.json`.
        matryoshka_dims (`list[int]`, *optional*):
            Embedding prefix sizes the model was trained at with a Matryoshka loss (strictly
            increasing, at most the embedding dimension); `encode(truncate_dim=d)` and exports read them.

    Example:

    ```python
    >>> from transformers import Qwen2VLConfig
    >>> from modeling_unime import UniMEConfig, UniMEModel
    >>> config = UniMEConfig(backbone_config=Qwen2VLConfig())
    >>> config.backbone_family
    'qwen2_vl'
    ```
    """

    model_type = "unime"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config=None,
        backbone_family=None,
        pooling="last",
        normalize=True,
        prompt_templates=None,
        max_sequence_tokens=None,
        prompts=None,
        matryoshka_dims=None,
        **kwargs,
    ):
        # Checkpoints and code written before the rename spell it `max_length`.
        legacy_max_length = kwargs.pop("max_length", None)
        name = "max_sequence_tokens"
        if max_sequence_tokens is None and legacy_max_length is not None:
            max_sequence_tokens, name = legacy_max_length, "max_length"
        if max_sequence_tokens is not None and (
            isinstance(max_sequence_tokens, bool) or not isinstance(max_sequence_tokens, int) or max_sequence_tokens < 1
        ):
            raise ValueError(f"{name} must be a positive int (tokens) or None, got {max_sequence_tokens!r}")
        _check_values(backbone_config, backbone_family, normalize)
        prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
        for name, prompt in prompts.items():
            if not isinstance(name, str) or not isinstance(prompt, str):
                raise ValueError(f"prompts must map str names to str instructions, got {name!r}: {prompt!r}")
        if isinstance(backbone_config, dict):
            if "model_type" not in backbone_config:
                raise ValueError("backbone_config dict needs a 'model_type' key naming the backbone")
            backbone_config = dict(backbone_config)
            backbone_config = AutoConfig.for_model(backbone_config.pop("model_type"), **backbone_config)
        if backbone_config is not None and backbone_family is None:
            backbone_family = family_for_model_type(backbone_config.model_type)
        if pooling != "last":
            raise ValueError(f"pooling={pooling!r} is not supported; UniME uses 'last' (last real token).")
        # The base init resets `_attn_implementation` on every sub-config; run it before attaching the
        # backbone config, which may be a live model's config whose attention choice must survive.
        super().__init__(**kwargs)
        self.backbone_config = backbone_config
        self.backbone_family = backbone_family
        self.pooling = pooling
        self.normalize = normalize
        self.prompt_templates = prompt_templates
        self.max_sequence_tokens = max_sequence_tokens
        self.prompts = prompts
        self.matryoshka_dims = _check_matryoshka_dims(matryoshka_dims, backbone_config)

    def __setattr__(self, key, value):
        # Checked when set as well as when built or loaded: a template without `<sent>` would make every
        # text embed the same, and nothing downstream could tell.
        if key == "prompt_templates":
            validate_prompt_templates(value)
        super().__setattr__(key, value)

    @property
    def text_hidden_size(self):
        """Embedding dimension: the backbone language model's hidden size."""
        text_config = self.backbone_config.get_text_config()
        return text_config.hidden_size

    @property
    def max_sequence_length(self):
        """`max_sequence_tokens` if set, else the language model's `max_position_embeddings`."""
        if self.max_sequence_tokens is not None:
            return self.max_sequence_tokens
        return getattr(self.backbone_config.get_text_config(), "max_position_embeddings", None)


def _check_matryoshka_dims(dims, backbone_config):
    """`None` or a strictly increasing list of positive ints no larger than the embedding dimension."""
    if dims is None:
        return None
    if isinstance(dims, (str, bytes)) or not isinstance(dims, (list, tuple)) or not dims:
        raise ValueError(f"matryoshka_dims must be a non-empty list of ints or None, got {dims!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"matryoshka_dims entries must be positive ints, got {list(dims)}")
    if any(a >= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims must be strictly increasing, got {list(dims)}")
    if backbone_config is not None and dims[-1] > backbone_config.get_text_config().hidden_size:
        raise ValueError(f"matryoshka_dims {list(dims)} exceed the embedding dimension "
                         f"{backbone_config.get_text_config().hidden_size}")
    return list(dims)


def _check_values(backbone_config, backbone_family, normalize):
    """Type and range of the plain fields, each error naming the field and the value."""
    if backbone_config is not None and not isinstance(backbone_config, (dict, PretrainedConfig)):
        raise TypeError(f"backbone_config must be a dict or a PretrainedConfig, got {type(backbone_config).__name__}")
    if backbone_family is not None and backbone_family not in SUPPORTED_BACKBONES.values():
        raise ValueError(f"backbone_family={backbone_family!r}; expected one of {sorted(set(SUPPORTED_BACKBONES.values()))}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
