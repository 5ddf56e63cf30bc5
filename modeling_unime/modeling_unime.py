"""UniME: a multimodal LLM backbone used as a universal embedding model (Gu et al., 2025)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .adapter_checkpoint import BASE_RECORD_KEY, adapter_checkpoint_folder, resolve_adapter_base
from .atomic import atomic_directory
from .bundle import replaced_code_files, write_bundle
from .checkpoint_files import (
    check_backbone_checkpoint,
    check_json_files,
    check_safetensors_files,
    check_unime_checkpoint,
)
from .configuration_unime import UniMEConfig
from .encoding import EncodeMixin
from .hub import pop_push_kwargs, push_checkpoint, push_model_to_hub
from .model_card import write_model_card
from .prompts import family_for_model_type
from .sentence_transformers_module import write_sentence_transformers_files

logger = logging.get_logger(__name__)

# Files a model save owns: old ones are dropped even when the new save does not write them (other shards).
WEIGHT_FILES = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


@dataclass
class UniMEModelOutput(ModelOutput):
    """
    Args:
        embeddings (`torch.FloatTensor` of shape `[batch_size, hidden_size]`):
            Final hidden state of each sequence's last real token, L2-normalised when `config.normalize`.
        last_hidden_state (`torch.FloatTensor` of shape `[batch_size, sequence_length, hidden_size]`, *optional*):
            The backbone's final hidden states; returned only with `output_last_hidden_state=True`.
    """

    embeddings: torch.FloatTensor = None
    last_hidden_state: torch.FloatTensor | None = None


def last_token_positions(attention_mask):
    """Index of the last non-padding token of each row, for left or right padding.

    Args:
        attention_mask (`torch.Tensor` of shape `[batch_size, sequence_length]`): 1 for real tokens.

    Returns:
        `torch.LongTensor` of shape `[batch_size]`.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch_size, sequence_length], got {tuple(attention_mask.shape)}")
    flipped_first_real = attention_mask.flip(dims=[1]).to(torch.long).argmax(dim=1)
    return attention_mask.shape[1] - 1 - flipped_first_real


def pool_last_token(hidden_states, attention_mask):
    """`[batch_size, sequence_length, hidden_size]` -> `[batch_size, hidden_size]` at each row's last real token."""
    positions = last_token_positions(attention_mask)
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, positions.to(hidden_states.device)]


class UniMEPreTrainedModel(PreTrainedModel):
    config_class = UniMEConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        # The backbone knows how its own modules are initialised; the wrapper adds no parameters.
        backbone = self.__dict__.get("_modules", {}).get("backbone")
        if backbone is not None and module is not self:
            backbone._init_weights(module)

    def save_pretrained(self, save_directory, is_main_process=True, *, push_to_hub=False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a model card (`README.md`; one a person wrote is kept) and
        the files `SentenceTransformer(save_directory, trust_remote_code=True)` loads. `push_to_hub=True`
        then uploads the folder with `hub.push_checkpoint` (`repo_id` defaults to the folder's name)."""
        push_kwargs = pop_push_kwargs(save_directory, kwargs) if push_to_hub else None
        if not is_main_process:
            return super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        # Atomic (modeling_unime/atomic.py): a failed save leaves the folder as it was; files of the folder
        # this save does not write (the processor's) are kept, old weight files are not.
        replaced = WEIGHT_FILES + replaced_code_files()  # the bundle written below replaces older code files
        with atomic_directory(save_directory, keep_existing=True, replaced=replaced, seed=("README.md",)) as staging:
            super().save_pretrained(staging, is_main_process=True, **kwargs)
            write_model_card(self.config, staging)
            write_sentence_transformers_files(staging, self.config)
            write_bundle(staging)  # one shipped code file: one Hub download notice (bundle.py)
        if push_kwargs is not None:
            push_checkpoint(save_directory, **push_kwargs)

    def push_to_hub(self, repo_id, **kwargs):
        """`PushToHubMixin.push_to_hub` (same arguments), uploading the UniME model card built for `repo_id`
        instead of transformers' placeholder card; see `hub.push_model_to_hub`."""
        return push_model_to_hub(self, repo_id, **kwargs)


class UniMEModel(EncodeMixin, UniMEPreTrainedModel):
    r"""
    A multimodal LLM's base model (no LM head) that returns one L2-normalised embedding per input:
    the final hidden state of the last real token, which is the end of UniME's prompt template.

    Build it from a backbone checkpoint with [`UniMEModel.from_backbone`], from a saved UniME
    checkpoint with `from_pretrained`, or from a config (random weights). Inputs come from
    [`UniMEProcessor`]; `encode`, `encode_text`, `encode_image` and `similarity` wrap batching.
    """

    def __init__(self, config, backbone=None):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("UniMEConfig.backbone_config is required to build a UniMEModel")
        family_for_model_type(config.backbone_config.model_type)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        self._no_split_modules = list(getattr(self.backbone, "_no_split_modules", None) or [])
        self.post_init()

    @property
    def processor(self):
        """The [`UniMEProcessor`] `encode` uses by default: set by `from_backbone`, or loaded once, on first
        use, from the folder or Hub repo `from_pretrained` read (same revision, token and cache)."""
        if self.__dict__.get("_processor") is None:
            self.__dict__["_processor"] = self._load_own_processor()
        return self.__dict__["_processor"]

    @processor.setter
    def processor(self, processor):
        self.__dict__["_processor"] = processor

    def _load_own_processor(self):
        from .processing_unime import UniMEProcessor

        source, hub_kwargs = self.__dict__.get("_processor_source") or (None, {})
        advice = ("pass processor=UniMEProcessor.from_pretrained(<checkpoint>) (or UniMEProcessor.from_backbone("
                  "<backbone checkpoint>)) to encode, or set model.processor once")
        if source is None:
            raise ValueError(f"this UniMEModel was not loaded from a checkpoint, so it has no processor: {advice}")
        try:
            return UniMEProcessor.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load the processor saved with {source!r} ({error}); {advice}") from error

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, output_last_hidden_state=False, normalize=None,
                **backbone_inputs):
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch_size, sequence_length]`): from [`UniMEProcessor`].
            attention_mask (`torch.LongTensor` of shape `[batch_size, sequence_length]`): 1 for real tokens;
                left or right padding give the same embeddings.
            output_last_hidden_state (`bool`): also return the backbone's final hidden states.
            normalize (`bool`, *optional*): L2-normalise the embeddings; defaults to `config.normalize`.
            **backbone_inputs: image inputs of the backbone (`pixel_values`, `image_grid_thw`,
                `image_sizes`, `mm_token_type_ids`, ...), passed through unchanged.

        Returns:
            [`UniMEModelOutput`] with `embeddings` `[batch_size, hidden_size]`.
        """
        if input_ids is None and backbone_inputs.get("inputs_embeds") is None:
            raise ValueError("UniMEModel.forward needs input_ids (or inputs_embeds)")
        if attention_mask is None:
            reference = input_ids if input_ids is not None else backbone_inputs["inputs_embeds"][..., 0]
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        backbone_inputs.setdefault("use_cache", False)
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **backbone_inputs)
        hidden_states = outputs.last_hidden_state
        embeddings = pool_last_token(hidden_states, attention_mask)
        if self.config.normalize if normalize is None else normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return UniMEModelOutput(
            embeddings=embeddings,
            last_hidden_state=hidden_states if output_last_hidden_state else None,
        )

    def save_for_serving(self, save_directory, processor=None, **kwargs):
        """Write the backbone's native `*ForConditionalGeneration` checkpoint (LoRA folded in) with a chat
        template reproducing UniME's prompt and sentence-transformers last-token/normalise metadata, for
        vLLM (`--runner pooling`), sentence-transformers or plain transformers; see `serving.save_for_serving`
        for the arguments (`max_shard_size`, `push_to_hub`, `repo_id`, ...)."""
        from .serving import save_for_serving

        return save_for_serving(self, save_directory, processor=processor, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model_name_or_path=None, **kwargs):
        """`PreTrainedModel.from_pretrained` that loads safetensors only unless `use_safetensors=False`,
        and raises `ValueError` instead of randomly initialising weights missing from the checkpoint.

        A LoRA checkpoint written during training (`<output_dir>/checkpoint-N`) loads its base model, found
        from any directory or machine (see `adapter_checkpoint.py`), with the adapters on it (not merged);
        `base_model_name_or_path` says where that base model is when it has moved elsewhere.
        """
        adapter_folder = adapter_checkpoint_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if adapter_folder is not None:
            return cls._from_adapter_checkpoint(adapter_folder, base_model_name_or_path, *model_args, **kwargs)
        if base_model_name_or_path is not None:
            raise ValueError(f"base_model_name_or_path is for LoRA checkpoints; {str(pretrained_model_name_or_path)!r} "
                             "is not one (it has no adapter_config.json with a UniME config.json)")
        check_unime_checkpoint(pretrained_model_name_or_path, kwargs.get("subfolder"))
        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        # Loaded with mismatches allowed so that the error below can name the key (transformers' names none).
        strict_shapes = not kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        if strict_shapes and info["mismatched_keys"]:
            key, stored, expected = sorted(info["mismatched_keys"])[0]
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r}: weight {key!r} has shape {tuple(stored)} in the checkpoint, "
                f"the config needs {tuple(expected)} ({len(info['mismatched_keys'])} mismatched weights)"
            )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} is missing {len(missing)} weights (e.g. {missing[:5]}); "
                "refusing to leave them randomly initialised"
            )
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder",
                                             "force_download", "proxies") if kwargs.get(k) is not None}
        model.__dict__["_processor_source"] = (str(pretrained_model_name_or_path), hub_kwargs)
        return (model, info) if want_info else model

    @classmethod
    def _from_adapter_checkpoint(cls, folder, base_model_name_or_path, *model_args, **kwargs):
        check_json_files(folder)
        check_safetensors_files(folder)
        base = resolve_adapter_base(folder, base_model_name_or_path)
        if getattr(kwargs.get("config"), BASE_RECORD_KEY, None) is not None:
            del kwargs["config"]  # the checkpoint's copy, passed by AutoModel: the base model reads its own
        adapter_kwargs = {key: value for key, value in (kwargs.pop("adapter_kwargs", None) or {}).items()
                          if key != "_adapter_model_path" and value is not None}
        kwargs.pop("subfolder", None)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = cls.from_pretrained(base, *model_args, output_loading_info=True, **kwargs)
        model.load_adapter(str(folder), adapter_kwargs=adapter_kwargs)
        model.__dict__["_processor_source"] = (str(folder), {})  # the Trainer saved the processor with the adapters
        return (model, info) if want_info else model

    @classmethod
    def from_backbone(cls, path_or_id, prompt_templates=None, **from_pretrained_kwargs):
        """Wrap a `*ForConditionalGeneration` checkpoint (as released UniME checkpoints are stored).

        The checkpoint is loaded with `AutoModelForImageTextToText` (which knows every legacy weight
        layout), its LM head is dropped and its base model becomes the backbone. Any backbone weight
        missing from the checkpoint raises `ValueError` instead of staying randomly initialised.

        Args:
            path_or_id (`str`): local directory or Hub id of the backbone checkpoint.
            prompt_templates (`dict`, *optional*): templates to record in the config; read from the
                checkpoint's processor files when omitted.
            **from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `attn_implementation`,
                `device_map`, `revision`, ...).
        """
        # Pickled .bin weights can run code on load: like transformers' own safety default, refuse them
        # unless the caller opts in with use_safetensors=False.
        check_backbone_checkpoint(path_or_id)
        from_pretrained_kwargs.setdefault("use_safetensors", True)
        hub_kwargs = {k: from_pretrained_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in from_pretrained_kwargs}
        backbone_config = AutoConfig.from_pretrained(path_or_id, **hub_kwargs)
        family_for_model_type(backbone_config.model_type)
        generation_model, loading_info = AutoModelForImageTextToText.from_pretrained(
            path_or_id, output_loading_info=True, **from_pretrained_kwargs
        )
        missing = [key for key in loading_info["missing_keys"] if not key.startswith("lm_head")]
        if missing:
            raise ValueError(
                f"{path_or_id!r} is missing {len(missing)} backbone weights (e.g. {missing[:5]}); refusing to "
                "leave them randomly initialised."
            )
        backbone = generation_model.model
        del generation_model
        processor = _processor_from_checkpoint(path_or_id, prompt_templates, hub_kwargs)
        if prompt_templates is None and processor is not None:
            prompt_templates = processor.prompt_templates
        config = UniMEConfig(backbone_config=backbone.config, prompt_templates=prompt_templates)
        config._name_or_path = str(path_or_id)
        config._attn_implementation_internal = backbone.config._attn_implementation
        model = cls(config, backbone=backbone)
        model.processor = processor
        return model.to(backbone.dtype).eval()


def _processor_from_checkpoint(path_or_id, prompt_templates, hub_kwargs):
    """The checkpoint's processor with UniME's templates, or None (with a warning) when its files are missing."""
    from .processing_unime import UniMEProcessor

    try:
        return UniMEProcessor.from_backbone(path_or_id, prompt_templates=prompt_templates, **hub_kwargs)
    except (OSError, ValueError, TypeError) as error:
        logger.warning(f"Could not read processor files from {path_or_id!r} ({error}); prompt_templates left unset "
                       "and encode needs processor=.")
        return None
