"""Qwen3-VL as a UniME backbone, and the Qwen instruction-mode image token.

The family-parametrised tests (tests/test_modeling.py: official-recipe exactness, batch invariance with
mixed image sizes, padding sides) cover Qwen3-VL through `FAMILIES`; this module adds what is specific:
the prompt strings written out, the MMEB instruction mode against the VLM2Vec recipe, the
trust_remote_code round trip, and stage 1 / stage 2 / GradCache on the Qwen3-VL backbone.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForImageTextToText

from modeling_unime import UniMEModel, UniMEProcessor
from training.distillation import DistillationConfig, UniMEDistillationTrainer
from training.gradcache import gradcache_step
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.demo.tiny_models import tiny_unime

from test_modeling import official_processor  # noqa: I001
from test_remote_code import run_fresh_process

# Qwen3-VL-Instruct's chat template adds no default system turn (Qwen2-VL's adds "You are a helpful
# assistant."); the UniME summary prompts rendered from it, written out.
QWEN3_VL_IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Summary above image in one "
                         "word:<|im_end|>\n<|im_start|>assistant\n")
QWEN3_VL_TEXT_PROMPT = "<|im_start|>user\n{}\nSummary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n"
QWEN3_VL_FUSED_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}\nSummary above image and "
                         "sentence in one word:<|im_end|>\n<|im_start|>assistant\n")
MMEB_QUERY = "<|image_1|> Represent the given image with the following question: What colour is the shape?"
# VLM2Vec (`VLM_IMAGE_TOKENS`) and UniME-V2 replace <|image_1|> by the bare image pad for Qwen2/2.5/3-VL.
VLM2VEC_QUERY = "<|image_pad|> Represent the given image with the following question: What colour is the shape?"


def test_summary_prompts_are_qwen3_vl_chat_template_strings():
    _, processor = tiny_unime("qwen3_vl")
    templates = processor.prompt_templates
    assert templates["image"] == QWEN3_VL_IMAGE_PROMPT
    assert templates["text"] == QWEN3_VL_TEXT_PROMPT.format("<sent>")
    assert templates["fused"] == QWEN3_VL_FUSED_PROMPT.format("<sent>")
    assert processor.format_prompt("a dog") == QWEN3_VL_TEXT_PROMPT.format("a dog")


@pytest.mark.parametrize("family, expected", [
    ("qwen2_vl", VLM2VEC_QUERY), ("qwen2_5_vl", VLM2VEC_QUERY), ("qwen3_vl", VLM2VEC_QUERY),
    ("llava_next", "<image> Represent the given image with the following question: What colour is the shape?"),
])
def test_instruction_mode_image_token_follows_the_reference(family, expected):
    _, processor = tiny_unime(family)
    assert processor.format_prompt(MMEB_QUERY, has_image=True, prompt_style="instruction") == expected
    # summary prompts keep the chat template's vision_start / vision_end around the image
    if family.startswith("qwen"):
        assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.prompt_templates["image"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_instruction_mode_matches_the_vlm2vec_recipe(family, backbone_checkpoints, images):
    """VLM2Vec-style: the backbone's own processor on the raw string with the bare image pad, the
    generation model, `hidden_states[-1][:, -1]`, left padding, normalised; to 1e-5 in float32."""
    directory = backbone_checkpoints(family)
    model = UniMEModel.from_backbone(directory)
    processor = UniMEProcessor.from_backbone(directory)
    items = [{"image": images[0], "text": MMEB_QUERY}, {"image": images[3], "text": MMEB_QUERY},
             "Find the red circle."]
    ours = model.encode(items, processor=processor, prompt_style="instruction", batch_size=3)

    generation = AutoModelForImageTextToText.from_pretrained(directory).eval()
    official = official_processor(family, directory)
    official.tokenizer.padding_side = "left"
    with torch.no_grad():
        inputs = official(text=[VLM2VEC_QUERY, VLM2VEC_QUERY], images=[images[0], images[3]], padding=True,
                          return_tensors="pt")
        image_side = generation(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
        inputs = official(text=["Find the red circle."], padding=True, return_tensors="pt")
        text_side = generation(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    reference = F.normalize(torch.cat([image_side, text_side]), dim=-1)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_qwen3_vl_classes_exist_without_torchvision():
    from transformers.utils import is_torchvision_available

    assert transformers.Qwen3VLConfig().model_type == "qwen3_vl"
    assert transformers.Qwen3VLForConditionalGeneration and transformers.Qwen3VLProcessor
    assert not is_torchvision_available()  # the tests run the PIL image processor path
    _, processor = tiny_unime("qwen3_vl")
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_trust_remote_code_round_trip(tmp_path, images):
    model, processor = tiny_unime("qwen3_vl")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    expected = model.encode(["a dog", images[0], {"image": images[0], "text": "what is it?"}], processor=processor)
    loaded = run_fresh_process(tmp_path, checkpoint, image_path)
    assert torch.equal(loaded["embeddings"], expected)


def test_stage1_trains_only_language_model_lora(tmp_path):
    model, processor = tiny_unime("qwen3_vl")
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_rank=4, lora_dropout=0.0)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in name and "lora_" in name for name in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 linear layers in each of the 2 decoder layers
    texts = ["a dog", "two cats on a mat", "a red car", "the sea at night"]
    teacher = F.normalize(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.manual_seed(1)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    loss = trainer.compute_loss(trainer.model, {**processor(text=texts), "teacher_embeddings": teacher})
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)


def test_stage2_gradcache_is_exact_on_qwen3_vl(tmp_path, images):
    """GradCache (chunks of 2) gives the LoRA gradients of one backward over the batch (float64),
    with image queries of different sizes and text targets."""
    model, processor = tiny_unime("qwen3_vl")
    args = HardNegativeConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_rank=4, lora_dropout=0.0,
                              contrastive_temperature=0.05, num_hard_negatives=2, false_negative_margin=0.05)
    trainer = UniMEHardNegativeTrainer(model=model.double(), args=args, processor=processor)
    lora = trainer.model.train()
    torch.manual_seed(1)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    queries = [("<|image_1|> What is shown?", images[0]), ("find a tree", None), (None, images[2]),
               ("<|image_1|> Describe it.", images[5])]
    targets = [("a photo", None), (None, images[1]), ("a cat", None), (None, images[4])]

    def process(items):
        batch = processor(text=[t for t, _ in items], images=[i for _, i in items], prompt_style="instruction")
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}

    loss, _ = trainer.contrastive_loss(lora(**process(queries)).embeddings, lora(**process(targets)).embeddings)
    loss.backward()
    reference = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    lora.zero_grad(set_to_none=True)
    chunks = [[process(items[i:i + 2]) for i in range(0, 4, 2)] for items in (queries, targets)]
    cached_loss, _ = gradcache_step(lora, chunks[0], chunks[1], trainer.contrastive_loss)
    assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-10)
    scale = max(g.abs().max().item() for g in reference.values())
    worst = max((p.grad - reference[n]).abs().max().item() for n, p in lora.named_parameters() if p.requires_grad)
    print(f"Qwen3-VL GradCache: max |grad diff| {worst:.2e} of {scale:.2e}")
    assert scale > 1e-3 and worst <= 1e-8 * scale
