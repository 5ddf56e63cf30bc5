"""UniMEProcessor: the backbone's processor plus UniME's prompt templates."""

import json
import os

import transformers
from transformers import AutoTokenizer, ProcessorMixin
from transformers.utils import cached_file, is_torchvision_available

from .atomic import atomic_directory
from .bundle import replaced_code_files, write_bundle
from .checkpoint_files import check_processor_folder
from .inputs import check_text, load_image
from .prompts import (
    CHAT_TEMPLATE_FAMILIES,
    MMEB_IMAGE_PLACEHOLDER,
    default_prompt_templates,
    family_for_model_type,
    format_instruction_prompt,
    format_summary_prompt,
    validate_prompt_templates,
)

BACKBONE_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
}

# Init arguments of the backbone processors that change how many image tokens are inserted.
BACKBONE_PROCESSOR_KWARGS = (
    "patch_size",
    "vision_feature_select_strategy",
    "num_additional_image_tokens",
    "num_image_tokens",
    "vision_aspect_ratio",
    "image_token",
)

PROMPT_STYLES = ("summary", "instruction")

# Qwen2-VL's smart_resize refuses images whose long side is over 200x the short side.
MAX_ASPECT_RATIO = {"qwen2_vl": 200, "qwen2_5_vl": 200, "qwen3_vl": 200}


def _backbone_processor_class(family):
    """The backbone's processor class, minus its video processor.

    Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision processors require a video processor, which needs
    torchvision; embeddings never use video, so a subclass whose `__init__` has no `video_processor`
    argument lets them construct without it (ProcessorMixin reads its sub-processors off `__init__`).
    """
    base = getattr(transformers, BACKBONE_PROCESSOR_CLASSES[family])

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def _read_optional_json(path_or_id, filename, **hub_kwargs):
    resolved = cached_file(
        path_or_id,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if resolved is None:
        return {}
    with open(resolved, encoding="utf-8") as handle:
        return json.load(handle)


def _read_chat_template(path_or_id, tokenizer, **hub_kwargs):
    resolved = cached_file(
        path_or_id,
        "chat_template.jinja",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if resolved is not None:
        with open(resolved, encoding="utf-8") as handle:
            return handle.read()
    template = _read_optional_json(path_or_id, "chat_template.json", **hub_kwargs).get("chat_template")
    return template or getattr(tokenizer, "chat_template", None)


def _backbone_config(path_or_id, **hub_kwargs):
    """The backbone config recorded in a UniME checkpoint's config.json (a bare config when there is none)."""
    backbone = dict(_read_optional_json(path_or_id, "config.json", **hub_kwargs).get("backbone_config") or {})
    if "model_type" not in backbone:
        return transformers.PretrainedConfig()
    return transformers.AutoConfig.for_model(backbone.pop("model_type"), **backbone)


# Files a processor save owns: old ones are dropped even when the new save does not write them.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer*", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*", "additional_chat_templates")
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder")
INIT_SETTINGS = ("backbone_family", "prompt_templates", "backbone_processor_kwargs")


def _image_processor_class(type_name):
    """The image processor class for a saved `image_processor_type`, PIL variant without torchvision."""
    base = type_name[:-4] if type_name.endswith("Fast") else type_name
    if base.endswith("Pil") and is_torchvision_available():
        base = base[:-3]
    candidates = [base] if is_torchvision_available() else [base if base.endswith("Pil") else f"{base}Pil"]
    for name in candidates:
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    raise ValueError(f"image processor {type_name!r} is not available in transformers {transformers.__version__}")


def load_image_processor(path_or_id, **hub_kwargs):
    """Load a backbone's image processor from its saved settings.

    `AutoImageProcessor` requires torchvision in some transformers 5.x releases even when a PIL
    variant exists, so the class is resolved here from `image_processor_type`
    (`preprocessor_config.json`, or the `image_processor` entry of `processor_config.json`).
    """
    settings = _read_optional_json(path_or_id, "preprocessor_config.json", **hub_kwargs)
    if not settings:
        settings = _read_optional_json(path_or_id, "processor_config.json", **hub_kwargs).get("image_processor", {})
    if not settings.get("image_processor_type"):
        raise ValueError(f"{path_or_id!r} has no image processor settings (preprocessor_config.json)")
    image_processor_class = _image_processor_class(settings["image_processor_type"])
    ignored = ("image_processor_type", "processor_class", "auto_map")
    return image_processor_class(**{k: v for k, v in settings.items() if k not in ignored})


class UniMEProcessor(ProcessorMixin):
    r"""
    Formats text, images and image+text items with UniME's prompt templates and runs the backbone's
    own processor on them (tokenisation, image tiling, image-token expansion).

    Args:
        image_processor: the backbone's image processor (a `...ImageProcessorPil` works without torchvision).
        tokenizer: the backbone's tokenizer. Padding is on the left, as in the released evaluation code.
        backbone_family (`str`): `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `llava`, `llava_next` or `llava_onevision`.
        prompt_templates (`dict[str, str]`, *optional*): `text`/`image`/`fused` templates and
            `image_token`; built from the family's defaults (and `chat_template`) when omitted.
        backbone_processor_kwargs (`dict`, *optional*): extra init arguments of the backbone processor
            (e.g. LLaVA's `patch_size`, `vision_feature_select_strategy`).
        chat_template (`str`, *optional*): the backbone's chat template (needed by chat-template families).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        backbone_family=None,
        prompt_templates=None,
        backbone_processor_kwargs=None,
        chat_template=None,
        **kwargs,
    ):
        if backbone_family not in BACKBONE_PROCESSOR_CLASSES:
            raise ValueError(
                f"backbone_family={backbone_family!r} is not supported; expected one of "
                f"{sorted(BACKBONE_PROCESSOR_CLASSES)}."
            )
        validate_prompt_templates(prompt_templates)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)
        self.tokenizer.padding_side = "left"
        self.backbone_family = backbone_family
        self.backbone_processor_kwargs = dict(backbone_processor_kwargs or {})
        if prompt_templates is None:
            render = self._render_chat if backbone_family in CHAT_TEMPLATE_FAMILIES else None
            prompt_templates = default_prompt_templates(backbone_family, render)
        self.prompt_templates = dict(prompt_templates)

    @classmethod
    def from_backbone(cls, path_or_id, prompt_templates=None, **hub_kwargs):
        """Build a UniME processor from a backbone checkpoint (local dir or Hub id).

        Loads the backbone's tokenizer, image processor, chat template and processor settings; the
        backbone's video processor is never loaded.
        """
        backbone_config = transformers.AutoConfig.from_pretrained(path_or_id, **hub_kwargs)
        family = family_for_model_type(backbone_config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **hub_kwargs)
        image_processor = load_image_processor(path_or_id, **hub_kwargs)
        processor_config = _read_optional_json(path_or_id, "processor_config.json", **hub_kwargs)
        backbone_kwargs = {k: processor_config[k] for k in BACKBONE_PROCESSOR_KWARGS if k in processor_config}
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            backbone_family=family,
            prompt_templates=prompt_templates,
            backbone_processor_kwargs=backbone_kwargs,
            chat_template=_read_chat_template(path_or_id, tokenizer, **hub_kwargs),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved UniME processor (what `AutoProcessor.from_pretrained(..., trust_remote_code=True)` calls).

        Reads the components explicitly instead of through `AutoImageProcessor`, so loading works
        without torchvision on every transformers 5.x release.
        """
        path = pretrained_model_name_or_path
        check_processor_folder(path, kwargs.get("subfolder"))
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        settings = _read_optional_json(path, "processor_config.json", **hub_kwargs)
        if "backbone_family" not in settings:
            raise ValueError(f"{path!r} has no UniME processor_config.json; use UniMEProcessor.from_backbone for "
                             "a backbone checkpoint")
        # The folder's config.json is UniME's (remote code): read by AutoTokenizer, it would prompt for
        # `trust_remote_code` on a terminal and warn about the model type. Hand it the backbone's config.
        tokenizer = AutoTokenizer.from_pretrained(path, config=_backbone_config(path, **hub_kwargs), **hub_kwargs)
        init = {k: settings[k] for k in INIT_SETTINGS if k in settings}
        init.update({k: kwargs[k] for k in INIT_SETTINGS if k in kwargs})
        return cls(
            image_processor=load_image_processor(path, **hub_kwargs),
            tokenizer=tokenizer,
            chat_template=_read_chat_template(path, tokenizer, **hub_kwargs),
            **init,
        )

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        """`ProcessorMixin.save_pretrained`, atomic (`atomic.atomic_directory`): a failed save leaves the folder
        as it was. Other files of the folder (the model's) are kept; old processor files are not."""
        if push_to_hub:
            return super().save_pretrained(save_directory, push_to_hub=True, **kwargs)
        replaced = PROCESSOR_FILES + replaced_code_files()  # the bundle written below replaces older code files
        with atomic_directory(save_directory, keep_existing=True, replaced=replaced) as staging:
            written = super().save_pretrained(staging, **kwargs)
            write_bundle(staging)  # the same single code file the model's save writes (bundle.py)
        return [os.path.join(save_directory, os.path.relpath(path, staging)) for path in written]

    def backbone_processor(self):
        """A fresh backbone processor (without video support) sharing this processor's components."""
        processor_class = _backbone_processor_class(self.backbone_family)
        return processor_class(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
            **self.backbone_processor_kwargs,
        )

    def _render_chat(self, messages):
        if not self.chat_template:
            raise ValueError(f"backbone family {self.backbone_family!r} needs a chat_template to build its prompts")
        return self.backbone_processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def validate_image(self, image, where):
        """Raise `ValueError` naming `where` for an image the backbone's image processor would refuse."""
        limit = MAX_ASPECT_RATIO.get(self.backbone_family)
        ratio = max(image.width, image.height) / min(image.width, image.height)
        if limit is not None and ratio > limit:
            raise ValueError(
                f"{where}: image of size {image.size} has aspect ratio {ratio:.0f}; "
                f"{self.backbone_family} accepts at most {limit}"
            )
        return image

    def placeholder_tokens(self, backbone=None):
        """The backbone processor's image/video placeholder tokens (e.g. `<image>`, `<|image_pad|>`).

        It expands each one into an image's tokens, so one typed inside a user's text would not match
        the images given and fail inside the backbone processor; `validate_text` refuses it first.
        """
        backbone = backbone or self.backbone_processor()
        return tuple(token for token in (getattr(backbone, "image_token", None), getattr(backbone, "video_token", None))
                     if token)

    def validate_text(self, text, where, placeholder_tokens=None):
        """Return `text` if it is a non-empty string without the backbone's placeholder tokens;
        `ValueError` / `TypeError` naming `where` otherwise."""
        check_text(text, where)
        for token in self.placeholder_tokens() if placeholder_tokens is None else placeholder_tokens:
            if token in text:
                raise ValueError(
                    f"{where}: text contains the backbone's image placeholder {token!r}; pass the image as an item "
                    "(in instruction style, mark its place with <|image_1|>)"
                )
        return text

    def format_prompt(self, text=None, has_image=False, prompt_style="summary", instruction=None):
        """The prompt string for one item (before image-token expansion)."""
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style={prompt_style!r}; expected one of {PROMPT_STYLES}")
        if instruction is not None or prompt_style == "instruction":
            count = f"{instruction or ''} {text or ''}".count(MMEB_IMAGE_PLACEHOLDER)
            if count > 1:  # each would become an image token, for one image at most
                raise ValueError(f"text {text!r} (with its instruction) contains {MMEB_IMAGE_PLACEHOLDER} {count} "
                                 "times; an item has at most one image")
            return format_instruction_prompt(self.prompt_templates, text, has_image, instruction)
        return format_summary_prompt(self.prompt_templates, text, has_image)

    def __call__(self, text=None, images=None, prompt_style="summary", instruction=None, truncation=False,
                 max_length=None, item_names=None, **kwargs):
        """Format and process a batch.

        Args:
            text (`str` or `list[str | None]`, *optional*): texts; `None` entries are image-only items.
            images (`PIL.Image` or `list[PIL.Image | None]`, *optional*): images; with `text`, item `i`
                pairs `text[i]` and `images[i]` (fused when both are set).
            prompt_style (`str`): `"summary"` (UniME's templates) or `"instruction"` (raw MMEB text,
                `<|image_1|>` rewritten to the image token).
            instruction (`str`, *optional*): an instruction put before every item's text
                (implies instruction style).
            truncation (`bool`): cut each item's *text* so that its formatted sequence (template, instruction
                and image tokens included) fits in `max_length` tokens. The template is never cut: its end is
                the pooled token. An item whose template and image alone exceed `max_length` raises `ValueError`.
            max_length (`int`, *optional*): the token limit of `truncation` (required with it).
            item_names (`list[str]`, *optional*): how errors name each item (default `text[i]`/`images[i]`).
            **kwargs: passed to the backbone processor (e.g. `padding_side`, `return_tensors`).

        Returns:
            `BatchFeature` with `input_ids`/`attention_mask` `[batch_size, sequence_length]` and the
            backbone's image inputs (`pixel_values`, `image_grid_thw` or `image_sizes`, ...).
        """
        truncation = truncation not in (False, None, "do_not_truncate")
        if truncation and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"truncation needs max_length, a positive number of tokens; got max_length={max_length!r}")
        if kwargs.get("padding") == "max_length" and max_length is not None:
            kwargs["max_length"] = max_length  # padding up to it; the backbone never truncates
        texts, image_list = self._pair_items(text, images)
        names = item_names or [f"item {index}" for index in range(len(texts))]
        backbone = self.backbone_processor()
        placeholders = self.placeholder_tokens(backbone)
        for index, item_text in enumerate(texts):
            if item_text is not None:
                self.validate_text(item_text, item_names[index] if item_names else f"text[{index}]", placeholders)
        if instruction is not None:
            self.validate_text(instruction, "instruction", placeholders)
        image_list = [
            None if image is None else self.validate_image(load_image(image, f"images[{index}]"), f"images[{index}]")
            for index, image in enumerate(image_list)
        ]
        kwargs.setdefault("padding", True)
        kwargs.setdefault("return_tensors", "pt")

        def run(item_texts, **overrides):
            prompts = [
                self.format_prompt(item_text, item_image is not None, prompt_style, instruction)
                for item_text, item_image in zip(item_texts, image_list)
            ]
            present_images = [image for image in image_list if image is not None]
            merged = {**kwargs, **overrides}
            if merged["padding"] is True:
                merged.pop("max_length", None)  # only meaningful with padding="max_length"
            return backbone(text=prompts, images=present_images or None, **merged)

        if not truncation:
            return run(texts)
        # Measured with padding to the longest item (an overlong one cannot be padded to max_length). Rarely
        # more than one round: a cut text may tokenise differently where it meets the template.
        for _ in range(4):
            outputs = run(texts, padding=True)
            lengths = outputs["attention_mask"].sum(dim=1).tolist()
            if max(lengths) <= max_length:
                return outputs if kwargs["padding"] is True else run(texts)
            texts = [self._cut_text(item_text, length - max_length, names[index], max_length, length)
                     if length > max_length else item_text
                     for index, (item_text, length) in enumerate(zip(texts, lengths))]
        raise ValueError(f"could not fit the texts of {names} in max_length={max_length} tokens")

    def _cut_text(self, text, excess, name, max_length, length):
        """`text` without its last tokens, at least `excess` of them, cut at a token boundary of the original."""
        if text is None:
            raise ValueError(f"{name}: the image and prompt template take {length} tokens, over max_length="
                             f"{max_length}; images are never cut: lower the image resolution or raise max_length")
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets) - excess
        if keep < 1:
            raise ValueError(f"{name}: the prompt template, instruction and image take {length - len(offsets)} of "
                             f"max_length={max_length} tokens, which leaves no room for the text")
        return text[: offsets[keep - 1][1]]

    @staticmethod
    def _pair_items(text, images):
        if text is None and images is None:
            raise ValueError("UniMEProcessor needs `text`, `images` or both")
        if text is not None and not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a str or a list of str (None for image-only items), got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        image_list = None if images is None else ([images] if not isinstance(images, (list, tuple)) else list(images))
        if texts is None:
            texts = [None] * len(image_list)
        if image_list is None:
            image_list = [None] * len(texts)
        if len(texts) != len(image_list):
            raise ValueError(f"got {len(texts)} texts and {len(image_list)} images; they pair up item by item")
        if not texts:
            raise ValueError("UniMEProcessor got an empty batch")
        for index, (item_text, item_image) in enumerate(zip(texts, image_list)):
            if item_text is None and item_image is None:
                raise ValueError(f"item {index} has neither text nor image")
        return texts, image_list
