"""UniME prompt templates per backbone family.

The strings reproduce the released evaluation code (`self_evaluate/retrieval_self.py`) and the model
cards: `<sent>` is replaced by the item's text and `image_token` marks where the backbone's image
placeholder goes. Chat-template families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) are rendered once
from the backbone's own chat template, so the stored strings are plain data that travel with a
checkpoint and that a user may edit.
"""

TEXT_PLACEHOLDER = "<sent>"
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"

# E5-V / UniME Llama-3 style prompt (REFERENCE §1.3); the trailing " \n" is part of the released string.
LLAMA3_TEMPLATE = (
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
)

IMAGE_SUFFIX = "Summary above image in one word:"
TEXT_SUFFIX = "Summary above sentence in one word:"
# Fused image+text in summary style is not in the released code (UniME‡ uses MMEB instructions for
# interleaved inputs); we keep both in one user turn with a suffix naming both.
FUSED_SUFFIX = "Summary above image and sentence in one word:"

# backbone config `model_type` -> family name used in UniMEConfig / UniMEProcessor.
SUPPORTED_BACKBONES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
}

CHAT_TEMPLATE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")

# Image placeholder of the string-template families' summary prompts (chat-template families get
# theirs from the chat template).
IMAGE_TOKENS = {
    "llava": "<image>",
    "llava_next": "<image>",
}


# What `<|image_1|>` becomes in MMEB instruction mode. The code that trained and evaluated the Qwen
# embedders on MMEB (VLM2Vec's `VLM_IMAGE_TOKENS`, UniME-V2's `Embedding/src/model_utils.py`) writes
# the bare `<|image_pad|>`, which the processor expands to the image's tokens; the summary templates
# (rendered from the chat template) keep `<|vision_start|>...<|vision_end|>`.
INSTRUCTION_IMAGE_TOKENS = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
}


def family_for_model_type(model_type):
    """Map a backbone config's `model_type` to a UniME family, or raise `ValueError` naming the supported ones."""
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"Unsupported backbone model_type {model_type!r}; supported backbones are "
            f"{sorted(SUPPORTED_BACKBONES)}."
        )
    return SUPPORTED_BACKBONES[model_type]


def _chat_messages(family, with_image, text):
    """The user turn the released code builds for chat-template families (one message)."""
    # LLaVA-OneVision's model card ends its text items with "\n"; Qwen2-VL's prompt does not.
    newline = "\n" if family == "llava_onevision" else ""
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text + newline})
    return [{"role": "user", "content": content}]


def _string_templates(family):
    if family not in IMAGE_TOKENS:
        raise ValueError(f"family {family!r} uses a chat template")
    image_token = IMAGE_TOKENS[family]
    if family == "llava_next":
        wrap = "[INST] {} [/INST]".format
    else:
        # LLaVA-1.5 (Llama-3): the released strings end the user text with "in one word: " (trailing space).
        def wrap(content):
            return LLAMA3_TEMPLATE.format(content + " ")
    return {
        "text": wrap(f"{TEXT_PLACEHOLDER}\n{TEXT_SUFFIX}"),
        "image": wrap(f"{image_token}\n{IMAGE_SUFFIX}"),
        "fused": wrap(f"{image_token}\n{TEXT_PLACEHOLDER}\n{FUSED_SUFFIX}"),
    }


def default_prompt_templates(family, render_chat=None):
    """Return the family's prompt templates as plain strings.

    Args:
        family (`str`): one of the values of `SUPPORTED_BACKBONES`.
        render_chat (`callable`, *optional*): `messages -> str`, the backbone processor's
            `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`; required for
            chat-template families.

    Returns:
        `dict[str, str]` with keys `text`, `image`, `fused` (templates containing `<sent>` and/or the
        image token) and `image_token` (what `<|image_1|>` becomes in instruction mode).
    """
    if family not in INSTRUCTION_IMAGE_TOKENS:
        raise ValueError(f"Unknown UniME family {family!r}; expected one of {sorted(INSTRUCTION_IMAGE_TOKENS)}.")
    if family in CHAT_TEMPLATE_FAMILIES:
        if render_chat is None:
            raise ValueError(f"family {family!r} needs the backbone's chat template to build its prompts")
        templates = {
            "text": render_chat(_chat_messages(family, False, f"{TEXT_PLACEHOLDER}\n{TEXT_SUFFIX}")),
            "image": render_chat(_chat_messages(family, True, IMAGE_SUFFIX)),
            "fused": render_chat(_chat_messages(family, True, f"{TEXT_PLACEHOLDER}\n{FUSED_SUFFIX}")),
        }
    else:
        templates = _string_templates(family)
    templates["image_token"] = INSTRUCTION_IMAGE_TOKENS[family]
    return templates


def format_summary_prompt(templates, text, has_image):
    """Fill the summary-style template for one item (`text` may be None for image-only items)."""
    if text is None:
        return templates["image"]
    key = "fused" if has_image else "text"
    return templates[key].replace(TEXT_PLACEHOLDER, text)


def format_instruction_prompt(templates, text, has_image, instruction=None):
    """MMEB / stage-2 style: raw text, `<|image_1|>` rewritten to the backbone's image token.

    With `instruction`, the item becomes `[<|image_1|>] instruction [text]` (VLM2Vec's layout). An item
    with an image whose text has no placeholder gets the image token in front.
    """
    parts = [instruction.strip()] if instruction else []
    if text:
        parts.append(text.strip() if instruction else text)
    prompt = " ".join(parts)
    image_token = templates["image_token"]
    if has_image and MMEB_IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{MMEB_IMAGE_PLACEHOLDER} {prompt}" if prompt else MMEB_IMAGE_PLACEHOLDER
    if not has_image and MMEB_IMAGE_PLACEHOLDER in prompt:
        raise ValueError(f"text {prompt[:60]!r} contains {MMEB_IMAGE_PLACEHOLDER} but the item has no image")
    return prompt.replace(MMEB_IMAGE_PLACEHOLDER, image_token)


PROMPT_TEMPLATE_KEYS = ("text", "image", "fused", "image_token")


def validate_prompt_templates(templates, where="prompt_templates"):
    """Return `templates` (or None) if it can format every kind of item; raise naming the entry otherwise.

    A usable table is a dict of strings with the keys of `PROMPT_TEMPLATE_KEYS`. `text` and `fused`
    must contain `<sent>` (without it every text would embed the same), `image` must not (an
    image-only item has no text to put there), and `image` and `fused` must contain `image_token`
    (the backbone's image placeholder, or the image would not be placed). Extra keys are kept.

    Raises:
        TypeError: `templates` is not a dict, or an entry is not a string.
        ValueError: a required entry is missing or an entry lacks (or has) a placeholder.
    """
    if templates is None:
        return None
    if not isinstance(templates, dict):
        raise TypeError(f"{where} must be a dict with keys {list(PROMPT_TEMPLATE_KEYS)}, got {type(templates).__name__}")
    missing = [key for key in PROMPT_TEMPLATE_KEYS if key not in templates]
    if missing:
        raise ValueError(f"{where} is missing the entries {missing}; expected keys {list(PROMPT_TEMPLATE_KEYS)}")
    for key, value in templates.items():
        if not isinstance(value, str):
            raise TypeError(f"{where}[{key!r}] must be a string, got {type(value).__name__}")
    if not templates["image_token"].strip():
        raise ValueError(f"{where}['image_token'] is empty; expected the backbone's image placeholder")
    for key in ("text", "fused"):
        if TEXT_PLACEHOLDER not in templates[key]:
            raise ValueError(f"{where}[{key!r}] has no {TEXT_PLACEHOLDER!r}: every text would embed the same")
    if TEXT_PLACEHOLDER in templates["image"]:
        raise ValueError(f"{where}['image'] contains {TEXT_PLACEHOLDER!r}, but image-only items have no text")
    for key in ("image", "fused"):
        if templates["image_token"] not in templates[key]:
            raise ValueError(f"{where}[{key!r}] does not contain the image token {templates['image_token']!r}")
    return templates
