"""UniMEModel / UniMEProcessor: official-recipe exactness, pooling, batch invariance, errors."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForImageTextToText

from modeling_unime import UniMEConfig, UniMEModel, UniMEProcessor
from modeling_unime.modeling_unime import last_token_positions
from modeling_unime.processing_unime import load_image_processor
from training.demo.tiny_models import save_tiny_backbone, tiny_unime

TEXTS = ["a dog runs on the beach", "two cats", "a red square left of a blue circle under the morning sky"]

# The released evaluation code's prompt strings (self_evaluate/retrieval_self.py), written out here
# independently of modeling_unime.prompts.
LLAMA3 = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
OFFICIAL_STRINGS = {
    "llava_next": ("[INST] <image>\nSummary above image in one word: [/INST]",
                   "[INST] <sent>\nSummary above sentence in one word: [/INST]"),
    "llava": (LLAMA3.format("<image>\nSummary above image in one word: "),
              LLAMA3.format("<sent>\nSummary above sentence in one word: ")),
}
OFFICIAL_CHAT = {
    "qwen2_vl": ([{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}],
                 "{}\nSummary above sentence in one word:"),
    "qwen2_5_vl": ([{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}],
                   "{}\nSummary above sentence in one word:"),
    "qwen3_vl": ([{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}],
                 "{}\nSummary above sentence in one word:"),
    "llava_onevision": ([{"type": "image"}, {"type": "text", "text": "Summary above image in one word:\n"}],
                        "{}\nSummary above sentence in one word:\n"),
}


def official_processor(family, directory):
    """The backbone's own processor class, built the way a user of the released code would."""
    base = getattr(transformers, {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                  "qwen3_vl": "Qwen3VLProcessor", "llava": "LlavaProcessor",
                                  "llava_next": "LlavaNextProcessor",
                                  "llava_onevision": "LlavaOnevisionProcessor"}[family])

    class NoVideo(base):  # torchvision is not installed, so no video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    import json
    settings = json.loads((directory / "processor_config.json").read_text())
    settings.pop("processor_class")
    chat = directory / "chat_template.jinja"
    return NoVideo(
        # AutoImageProcessor needs torchvision on some transformers 5.x releases; the image processor
        # class is not what this test checks.
        image_processor=load_image_processor(directory),
        tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
        chat_template=chat.read_text() if chat.exists() else None,
        **settings,
    )


def official_prompts(family, processor, texts, n_images):
    if family in OFFICIAL_STRINGS:
        image_prompt, text_prompt = OFFICIAL_STRINGS[family]
        return [text_prompt.replace("<sent>", t) for t in texts], [image_prompt] * n_images

    def render(content):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    image_content, text_format = OFFICIAL_CHAT[family]
    text_prompts = [render([{"type": "text", "text": text_format.format(t)}]) for t in texts]
    return text_prompts, [render(image_content)] * n_images


def official_embeddings(family, directory, texts, images):
    """UniME's released recipe: generation model, all hidden states, [:, -1], left padding, normalise."""
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = official_processor(family, directory)
    processor.tokenizer.padding_side = "left"
    text_prompts, image_prompts = official_prompts(family, processor, texts, len(images))
    with torch.no_grad():
        text_inputs = processor(text=text_prompts, padding=True, return_tensors="pt")
        text_out = model(**text_inputs, output_hidden_states=True).hidden_states[-1][:, -1]
        image_inputs = processor(text=image_prompts, images=images, padding=True, return_tensors="pt")
        image_out = model(**image_inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    return F.normalize(torch.cat([text_out, image_out]), dim=-1)


def test_from_backbone_matches_official_recipe(family, backbone_checkpoints, images):
    directory = backbone_checkpoints(family)
    model = UniMEModel.from_backbone(directory)
    processor = UniMEProcessor.from_backbone(directory)
    ours = model.encode(TEXTS + images[:3], processor=processor, batch_size=4)
    reference = official_embeddings(family, directory, TEXTS, images[:3])
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5


def test_pooled_position_is_the_template_end(family):
    """The pooled token is the template's final token (no EOS appended, never padding)."""
    _, processor = tiny_unime(family)
    texts = ["short", "a much longer sentence with many more words in it"]
    batch = processor(text=texts)
    positions = last_token_positions(batch["attention_mask"])
    pooled_ids = batch["input_ids"][torch.arange(2), positions].tolist()
    template_end = processor.prompt_templates["text"].rsplit("<sent>", 1)[1]
    expected = processor.tokenizer(template_end, add_special_tokens=False)["input_ids"][-1]
    assert pooled_ids == [expected, expected]
    assert processor.tokenizer.pad_token_id not in pooled_ids
    assert positions.tolist() == [batch["input_ids"].shape[1] - 1] * 2  # left padding: last column


def test_left_and_right_padding_give_same_embeddings(family, images):
    model, processor = tiny_unime(family)
    items_text = ["one", "a considerably longer sentence than the first one"]
    with torch.no_grad():
        for kwargs in ({"text": items_text}, {"text": [None, "caption"], "images": images[:2]}):
            left = model(**processor(**kwargs, padding_side="left")).embeddings
            right = model(**processor(**kwargs, padding_side="right")).embeddings
            assert (left - right).abs().max().item() <= 1e-5


def test_batch_invariance(family, images):
    model, processor = tiny_unime(family)
    items = [TEXTS[0], images[0], {"image": images[1], "text": "what is shown?"}, TEXTS[2], images[2], TEXTS[1],
             {"image": images[3], "text": "a longer question about the picture"}]
    mixed = model.encode(items, processor=processor, batch_size=8)
    one_by_one = torch.stack([model.encode(item, processor=processor) for item in items])
    batch_of_two = model.encode(items, processor=processor, batch_size=2)
    reordered = model.encode(items[::-1], processor=processor, batch_size=3).flip(0)
    for other in (one_by_one, batch_of_two, reordered):
        assert (mixed - other).abs().max().item() <= 1e-5
    # neighbours of very different lengths in one forward pass do not change an item either
    with torch.no_grad():
        alone = model(**processor(text=[TEXTS[1]])).embeddings
        padded = model(**processor(text=[TEXTS[1], TEXTS[2] * 5])).embeddings[:1]
        mixed_forward = model(**processor(text=[TEXTS[1], None], images=[None, images[0]])).embeddings[:1]
    assert (alone - padded).abs().max().item() <= 1e-5
    assert (alone - mixed_forward).abs().max().item() <= 1e-5


def test_encode_outputs_and_similarity(qwen2_vl_model, images):
    model, processor = qwen2_vl_model
    text = model.encode_text(TEXTS, processor=processor)
    pictures = model.encode_image(images[:2], processor=processor)
    assert text.shape == (3, model.config.text_hidden_size) and text.dtype == torch.float32
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    scores = model.similarity(text, pictures)
    assert scores.shape == (3, 2)
    assert torch.allclose(scores, text @ pictures.T, atol=1e-6)
    assert model.encode("a dog", processor=processor).shape == (model.config.text_hidden_size,)
    assert isinstance(model.encode(["a dog"], processor=processor, convert_to_tensor=False), __import__("numpy").ndarray)
    instruct = model.encode([{"image": images[0], "text": "<|image_1|> Represent the given image for classification."}],
                            processor=processor, prompt_style="instruction")
    assert not torch.allclose(instruct, model.encode([images[0]], processor=processor))


def test_instruction_prompts_rewrite_image_placeholder(family):
    _, processor = tiny_unime(family)
    token = processor.prompt_templates["image_token"]
    raw = "<|image_1|> Represent the given image with the following question: what colour?"
    assert processor.format_prompt(raw, has_image=True, prompt_style="instruction") == raw.replace("<|image_1|>", token)
    assert processor.format_prompt("a dog", instruction="Find an image: ") == "Find an image: a dog"
    assert processor.format_prompt(None, True, instruction="Classify the image.").startswith(token)
    with pytest.raises(ValueError, match="has no image"):
        processor.format_prompt(raw, has_image=False, prompt_style="instruction")


@pytest.mark.parametrize(
    "item, message",
    [
        (None, "item 1 is None"),
        ("", "item 1: text is empty"),
        (3.5, "item 1: expected str"),
        ({"text": None, "image": None}, "both 'image' and 'text' are None"),
        ({"caption": "x"}, "dict items need"),
        (__import__("pathlib").Path("/nonexistent/cat.png"), "does not exist"),
    ],
)
def test_encode_rejects_bad_items_by_index(qwen2_vl_model, item, message):
    model, processor = qwen2_vl_model
    with pytest.raises((ValueError, TypeError), match=message):
        model.encode(["fine", item], processor=processor)


def test_encode_rejects_unreadable_file_and_needs_a_processor(qwen2_vl_model, tmp_path):
    model, processor = qwen2_vl_model
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="item 0: cannot read image file"):
        model.encode([broken], processor=processor)
    with pytest.raises(ValueError, match="not loaded from a checkpoint, so it has no processor"):
        model.encode(["x"])


def test_unsupported_backbone_lists_supported_ones():
    with pytest.raises(ValueError, match="supported backbones are .*llava_onevision.*qwen2_vl"):
        UniMEConfig(backbone_config=transformers.BertConfig())
    with pytest.raises(ValueError, match="not supported"):
        UniMEProcessor(image_processor=None, tokenizer=None, backbone_family="bert")


def test_from_backbone_refuses_missing_weights(backbone_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    source = backbone_checkpoints("qwen2_vl")
    target = save_tiny_backbone("qwen2_vl", tmp_path / "partial")
    weights = load_file(source / "model.safetensors")
    dropped = [key for key in weights if "layers.1.mlp" in key]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, target / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing .* backbone weights"):
        UniMEModel.from_backbone(target)


def test_in_process_auto_registration(qwen2_vl_model, tmp_path):
    model, processor = qwen2_vl_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    loaded_processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is UniMEModel and type(loaded_processor) is UniMEProcessor
    assert loaded_processor.prompt_templates == processor.prompt_templates
    a = model.encode(TEXTS, processor=processor)
    b = loaded.encode(TEXTS, processor=loaded_processor)
    assert torch.equal(a, b)


def test_gradient_checkpointing_and_training_forward(qwen2_vl_model, images):
    model, processor = tiny_unime("qwen2_vl")
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()  # 5.24 renamed it
    batch = processor(text=[None, "a caption"], images=[images[0], None])
    model(**batch).embeddings.sum().backward()
    grads = [p.grad for p in model.backbone.language_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_pickled_weights_are_refused_unless_opted_in(tmp_path):
    from training.demo.tiny_models import tiny_generation_model

    directory = save_tiny_backbone("qwen2_vl", tmp_path / "pickled")
    (directory / "model.safetensors").unlink()
    model = tiny_generation_model("qwen2_vl")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        UniMEModel.from_backbone(directory)
    loaded = UniMEModel.from_backbone(directory, use_safetensors=False)
    assert torch.equal(loaded.backbone.language_model.layers[0].mlp.up_proj.weight,
                       model.model.language_model.layers[0].mlp.up_proj.weight)


def test_extreme_aspect_ratio_is_refused_by_item(qwen2_vl_model):
    from PIL import Image

    model, processor = qwen2_vl_model
    with pytest.raises(ValueError, match="item 1: image of size \\(5000, 1\\) has aspect ratio"):
        model.encode(["fine", Image.new("RGB", (5000, 1))], processor=processor)
