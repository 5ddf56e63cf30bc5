"""Model cards of UniME checkpoints (modeling_unime/model_card.py) and the training records they render
(training/publishing.py): metadata, sections, the usage snippet run against a saved checkpoint, README policy."""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from modeling_unime.model_card import GENERATED_MARKER, LOCAL_MODEL_ID, build_model_card, write_model_card
from tests.test_hub import run_fresh_python, snippet_inputs
from training.distillation import DistillationConfig
from training.publishing import (
    recipe_hyperparameters,
    record_eval_results,
    record_training_stage,
    stage_record,
)
from training.demo.tiny_models import tiny_unime

RUN_SNIPPET = """
import sys, torch
for _name in ("modeling_unime", "training"):  # as if this project were not installed:
    sys.modules[_name] = None  # an import of it raises ImportError; remote code must not need it
namespace = {}
exec(open(sys.argv[1], encoding="utf-8").read(), namespace)
torch.save(torch.as_tensor(namespace["embeddings"]), sys.argv[2])  # sentence-transformers returns numpy
"""


def python_blocks(card_text):
    return [block.split("```")[0] for block in card_text.split("```python")[1:]]


def distillation_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], learning_rate=5e-4, per_device_train_batch_size=6,
                    gradient_accumulation_steps=4, num_train_epochs=2, seed=3, lora_rank=32, kd_temperature=0.02)
    return DistillationConfig(**{**settings, **overrides})


def test_usage_snippet_of_a_saved_card_runs_and_matches_encode(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    [snippet] = [block for block in python_blocks((checkpoint / "README.md").read_text()) if "AutoModel" in block]
    assert f'"{LOCAL_MODEL_ID}"' in snippet
    snippet_file = tmp_path / "snippet.py"
    snippet_file.write_text(snippet.replace(LOCAL_MODEL_ID, str(checkpoint)))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    embeddings = run_fresh_python(RUN_SNIPPET, [snippet_file], env, tmp_path)

    assert torch.equal(embeddings, model.encode(snippet_inputs(), processor=processor))


def test_card_metadata_and_sections_from_training_and_eval_records(tmp_path):
    model, _ = tiny_unime("llava_onevision")
    args = distillation_args(tmp_path)
    stage = stage_record("distillation", args, datasets=["sentence-transformers/all-nli", "/data/local.jsonl"],
                         steps=120, epochs=2.0, num_examples=1440, teacher="nvidia/NV-Embed-v2")
    record_training_stage(model, stage, base_model="llava-hf/llava-onevision-qwen2-7b-ov-hf", license="apache-2.0")
    second = {"stage": "hard_negative", "datasets": ["TIGER-Lab/MMEB-train"], "steps": 1000}
    record_training_stage(model, second, base_model="ignored/second-base")
    record_eval_results(model, {"MMEB": {"average": 0.6625, "IND": 0.7}, "compositional": {"replace": 0.5}})

    card = build_model_card(model.config, model_id="org/unime-ov")

    assert card.data.to_dict() == {
        "base_model": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "datasets": ["sentence-transformers/all-nli", "TIGER-Lab/MMEB-train"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "feature-extraction",
        "tags": ["unime", "embeddings", "multimodal", "llava_onevision", "sentence-transformers"],
        "model-index": [{"name": "unime-ov", "results": [
            {"task": {"type": "feature-extraction", "name": task}, "dataset": {"name": task, "type": task},
             "metrics": [{"type": metric, "value": value, "name": metric} for metric, value in metrics]}
            for task, metrics in [("MMEB", [("average", 0.6625), ("IND", 0.7)]),
                                  ("compositional", [("replace", 0.5)])]]}],
    }
    text = card.text
    assert text.lstrip().startswith(GENERATED_MARKER)
    assert "# unime-ov" in text and "(LLaVA-OneVision)" in text
    assert "### 1. Stage 1: textual discriminative knowledge distillation (`distillation`)" in text
    assert "### 2. Stage 2: hard-negative-enhanced instruction tuning (`hard_negative`)" in text
    assert ("- **Data:** [sentence-transformers/all-nli](https://huggingface.co/datasets/sentence-transformers/all-nli)"
            ", `/data/local.jsonl`") in text
    for line in ["- **Teacher:** nvidia/NV-Embed-v2", "- **Training examples:** 1440", "- **Optimizer steps:** 120",
                 "| learning_rate | 0.0005 |", "| kd_temperature | 0.02 |", "| lora_rank | 32 |",
                 "| global_batch_size | 24 |", "| lr_scheduler_type | linear |",
                 "| average | 66.25 |", "| IND | 70.00 |", "| replace | 50.00 |"]:
        assert line in text, line
    assert 'model_id = "org/unime-ov"' in text
    # The card survives a round trip through config.json: the records are plain JSON data.
    model.save_pretrained(tmp_path / "saved")
    assert ModelCard.load(tmp_path / "saved" / "README.md").data.base_model == card.data.base_model


def test_card_without_records_has_no_unknown_metadata():
    model, _ = tiny_unime("llava")
    data = build_model_card(model.config).data.to_dict()
    assert data == {"library_name": "transformers", "pipeline_tag": "feature-extraction",
                    "tags": ["unime", "embeddings", "multimodal", "llava", "sentence-transformers"]}
    text = build_model_card(model.config).text
    assert "records no UniME training" in text and "## Evaluation" not in text


def test_local_base_model_paths_stay_out_of_the_metadata(tmp_path):
    model, _ = tiny_unime("qwen2_vl")
    model.config.backbone_config._name_or_path = str(tmp_path)  # from_backbone on a local directory
    assert "base_model" not in build_model_card(model.config).data.to_dict()
    model.config.backbone_config._name_or_path = "Qwen/Qwen2-VL-7B-Instruct"
    assert build_model_card(model.config).data.base_model == "Qwen/Qwen2-VL-7B-Instruct"


def test_hand_written_readme_is_kept_and_generated_one_is_refreshed(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# My notes\n")
    model.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# My notes\n"

    generated = tmp_path / "generated"
    model.save_pretrained(generated)
    assert "records no UniME training" in (generated / "README.md").read_text()
    record_training_stage(model, {"stage": "distillation", "steps": 7})
    model.save_pretrained(generated)
    assert "- **Optimizer steps:** 7" in (generated / "README.md").read_text()
    assert write_model_card(model.config, mine) is None


def test_bad_records_raise_naming_the_field(tmp_path):
    model, _ = tiny_unime("qwen2_vl")
    model.config.unime_training = [{"stage": "distillation"}]
    with pytest.raises(ValueError, match=r"config.unime_training must be a dict"):
        build_model_card(model.config)
    model.config.unime_training = {"stages": [{"steps": 3}]}
    with pytest.raises(ValueError, match=r"\['stages'\]\[0\] must be a dict with a 'stage' name"):
        build_model_card(model.config)
    model.config.unime_training = None
    with pytest.raises(ValueError, match=r"results\['MMEB'\]\['average'\] must be a number"):
        record_eval_results(model, {"MMEB": {"average": "high"}})
    with pytest.raises(ValueError, match="datasets must be a list"):
        stage_record("distillation", distillation_args(tmp_path), datasets="sentence-transformers/all-nli")
    with pytest.raises(TypeError, match=r"record\.teacher: Image is not JSON data"):
        record_training_stage(model, {"stage": "distillation", "teacher": Image.new("RGB", (1, 1))})


def test_recipe_hyperparameters_pick_the_recipe_and_the_unime_fields(tmp_path):
    hyperparameters = recipe_hyperparameters(distillation_args(tmp_path))
    assert json.loads(json.dumps(hyperparameters)) == hyperparameters
    assert hyperparameters["global_batch_size"] == 6 * 4 * 1
    assert hyperparameters["world_size"] == 1
    expected_unime_fields = {"lora_rank": 32, "kd_temperature": 0.02, "kd_direction": "forward", "lora_alpha": None}
    assert expected_unime_fields.items() <= hyperparameters.items()
    assert {"save_merged_model", "remove_unused_columns", "output_dir", "logging_steps"}.isdisjoint(hyperparameters)
