"""Every family's rendered prompt, written out literally, as the released recipe and VLM2Vec write them.

The expected strings are NOT read from `modeling_unime.prompts`: they are copied from the released
evaluation code (`self_evaluate/retrieval_self.py`), the backbones' published chat templates and
VLM2Vec v1 (`src/dataset.py:129-130`, where `<|image_1|>` becomes `<image>` or `<|image_pad|>`), see
REFERENCE.md §1.3-1.4 and DESIGN.md §3. The fused summary prompt is our own choice (DESIGN.md §3:
image and text in one user turn). Each test compares the whole string, then the processor's token ids
with the tokenizer's ids of that literal (image token expanded to a count worked out by hand).
"""

import functools

import pytest
from PIL import Image

from training.demo import tiny_models
from training.demo.tiny_models import tiny_tokenizer

# Building a processor loads the real tokenizer; one per family keeps the module fast.
tiny_processor = functools.lru_cache(maxsize=None)(tiny_models.tiny_processor)

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_VISION = "<|vision_start|><|image_pad|><|vision_end|>"
LLAMA3 = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"


def _qwen(user):
    return QWEN_SYSTEM + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


QWEN_SUMMARY = {
    "text": _qwen("a dog\nSummary above sentence in one word:"),
    "image": _qwen(QWEN_VISION + "Summary above image in one word:"),
    "fused": _qwen(QWEN_VISION + "a dog\nSummary above image and sentence in one word:"),
}

SUMMARY = {
    "qwen2_vl": QWEN_SUMMARY,
    "qwen2_5_vl": QWEN_SUMMARY,
    "llava": {
        "text": LLAMA3.format("a dog\nSummary above sentence in one word: "),
        "image": LLAMA3.format("<image>\nSummary above image in one word: "),
        "fused": LLAMA3.format("<image>\na dog\nSummary above image and sentence in one word: "),
    },
    "llava_next": {
        "text": "[INST] a dog\nSummary above sentence in one word: [/INST]",
        "image": "[INST] <image>\nSummary above image in one word: [/INST]",
        "fused": "[INST] <image>\na dog\nSummary above image and sentence in one word: [/INST]",
    },
    # LLaVA-OneVision's chat template: "<|im_start|>user " + images + "\n" + text, no system turn; the
    # model card ends each text item with "\n".
    "llava_onevision": {
        "text": "<|im_start|>user \na dog\nSummary above sentence in one word:\n<|im_end|><|im_start|>assistant\n",
        "image": "<|im_start|>user <image>\nSummary above image in one word:\n<|im_end|><|im_start|>assistant\n",
        "fused": "<|im_start|>user <image>\na dog\nSummary above image and sentence in one word:\n"
                 "<|im_end|><|im_start|>assistant\n",
    },
}

# A 56x56 image gives, by hand: Qwen2-VL 56/14 = 4 patches a side -> 16 patches, merged 2x2 -> 4 tokens;
# LLaVA-1.5 resizes to 28 -> 2x2 patches (the CLS feature dropped) -> 4; LLaVA-NeXT / OneVision pick the
# 56x56 pinpoint: base 2x2 = 4, plus 4 crops x 4 = 16, plus one newline per row of the 4x4 grid = 4 -> 24.
IMAGE_TOKEN_COUNT = {"qwen2_vl": 4, "qwen2_5_vl": 4, "llava": 4, "llava_next": 24, "llava_onevision": 24}
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava": "<image>",
               "llava_next": "<image>", "llava_onevision": "<image>"}

ITEMS = {"text": ("a dog", False), "image": (None, True), "fused": ("a dog", True)}

RAW_MMEB = "<|image_1|> Represent the given image with the following question: what colour?"
QUESTION = " Represent the given image with the following question: what colour?"
# VLM2Vec v1 rewrites <|image_1|> to the bare image token: "<image>" (LLaVA) or "<|image_pad|>" (Qwen).
INSTRUCTION_LLAVA = "<image>" + QUESTION
INSTRUCTION_QWEN = "<|image_pad|>" + QUESTION

INSTRUCTION_CASES = [
    pytest.param("qwen2_vl", INSTRUCTION_QWEN, id="qwen2_vl"),
    pytest.param("qwen2_5_vl", INSTRUCTION_QWEN, id="qwen2_5_vl"),
    pytest.param("llava", INSTRUCTION_LLAVA, id="llava"),
    pytest.param("llava_next", INSTRUCTION_LLAVA, id="llava_next"),
    pytest.param("llava_onevision", INSTRUCTION_LLAVA, id="llava_onevision"),
]


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (56, 56), (200, 30, 30))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def expected_ids(tokenizer, family, literal):
    """Token ids of `literal` with the family's image token repeated `IMAGE_TOKEN_COUNT` times."""
    token = IMAGE_TOKEN[family]
    expanded = literal.replace(token, token * IMAGE_TOKEN_COUNT[family])
    return tokenizer(expanded, add_special_tokens=False).input_ids


def test_qwen_special_token_ids_are_the_published_ones(tokenizer):
    # Qwen2-VL's tokenizer_config.json: these ids are what the backbone's config refers to.
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                   "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}


def test_qwen2_vl_text_prompt_token_ids_literal():
    # The Qwen2 vocabulary's ids for the whole text prompt, written out (no tokenizer call involved).
    batch = tiny_processor("qwen2_vl")(text=["a dog"])
    assert batch["input_ids"][0].tolist() == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,        # system turn
        151644, 872, 198, 64, 5562, 198, 19237, 3403, 11652, 304, 825, 3409, 25,  # user: a dog\nSummary ...
        151645, 198, 151644, 77091, 198,                                          # assistant turn
    ]


@pytest.mark.parametrize("family", list(SUMMARY))
@pytest.mark.parametrize("kind", list(ITEMS))
def test_summary_prompt_string_and_ids(family, kind, image, tokenizer):
    processor = tiny_processor(family)
    text, has_image = ITEMS[kind]
    literal = SUMMARY[family][kind]
    assert processor.format_prompt(text, has_image=has_image) == literal
    batch = processor(text=[text], images=[image if has_image else None])
    assert batch["input_ids"][0].tolist() == expected_ids(tokenizer, family, literal)
    assert batch["attention_mask"][0].tolist() == [1] * len(batch["input_ids"][0])


@pytest.mark.parametrize("family, literal", INSTRUCTION_CASES)
def test_instruction_prompt_string_and_ids(family, literal, image, tokenizer):
    processor = tiny_processor(family)
    assert processor.format_prompt(RAW_MMEB, has_image=True, prompt_style="instruction") == literal
    batch = processor(text=[RAW_MMEB], images=[image], prompt_style="instruction")
    assert batch["input_ids"][0].tolist() == expected_ids(tokenizer, family, literal)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_instruction_argument_layout(family, image, tokenizer):
    # VLM2Vec's layout: [image token] instruction [text], single spaces, no summary suffix, no chat turn.
    processor = tiny_processor(family)
    assert processor.format_prompt("a dog", instruction="Find an image: ") == "Find an image: a dog"
    assert processor.format_prompt(None, True, instruction="Classify the image.") == "<image> Classify the image."
    assert processor.format_prompt("a dog", True, instruction=" Find a caption. ") == "<image> Find a caption. a dog"
    batch = processor(text=["a dog", None], images=[None, image], instruction="Find it.", padding_side="left")
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [expected_ids(tokenizer, family, "Find it. a dog"),
                    expected_ids(tokenizer, family, "<image> Find it.")]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_text_only_instruction_is_the_raw_text(family, tokenizer):
    processor = tiny_processor(family)
    assert processor.format_prompt("Find an image: a dog", prompt_style="instruction") == "Find an image: a dog"
    batch = processor(text=["Find an image: a dog"], prompt_style="instruction")
    assert batch["input_ids"][0].tolist() == tokenizer("Find an image: a dog").input_ids


@pytest.mark.parametrize("family", list(SUMMARY))
def test_mixed_batch_rows_match_single_items(family, image, tokenizer):
    # Left padding: every row, stripped of its padding, is the literal of its own item.
    processor = tiny_processor(family)
    batch = processor(text=["a dog", None, "a dog"], images=[None, image, image], padding_side="left")
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [expected_ids(tokenizer, family, SUMMARY[family][kind]) for kind in ("text", "image", "fused")]
    assert all(mask[-1] == 1 for mask in batch["attention_mask"])


@pytest.mark.parametrize("family", list(SUMMARY))
def test_saved_processor_records_and_reloads_the_literal_templates(family, tmp_path):
    # The templates are data that travel with a checkpoint: the saved copy must be the literal recipe.
    from modeling_unime import UniMEProcessor

    tiny_processor(family).save_pretrained(tmp_path)
    reloaded = UniMEProcessor.from_pretrained(tmp_path)
    expected = {kind: SUMMARY[family][kind].replace("a dog", "<sent>") for kind in ITEMS}
    # (image_token, the instruction-mode rewrite of <|image_1|>, is pinned by the instruction tests)
    assert {kind: reloaded.prompt_templates[kind] for kind in ITEMS} == expected
    for kind, (text, has_image) in ITEMS.items():
        assert reloaded.format_prompt(text, has_image=has_image) == SUMMARY[family][kind]
