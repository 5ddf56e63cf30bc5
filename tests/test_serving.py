"""`save_for_serving`: a native checkpoint that plain transformers and sentence-transformers load with no
remote code and that gives UniME's embeddings through the released recipe."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.utils import is_torchvision_available

from modeling_unime import UniMEModel, UniMEProcessor
from modeling_unime.processing_unime import _backbone_processor_class, load_image_processor
from training.demo.tiny_models import tiny_unime

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
TEXT = "a red square"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_END = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
# The released prompts (REFERENCE §1.3 and the model cards), written out for TEXT: text, image, image+text.
EXPECTED_PROMPTS = {
    "qwen2_vl": (
        f"{QWEN_SYSTEM}{TEXT}\nSummary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n",
        f"{QWEN_SYSTEM}{QWEN_IMAGE}Summary above image in one word:<|im_end|>\n<|im_start|>assistant\n",
        f"{QWEN_SYSTEM}{QWEN_IMAGE}{TEXT}\nSummary above image and sentence in one word:<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "llava": (
        f"{LLAMA3_USER}{TEXT}\nSummary above sentence in one word: {LLAMA3_END}",
        f"{LLAMA3_USER}<image>\nSummary above image in one word: {LLAMA3_END}",
        f"{LLAMA3_USER}<image>\n{TEXT}\nSummary above image and sentence in one word: {LLAMA3_END}",
    ),
    "llava_next": (
        f"[INST] {TEXT}\nSummary above sentence in one word: [/INST]",
        "[INST] <image>\nSummary above image in one word: [/INST]",
        f"[INST] <image>\n{TEXT}\nSummary above image and sentence in one word: [/INST]",
    ),
    "llava_onevision": (
        f"<|im_start|>user \n{TEXT}\nSummary above sentence in one word:\n<|im_end|><|im_start|>assistant\n",
        "<|im_start|>user <image>\nSummary above image in one word:\n<|im_end|><|im_start|>assistant\n",
        f"<|im_start|>user <image>\n{TEXT}\nSummary above image and sentence in one word:\n<|im_end|>"
        "<|im_start|>assistant\n",
    ),
}
EXPECTED_PROMPTS["qwen2_5_vl"] = EXPECTED_PROMPTS["qwen2_vl"]
# Qwen3-VL's chat template adds no default system turn.
EXPECTED_PROMPTS["qwen3_vl"] = (
    f"<|im_start|>user\n{TEXT}\nSummary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n",
    f"<|im_start|>user\n{QWEN_IMAGE}Summary above image in one word:<|im_end|>\n<|im_start|>assistant\n",
    f"<|im_start|>user\n{QWEN_IMAGE}{TEXT}\nSummary above image and sentence in one word:<|im_end|>\n"
    "<|im_start|>assistant\n",
)
MESSAGES = (
    [{"role": "user", "content": [{"type": "text", "text": TEXT}]}],
    [{"role": "user", "content": [{"type": "image"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}],
)
# These processors need a video processor, which transformers builds with torchvision only.
VIDEO_PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def released_recipe(directory, family, prompts, images):
    """The released evaluation code on the export: generation model, left padding, output_hidden_states,
    `hidden_states[-1][:, -1]`, L2 normalisation; one forward per item list."""
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    settings = json.loads((Path(directory) / "processor_config.json").read_text())
    settings.pop("processor_class")
    processor = _backbone_processor_class(family)(image_processor=load_image_processor(directory),
                                                  tokenizer=tokenizer, **settings)
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
    return F.normalize(hidden.float(), dim=-1)


def test_export_is_native_and_the_released_recipe_gives_our_embeddings(family, tmp_path, images):
    model, processor = tiny_unime(family, seed=3)
    out = model.save_for_serving(tmp_path / "export", processor=processor)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[family]]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    assert not (out / "README.md").exists() or "trust_remote_code" not in (out / "README.md").read_text()
    _, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert oct(out.stat().st_mode & 0o777) == "0o755"

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = (out / "chat_template.jinja").read_text()
    for add_generation_prompt in (False, True):
        rendered = [tokenizer.apply_chat_template(m, tokenize=False, chat_template=template,
                                                  add_generation_prompt=add_generation_prompt) for m in MESSAGES]
        assert tuple(rendered) == EXPECTED_PROMPTS[family]

    image = images[0]
    text_prompt, image_prompt, fused_prompt = EXPECTED_PROMPTS[family]
    recipe = torch.cat([
        released_recipe(out, family, [text_prompt, EXPECTED_PROMPTS[family][0].replace(TEXT, "two blue circles")], None),
        released_recipe(out, family, [image_prompt, image_prompt], [image, images[1]]),
        released_recipe(out, family, [fused_prompt], [image]),
    ])
    ours = model.encode([TEXT, "two blue circles", image, images[1], {"image": image, "text": TEXT}],
                        processor=processor)
    torch.testing.assert_close(recipe, ours, atol=1e-5, rtol=0)


def test_pooling_files_parse_in_the_current_and_the_legacy_format(tmp_path):
    from sentence_transformers.sentence_transformer.modules import Pooling

    model, processor = tiny_unime("llava")
    out = model.save_for_serving(tmp_path / "export", processor=processor)
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    config = json.loads((out / "1_Pooling" / "config.json").read_text())

    # Current format: sentence-transformers 6 reads `pooling_mode`.
    pooling = Pooling.load(str(out / "1_Pooling"))
    assert pooling.pooling_mode == "lasttoken" and pooling.embedding_dimension == 32

    # Legacy readers: vLLM takes the first true key of the file and strips `pooling_mode_`; old
    # sentence-transformers calls Pooling(**config) with this signature (v2.3 to v5.3).
    assert next(key for key, value in config.items() if value is True) == "pooling_mode_lasttoken"

    def legacy_pooling(word_embedding_dimension, pooling_mode=None, pooling_mode_cls_token=False,
                       pooling_mode_max_tokens=False, pooling_mode_mean_tokens=False,
                       pooling_mode_mean_sqrt_len_tokens=False, pooling_mode_weightedmean_tokens=False,
                       pooling_mode_lasttoken=False, include_prompt=True):
        return word_embedding_dimension, pooling_mode, pooling_mode_lasttoken, pooling_mode_mean_tokens

    assert legacy_pooling(**config) == (32, "lasttoken", True, False)
    assert inspect.signature(legacy_pooling).bind(**config)
    assert json.loads((out / "2_Normalize" / "config.json").read_text()) == {}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_sentence_transformers_loads_the_export_without_remote_code(family, tmp_path, images):
    if family in VIDEO_PROCESSOR_FAMILIES and not is_torchvision_available():
        pytest.skip(f"sentence-transformers loads {family}'s processor with AutoProcessor, which needs torchvision")
    from sentence_transformers import SentenceTransformer

    model, processor = tiny_unime(family, seed=1)
    out = model.save_for_serving(tmp_path / "export", processor=processor)
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=False)
    items = [TEXT, images[0], {"image": images[1], "text": TEXT}]
    ours = model.encode(items, processor=processor)
    theirs = torch.cat([st.encode([item], convert_to_tensor=True) for item in items])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.encode([TEXT, "two blue circles"], convert_to_tensor=True),
                               model.encode([TEXT, "two blue circles"], processor=processor), atol=1e-5, rtol=0)


def test_lora_is_folded_in_and_matryoshka_dimensions_are_recorded(tmp_path):
    from training.lora import add_lora

    model, processor = tiny_unime("qwen2_vl", seed=2)
    model.config.matryoshka_dims = [8, 32, 16]
    peft_model = add_lora(model, rank=4)
    torch.manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)  # peft starts B at zero, which would make the merge a no-op
    expected = peft_model.encode([TEXT, "two blue circles"], processor=processor)
    out = peft_model.save_for_serving(tmp_path / "export", processor=processor)

    config = json.loads((out / "config.json").read_text())
    assert config["is_matryoshka"] is True and config["matryoshka_dimensions"] == [32, 16, 8]
    recipe = released_recipe(out, "qwen2_vl", [EXPECTED_PROMPTS["qwen2_vl"][0],
                                               EXPECTED_PROMPTS["qwen2_vl"][0].replace(TEXT, "two blue circles")], None)
    torch.testing.assert_close(recipe, expected, atol=1e-5, rtol=0)
    plain = tiny_unime("qwen2_vl", seed=2)[0].encode([TEXT], processor=processor)
    assert (plain - expected[:1]).abs().max() > 1e-2  # the adapters did change the embeddings


def test_failed_export_leaves_the_previous_one_and_mismatched_processor_is_refused(tmp_path):
    model, processor = tiny_unime("llava")
    out = model.save_for_serving(tmp_path / "export", processor=processor)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="processor is for 'qwen2_vl'"):
        model.save_for_serving(out, processor=tiny_unime("qwen2_vl")[1])
    model.config.prompt_templates = None
    broken = UniMEProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                            backbone_family="llava", prompt_templates=dict(processor.prompt_templates))
    # The constructor refuses such templates; edited afterwards, the export still must not write them.
    broken.prompt_templates = dict(processor.prompt_templates, text="no slot")
    with pytest.raises(ValueError, match="must contain '<sent>' once"):
        model.save_for_serving(out, processor=broken)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_cli_exports_a_saved_checkpoint_in_a_fresh_process(tmp_path):
    model, processor = tiny_unime("llava_next", seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "export_for_serving.py"), "--model", str(tmp_path / "ckpt"),
         "--output", str(tmp_path / "served"), "--dtype", "float32"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # deepspeed (installed for the ZeRO configs) logs its CPU fallback on import; that line is not ours.
    lines = [line for line in result.stdout.splitlines() if "real_accelerator.py" not in line]
    assert lines[0] == f"wrote {tmp_path / 'served'}: LlavaNextForConditionalGeneration, embedding dimension 32"
    assert "  1_Pooling/config.json" in lines and "  chat_template.jinja" in lines and "  model.safetensors" in lines
    assert lines[-1] == f"serve with: vllm serve {tmp_path / 'served'} --runner pooling --convert embed"
    assert "Traceback" not in result.stderr and "warn" not in result.stderr.lower()
    reloaded = UniMEModel.from_pretrained(tmp_path / "ckpt")
    recipe = released_recipe(tmp_path / "served", "llava_next", [EXPECTED_PROMPTS["llava_next"][0]], None)
    torch.testing.assert_close(recipe, reloaded.encode([TEXT], processor=processor), atol=1e-5, rtol=0)
