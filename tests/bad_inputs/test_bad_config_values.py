"""Bad config and training-argument values (issue 14): refused when the config is built, set or loaded,
each message naming the field and the value. The training configs use the losses' own checks, so
`HardNegativeConfig` refuses exactly what `hard_negative_infonce_loss` would refuse mid-training."""

import json
import math

import pytest
from transformers import Qwen2VLConfig

from modeling_unime import UniMEConfig, UniMEProcessor
from training.distillation import DistillationConfig
from training.hard_negative import HardNegativeConfig

# Independent of prompts.py: a complete, valid LLaVA-NeXT style table written out literally.
GOOD = {
    "text": "[INST] <sent>\nSummary above sentence in one word: [/INST]",
    "image": "[INST] <image>\nSummary above image in one word: [/INST]",
    "fused": "[INST] <image>\n<sent>\nSummary above image and sentence in one word: [/INST]",
    "image_token": "<image>",
}


def templates(**changes):
    table = {**GOOD, **changes}
    return {key: value for key, value in table.items() if value is not ...}


def config(**kwargs):
    return lambda: UniMEConfig(backbone_config=Qwen2VLConfig(), **kwargs)


def case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


TEMPLATE_CASES = [
    case("templates as a list", config(prompt_templates=["<sent>"]), TypeError,
         r"^prompt_templates must be a dict with keys \['text', 'image', 'fused', 'image_token'\], got list"),
    case("templates as a string", config(prompt_templates="<sent>"), TypeError, r"^prompt_templates must be a dict.*got str"),
    case("no image entry", config(prompt_templates=templates(image=...)), ValueError,
         r"^prompt_templates is missing the entries \['image'\]"),
    case("no entries", config(prompt_templates={}), ValueError,
         r"^prompt_templates is missing the entries \['text', 'image', 'fused', 'image_token'\]"),
    case("text without <sent>", config(prompt_templates=templates(text="[INST] Summary [/INST]")), ValueError,
         r"^prompt_templates\['text'\] has no '<sent>': every text would embed the same"),
    case("fused without <sent>", config(prompt_templates=templates(fused="<image> Summary")), ValueError,
         r"^prompt_templates\['fused'\] has no '<sent>'"),
    case("image with <sent>", config(prompt_templates=templates(image="<image> <sent>")), ValueError,
         r"^prompt_templates\['image'\] contains '<sent>', but image-only items have no text"),
    case("image without the image token", config(prompt_templates=templates(image="[INST] Summary [/INST]")),
         ValueError, r"^prompt_templates\['image'\] does not contain the image token '<image>'"),
    case("fused without the image token", config(prompt_templates=templates(fused="<sent> Summary")), ValueError,
         r"^prompt_templates\['fused'\] does not contain the image token '<image>'"),
    case("template not a string", config(prompt_templates=templates(text=None)), TypeError,
         r"^prompt_templates\['text'\] must be a string, got NoneType"),
    case("empty image token", config(prompt_templates=templates(image_token=" ")), ValueError,
         r"^prompt_templates\['image_token'\] is empty"),
]

CONFIG_CASES = [
    case("normalize as a string", config(normalize="false"), TypeError, r"^normalize must be True or False, got 'false'"),
    case("max_length negative", config(max_length=-1), ValueError, r"^max_length must be a positive int.*got -1"),
    case("max_length True", config(max_length=True), ValueError, r"^max_length must be a positive int.*got True"),
    case("max_length as a string", config(max_length="512"), ValueError, r"^max_length .*got '512'"),
    case("backbone_config of the wrong type", lambda: UniMEConfig(backbone_config=5), TypeError,
         r"^backbone_config must be a dict or a PretrainedConfig, got int"),
    case("unknown backbone_family", config(backbone_family="bert"), ValueError,
         r"^backbone_family='bert'; expected one of \['llava', 'llava_next', 'llava_onevision', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl'\]"),
]


@pytest.mark.parametrize("call, error, match", TEMPLATE_CASES + CONFIG_CASES)
def test_unime_config_refuses_bad_values_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_templates_are_checked_when_set_and_when_loaded(tmp_path):
    good = UniMEConfig(backbone_config=Qwen2VLConfig(), prompt_templates=templates())
    with pytest.raises(ValueError, match=r"^prompt_templates\['text'\] has no '<sent>'"):
        good.prompt_templates = templates(text="no placeholder")
    assert good.prompt_templates == GOOD  # the refused value was not stored
    good.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["prompt_templates"].pop("image")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"^prompt_templates is missing the entries \['image'\]"):
        UniMEConfig.from_pretrained(tmp_path)


def test_processor_refuses_templates_when_built_and_loaded(qwen2_vl_model, tmp_path):
    _, processor = qwen2_vl_model
    parts = dict(image_processor=processor.image_processor, tokenizer=processor.tokenizer, backbone_family="qwen2_vl")
    with pytest.raises(ValueError, match=r"^prompt_templates is missing the entries \['image'\]"):
        UniMEProcessor(**parts, prompt_templates=templates(image=...))
    with pytest.raises(TypeError, match=r"^prompt_templates must be a dict"):
        UniMEProcessor(**parts, prompt_templates=[GOOD])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    saved["prompt_templates"]["text"] = "Summary above sentence in one word:"
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"^prompt_templates\['text'\] has no '<sent>'"):
        UniMEProcessor.from_pretrained(tmp_path)


def stage2(**values):
    return lambda path: HardNegativeConfig(output_dir=str(path), use_cpu=True, report_to=[], **values)


def stage1(**values):
    return lambda path: DistillationConfig(output_dir=str(path), use_cpu=True, report_to=[], **values)


TRAINING_CASES = [
    case("margin NaN", stage2(false_negative_margin=math.nan), ValueError,
         r"^false_negative_margin must be finite \(or None to disable the filter\), got nan"),
    case("margin inf", stage2(false_negative_margin=math.inf), ValueError, r"^false_negative_margin must be finite.*got inf"),
    case("margin as a string", stage2(false_negative_margin="0.1"), TypeError,
         r"^false_negative_margin must be a number or None, got '0.1'"),
    case("margin True", stage2(false_negative_margin=True), TypeError, r"^false_negative_margin .*got True"),
    case("temperature inf", stage2(contrastive_temperature=math.inf), ValueError,
         r"^contrastive_temperature must be a finite number > 0, got inf"),
    case("temperature NaN", stage2(contrastive_temperature=math.nan), ValueError, r"^contrastive_temperature .*got nan"),
    case("temperature negative", stage2(contrastive_temperature=-0.02), ValueError, r"^contrastive_temperature .*got -0.02"),
    case("temperature as a string", stage2(contrastive_temperature="0.02"), TypeError,
         r"^contrastive_temperature must be a positive number, got '0.02'"),
    case("num_hard_negatives True", stage2(num_hard_negatives=True), TypeError, r"^num_hard_negatives .*got True"),
    case("num_hard_negatives float", stage2(num_hard_negatives=2.5), TypeError, r"^num_hard_negatives .*got 2.5"),
    case("num_hard_negatives 0", stage2(num_hard_negatives=0), ValueError, r"^num_hard_negatives must be >= 1"),
    case("image_size True", stage2(image_size=True), TypeError, r"^image_size must be an int >= 1 or None, got True"),
    case("image_size 0", stage2(image_size=0), ValueError, r"^image_size must be >= 1 or None, got 0"),
    case("image_size as a string", stage2(image_size="336"), TypeError, r"^image_size .*got '336'"),
    case("stage-2 max_length -1", stage2(max_length=-1), ValueError, r"^max_length must be >= 1 or None, got -1"),
    case("stage-2 max_length True", stage2(max_length=True), TypeError, r"^max_length .*got True"),
    case("gradcache_chunk_size True", stage2(gradcache_chunk_size=True), TypeError, r"^gradcache_chunk_size .*got True"),
    case("lora_rank -1", stage2(lora_rank=-1), ValueError, r"^lora_rank must be >= 0, got -1"),
    case("lora_rank True", stage2(lora_rank=True), TypeError, r"^lora_rank must be an int >= 0, got True"),
    case("lora_rank float", stage1(lora_rank=2.0), TypeError, r"^lora_rank .*got 2.0"),
    case("lora_alpha 0", stage2(lora_alpha=0), ValueError, r"^lora_alpha must be a finite number > 0, got 0"),
    case("lora_alpha NaN", stage1(lora_alpha=math.nan), ValueError, r"^lora_alpha .*got nan"),
    case("lora_dropout 1", stage2(lora_dropout=1.0), ValueError, r"^lora_dropout must be in \[0, 1\), got 1.0"),
    case("lora_dropout negative", stage1(lora_dropout=-0.1), ValueError, r"^lora_dropout .*got -0.1"),
    case("lora_dropout as a string", stage2(lora_dropout="0.05"), TypeError, r"^lora_dropout must be a number, got '0.05'"),
    case("lora_target_modules as a string", stage2(lora_target_modules="q_proj"), TypeError,
         r"^lora_target_modules must be a non-empty list of layer names, got 'q_proj'"),
    case("lora_target_modules empty", stage1(lora_target_modules=[]), TypeError, r"^lora_target_modules .*got \[\]"),
    case("lora_scope unknown", stage2(lora_scope="everything"), ValueError,
         r"^lora_scope='everything'; expected one of \('language_model', 'all'\)"),
    case("save_merged_model as a string", stage2(save_merged_model="false"), TypeError,
         r"^save_merged_model must be True or False, got 'false'"),
    case("kd_temperature as a string", stage1(kd_temperature="0.02"), TypeError,
         r"^kd_temperature must be a positive number, got '0.02'"),
    case("kd_temperature inf", stage1(kd_temperature=math.inf), ValueError, r"^kd_temperature must be a finite number > 0, got inf"),
    case("kd_temperature NaN", stage1(kd_temperature=math.nan), ValueError, r"^kd_temperature .*got nan"),
    case("kd_mask_diagonal as a string", stage1(kd_mask_diagonal="no"), TypeError, r"^kd_mask_diagonal .*got 'no'"),
    case("stage-1 max_length -1", stage1(max_length=-1), ValueError, r"^max_length must be >= 1 or None, got -1"),
    case("stage-1 max_length True", stage1(max_length=True), TypeError, r"^max_length .*got True"),
    case("use_qlora as a string", stage1(use_qlora="yes"), TypeError, r"^use_qlora must be True or False, got 'yes'"),
    case("kd_direction None", stage1(kd_direction=None), ValueError, r"^kd_direction=None; expected one of"),
]


@pytest.mark.parametrize("call, error, match", TRAINING_CASES)
def test_training_configs_refuse_bad_values_by_name(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


def test_good_non_default_values_pass(tmp_path):
    args = stage2(false_negative_margin=-0.05, contrastive_temperature=1, num_hard_negatives=None, image_size=None,
                  lora_rank=0, lora_alpha=0.5, lora_dropout=0.0, lora_scope="all")(tmp_path)
    assert (args.false_negative_margin, args.contrastive_temperature, args.lora_rank) == (-0.05, 1, 0)
    assert stage1(kd_temperature=1, max_length=1, kd_mask_diagonal=False)(tmp_path).max_length == 1


def collator(**values):
    from training.mmeb_data import MMEBCollator

    return lambda path: MMEBCollator(processor=None, **values)


COLLATOR_CASES = [
    case("collator image_size True", collator(image_size=True), TypeError, r"^image_size must be an int >= 1 or None, got True"),
    case("collator max_length -1", collator(max_length=-1), ValueError, r"^max_length must be >= 1 or None, got -1"),
    case("collator chunk_size as a string", collator(chunk_size="8"), TypeError, r"^chunk_size .*got '8'"),
    case("collator skip_bad_images as a string", collator(skip_bad_images="no"), TypeError,
         r"^skip_bad_images must be True or False, got 'no'"),
]


@pytest.mark.parametrize("call, error, match", COLLATOR_CASES)
def test_collator_refuses_bad_settings_by_name(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


@pytest.mark.parametrize("dtype", ["float7", "int8", "bf16"])
def test_stage2_script_refuses_an_unknown_weight_dtype_by_name(dtype):
    import runpy

    from tests.conftest import REPO_ROOT

    script = runpy.run_path(str(REPO_ROOT / "examples" / "train_stage2.py"), run_name="unime_train_stage2")
    with pytest.raises(ValueError, match=rf"^dtype='{dtype}'; expected one of \('float32', 'bfloat16', 'float16'\)"):
        script["ScriptArguments"](dataset="pairs.jsonl", dtype=dtype)
    assert script["ScriptArguments"](dataset="pairs.jsonl", dtype="bfloat16").dtype == "bfloat16"
