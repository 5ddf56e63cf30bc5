"""UniME configuration."""

from transformers import AutoConfig, PretrainedConfig

from .prompts import SUPPORTED_BACKBONES, family_for_model_type, validate_prompt_templates


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
        max_length (`int`, *optional*):
            Longest accepted tokenised input; longer items are refused with a `ValueError`. Defaults
            to the backbone language model's `max_position_embeddings`.

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
        max_length=None,
        **kwargs,
    ):
        _check_values(backbone_config, backbone_family, normalize, max_length)
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
        self.max_length = max_length

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
        """`max_length` if set, else the language model's `max_position_embeddings`."""
        if self.max_length is not None:
            return self.max_length
        return getattr(self.backbone_config.get_text_config(), "max_position_embeddings", None)


def _check_values(backbone_config, backbone_family, normalize, max_length):
    """Type and range of the plain fields, each error naming the field and the value."""
    if backbone_config is not None and not isinstance(backbone_config, (dict, PretrainedConfig)):
        raise TypeError(f"backbone_config must be a dict or a PretrainedConfig, got {type(backbone_config).__name__}")
    if backbone_family is not None and backbone_family not in SUPPORTED_BACKBONES.values():
        raise ValueError(f"backbone_family={backbone_family!r}; expected one of {sorted(set(SUPPORTED_BACKBONES.values()))}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int (tokens) or None, got {max_length!r}")
