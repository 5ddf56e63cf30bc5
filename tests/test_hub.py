"""push_to_hub of UniME checkpoints against the offline fake Hub (tests/fake_hub.py): the files uploaded, the model
card on the Hub, loading back in a fresh process with trust_remote_code, the merged push of a LoRA-trained model,
and a clear error that leaves local files untouched when the Hub cannot be reached."""

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import utils as hub_utils
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from transformers import Trainer, TrainingArguments

from modeling_unime.model_card import GENERATED_MARKER
from tests.fake_hub import fake_hub, point_hub_clients_at  # noqa: F401  (fake_hub is the fixture)
from tests.test_fake_hub import closed_loopback_port
from training.publishing import push_merged_model
from training.lora import add_lora
from training.publishing import record_eval_results, record_training_stage
from training.demo.tiny_models import tiny_unime

REPO = "user/unime-tiny"
REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = {"modeling_unime.py"}  # the package bundled into one file (modeling_unime/bundle.py)
MODEL_FILES = {"README.md", "config.json", "model.safetensors", "modules.json", "config_sentence_transformers.json",
               *CODE_FILES}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
STAGE = {"stage": "distillation", "datasets": ["sentence-transformers/all-nli"], "steps": 12,
         "hyperparameters": {"learning_rate": 0.0005, "global_batch_size": 768}}

LOAD_FROM_HUB = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    for _name in ("modeling_unime", "training"):  # as if this project were not installed:
        sys.modules[_name] = None  # an import of it raises ImportError; remote code must not need it
    from huggingface_hub import hf_hub_download
    from transformers import AutoModel, AutoProcessor
    repo_id, image_path, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    for loaded in (model, processor):
        assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
    image = Image.open(image_path).convert("RGB")
    loaded = model.encode(["a dog", image, {"image": image, "text": "what is it?"}], processor=processor)
    # The card's snippet, verbatim from the Hub: its model id is the repo's.
    card = open(hf_hub_download(repo_id, "README.md"), encoding="utf-8").read()
    snippet = next(block for block in card.split("```python")[1:] if "AutoModel" in block).split("```")[0]
    namespace = {}
    exec(snippet, namespace)
    torch.save({"loaded": loaded, "snippet": namespace["embeddings"]}, out)
    """
)


def run_fresh_python(script, args, env, tmp_path):
    """Run `script` in a new interpreter where this project is not importable; return its torch.save'd output."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    (workdir / "script.py").write_text(script)
    out = workdir / "out.pt"
    env = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    # CPU results depend in their last bits on the thread count (reduction order): use this process's.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    result = subprocess.run([sys.executable, "script.py", *map(str, args), str(out)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def snippet_inputs():
    """The inputs of the card's usage snippets."""
    image = Image.new("RGB", (336, 336), "red")
    return ["a red square", image, {"image": image, "text": "What colour is this?"}]


def trained_tiny_model():
    model, processor = tiny_unime("qwen2_vl")
    record_training_stage(model, STAGE, base_model="Qwen/Qwen2-VL-2B-Instruct", license="apache-2.0")
    record_eval_results(model, {"MMEB": {"average": 0.25}})
    return model, processor


def local_files(directory):
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_push_uploads_weights_code_processor_and_card(fake_hub):
    model, processor = trained_tiny_model()

    model.push_to_hub(REPO)
    card_after_model_push = fake_hub.files(REPO)["README.md"]
    processor.push_to_hub(REPO)

    files = fake_hub.files(REPO)
    assert set(files) == MODEL_FILES | PROCESSOR_FILES
    weights = load_safetensors_bytes(files["model.safetensors"])
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    bundle = files["modeling_unime.py"].decode()
    for name in ("configuration_unime", "modeling_unime", "processing_unime", "sentence_transformers_module"):
        assert f"# ---- {name}.py ----" in bundle, name
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {"AutoConfig": "modeling_unime.UniMEConfig",
                                  "AutoModel": "modeling_unime.UniMEModel"}
    assert config["unime_training"]["stages"] == [STAGE]
    processor_auto_map = json.loads(files["processor_config.json"])["auto_map"]
    assert processor_auto_map == {"AutoProcessor": "modeling_unime.UniMEProcessor"}
    # The processor's push re-uploads the card it found on the Hub: ours, unchanged.
    assert files["README.md"] == card_after_model_push

    card = ModelCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "feature-extraction"
    assert data["tags"] == ["unime", "embeddings", "multimodal", "qwen2_vl", "sentence-transformers"]
    assert data["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert data["datasets"] == ["sentence-transformers/all-nli"]
    assert data["license"] == "apache-2.0"
    [result] = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("MMEB", "average", 0.25)
    assert card.data.model_name == "unime-tiny"
    assert f'model_id = "{REPO}"' in card.text and f'SentenceTransformer("{REPO}"' in card.text
    assert GENERATED_MARKER in card.text


def test_load_back_from_the_hub_in_a_fresh_process_gives_identical_embeddings(fake_hub, tmp_path, images):
    model, processor = tiny_unime("qwen2_vl")
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    image = Image.open(image_path).convert("RGB")
    expected = model.encode(["a dog", image, {"image": image, "text": "what is it?"}], processor=processor)
    expected_snippet = model.encode(snippet_inputs(), processor=processor)

    # Empty caches: code, weights and processor files can only come from the fake Hub.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "fresh_cache"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = run_fresh_python(LOAD_FROM_HUB, [REPO, image_path], env, tmp_path)

    assert torch.equal(out["loaded"], expected)
    assert torch.equal(out["snippet"], expected_snippet)


def test_card_order_of_pushes_and_hand_written_cards(fake_hub, tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    # Processor first: transformers puts its placeholder card on the Hub; the model's push replaces it.
    processor.push_to_hub("user/processor-first")
    assert GENERATED_MARKER not in fake_hub.files("user/processor-first")["README.md"].decode()
    model.push_to_hub("user/processor-first")
    assert GENERATED_MARKER in fake_hub.files("user/processor-first")["README.md"].decode()

    # A card a person wrote on the Hub is kept; tags passed to push_to_hub are added to it.
    api = HfApi()
    api.create_repo("user/hand-written")
    api.upload_file(path_or_fileobj=b"# My own card\n", path_in_repo="README.md", repo_id="user/hand-written")
    model.push_to_hub("user/hand-written")
    assert fake_hub.files("user/hand-written")["README.md"] == b"# My own card\n"
    model.push_to_hub("user/hand-written", tags=["extra-tag"])
    card = ModelCard(fake_hub.files("user/hand-written")["README.md"].decode())
    assert card.data.tags == ["extra-tag"] and card.text.strip() == "# My own card"


def test_save_pretrained_with_push_to_hub(fake_hub, tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path / "saved-and-pushed"
    model.save_pretrained(checkpoint, push_to_hub=True, commit_message="first version")

    files = fake_hub.files("user/saved-and-pushed")
    assert set(files) == MODEL_FILES
    assert fake_hub.commits("user/saved-and-pushed")[0].title == "first version"
    # The local card keeps the placeholder id; the pushed one names the repo.
    assert 'model_id = "path/to/this/checkpoint"' in (checkpoint / "README.md").read_text()
    assert 'model_id = "user/saved-and-pushed"' in files["README.md"].decode()
    assert all(files[name] == (checkpoint / name).read_bytes() for name in MODEL_FILES - {"README.md"})


def test_push_merged_model_uploads_merged_weights_and_training_card(fake_hub):
    model, processor = trained_tiny_model()
    base_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora_model = add_lora(model, rank=4)
    torch.manual_seed(1)
    for name, parameter in lora_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters change the weights
            parameter.data.normal_(std=0.5)
    expected = copy.deepcopy(lora_model).merge_and_unload().state_dict()
    adapters_before = {name: tensor.clone() for name, tensor in lora_model.state_dict().items()}

    push_merged_model(lora_model, processor, "user/merged", eval_results={"retrieval": {"t2i_R@1": 0.5}})

    files = fake_hub.files("user/merged")
    assert set(files) == MODEL_FILES | PROCESSOR_FILES
    weights = load_safetensors_bytes(files["model.safetensors"])
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    assert weights.keys() == base_weights.keys()
    assert not all(torch.equal(weights[name], tensor) for name, tensor in base_weights.items())
    # The adapters are unmerged again after the save, so training could go on (W + BA - BA: float rounding only).
    after = lora_model.state_dict()
    assert max((after[name] - tensor).abs().max().item() for name, tensor in adapters_before.items()) < 1e-6
    card = ModelCard(files["README.md"].decode())
    assert {(r.dataset_name, r.metric_type) for r in card.data.eval_results} == {("MMEB", "average"),
                                                                                ("retrieval", "t2i_R@1")}
    assert "| learning_rate | 0.0005 |" in card.text and "Stage 1: textual discriminative" in card.text


def test_push_merged_model_takes_repo_and_processor_from_the_trainer(fake_hub, tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), hub_model_id="user/from-trainer", report_to=[])
    trainer = Trainer(model=model, args=args, processing_class=processor)

    commit = push_merged_model(trainer, commit_message="end of training")

    assert set(fake_hub.files("user/from-trainer")) == MODEL_FILES | PROCESSOR_FILES
    assert fake_hub.commits("user/from-trainer")[0].sha == commit.oid
    assert fake_hub.commits("user/from-trainer")[0].title == "end of training"


def test_unreachable_hub_gives_a_clear_error_and_leaves_local_files_intact(tmp_path, monkeypatch):
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    before = local_files(checkpoint)
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    point_hub_clients_at(endpoint, tmp_path / "home", monkeypatch)
    start = time.monotonic()

    with pytest.raises(ConnectionError, match=rf"could not reach the Hugging Face Hub at {endpoint} to push 'user/x'"):
        model.push_to_hub("user/x")
    with pytest.raises(ConnectionError, match="Nothing was pushed and no local file was changed"):
        model.save_pretrained(checkpoint, push_to_hub=True, repo_id="user/x")
    with pytest.raises(ConnectionError, match=endpoint):
        push_merged_model(add_lora(model, rank=4), processor, "user/x")
    # The processor's push is transformers' own: its error is the HTTP client's.
    with pytest.raises(hub_utils.httpx.ConnectError):
        processor.push_to_hub("user/x")

    assert time.monotonic() - start < 10
    assert local_files(checkpoint) == before


def test_trainer_push_to_hub_uploads_the_merged_model_not_adapters(fake_hub, tmp_path):
    from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer

    model, processor = tiny_unime("qwen2_vl")
    args = HardNegativeConfig(output_dir=str(tmp_path / "run"), hub_model_id="user/stage2", push_to_hub=True,
                              report_to=[], lora_rank=4, use_cpu=True)
    trainer = UniMEHardNegativeTrainer(model=model, args=args, processor=processor)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)
    expected = copy.deepcopy(trainer.model).merge_and_unload().state_dict()

    trainer.push_to_hub()

    files = fake_hub.files("user/stage2")
    assert set(files) == MODEL_FILES | PROCESSOR_FILES  # no adapter_config.json / adapter weights
    weights = load_safetensors_bytes(files["model.safetensors"])
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
