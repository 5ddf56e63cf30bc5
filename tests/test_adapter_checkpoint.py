"""LoRA checkpoints written during training find their base model from any directory and on another machine
(issue 13, item 6): the record they store, the order of the places tried, and a load on a Hub base model.
The example scripts' path (train, copy the run elsewhere, evaluate) is in test_examples_workflow.py."""

import copy
import json

import pytest
import torch
from transformers import AutoModel

from modeling_unime.adapter_checkpoint import adapter_checkpoint_folder, base_model_record, resolve_adapter_base
from tests.fake_hub import fake_hub  # noqa: F401  (the fixture)
from training.demo.tiny_models import tiny_unime


def write_checkpoint(folder, record):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"model_type": "unime", "unime_adapter_base": record}))
    return folder


def test_record_of_a_local_base_a_hub_base_and_no_base(tmp_path):
    (tmp_path / "project" / "s1" / "merged").mkdir(parents=True)
    checkpoint = tmp_path / "project" / "runs" / "s2" / "checkpoint-4"
    assert base_model_record(str(tmp_path / "project" / "s1" / "merged"), checkpoint) == {
        "name_or_path": f"{tmp_path}/project/s1/merged", "relative_path": "../../../s1/merged"}
    assert base_model_record("Qwen/Qwen2-VL-2B-Instruct", checkpoint) == {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}
    assert base_model_record("", checkpoint) is None and base_model_record(None, checkpoint) is None


def test_base_is_found_where_recorded_then_relative_to_the_checkpoint_then_refused(tmp_path):
    machine = tmp_path / "machine1"
    (machine / "s1" / "merged").mkdir(parents=True)
    record = {"name_or_path": str(machine / "s1" / "merged"), "relative_path": "../../s1/merged"}
    checkpoint = write_checkpoint(machine / "s2" / "checkpoint-2", record)
    assert adapter_checkpoint_folder(checkpoint) == checkpoint
    assert resolve_adapter_base(checkpoint) == str(machine / "s1" / "merged")

    # The whole tree copied to another machine (here: another root): the recorded path is gone.
    machine.rename(tmp_path / "machine2")
    moved = tmp_path / "machine2" / "s2" / "checkpoint-2"
    assert resolve_adapter_base(moved) == str(tmp_path / "machine2" / "s1" / "merged")
    assert resolve_adapter_base(moved, "/data/my-base") == "/data/my-base"

    (tmp_path / "machine2" / "s1" / "merged").rmdir()
    with pytest.raises(FileNotFoundError) as error:
        resolve_adapter_base(moved)
    assert str(error.value) == (
        f"the LoRA checkpoint '{moved}' holds adapters for the base model saved at '{tmp_path}/machine1/s1/merged', "
        f"which is no longer there nor at '{tmp_path}/machine2/s1/merged' (the same place relative to the "
        "checkpoint); copy the base model there, or pass base_model_name_or_path=<its folder or Hub id> to "
        "from_pretrained")


def test_hub_base_malformed_record_and_folders_that_are_not_adapter_checkpoints(tmp_path):
    hub = write_checkpoint(tmp_path / "hub", {"name_or_path": "me/unime-stage1"})
    assert resolve_adapter_base(hub) == "me/unime-stage1"
    bad = write_checkpoint(tmp_path / "bad", ["not", "a", "record"])
    with pytest.raises(ValueError, match=r"bad/config.json'.*unime_adapter_base must be an object"):
        resolve_adapter_base(bad)
    full = write_checkpoint(tmp_path / "full", {"name_or_path": "me/x"})
    (full / "model.safetensors").write_bytes(b"")
    plain_peft = tmp_path / "peft"
    plain_peft.mkdir()
    (plain_peft / "adapter_config.json").write_text("{}")
    assert [adapter_checkpoint_folder(folder) for folder in (full, plain_peft, tmp_path / "none", "me/x")] == [None] * 4


def test_lora_checkpoint_of_a_hub_model_loads_with_automodel(fake_hub, tmp_path):
    """A run on a base model from the Hub: the checkpoint names the Hub id, loads anywhere, and
    `base_model_name_or_path` is refused on a complete model."""
    from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer

    model, processor = tiny_unime("qwen2_vl")
    model.push_to_hub("user/base")
    processor.push_to_hub("user/base")
    base = AutoModel.from_pretrained("user/base", trust_remote_code=True)
    args = HardNegativeConfig(output_dir=str(tmp_path / "run"), report_to=[], lora_rank=4, use_cpu=True)
    trainer = UniMEHardNegativeTrainer(model=base, args=args, processor=processor)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)
    trainer.save_model(str(tmp_path / "adapters"))
    record = json.loads((tmp_path / "adapters" / "config.json").read_text())["unime_adapter_base"]
    assert record == {"name_or_path": "user/base"}

    loaded = AutoModel.from_pretrained(str(tmp_path / "adapters"), trust_remote_code=True)
    merged = copy.deepcopy(trainer.model).merge_and_unload().eval()
    texts = ["a dog on a beach", "two cats"]
    expected = merged.encode(texts, processor=processor)
    assert not torch.allclose(expected, model.encode(texts, processor=processor), atol=1e-3)  # the adapters matter
    torch.testing.assert_close(loaded.encode(texts), expected, atol=1e-5, rtol=0)  # its own processor, from the folder
    model.save_pretrained(tmp_path / "copy-of-base")  # the base model kept elsewhere, named by the user
    elsewhere = AutoModel.from_pretrained(str(tmp_path / "adapters"), trust_remote_code=True,
                                          base_model_name_or_path=str(tmp_path / "copy-of-base"))
    assert elsewhere.name_or_path == str(tmp_path / "copy-of-base")
    torch.testing.assert_close(elsewhere.encode(texts), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="base_model_name_or_path is for LoRA checkpoints"):
        AutoModel.from_pretrained("user/base", trust_remote_code=True, base_model_name_or_path="x")
