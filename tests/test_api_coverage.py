"""Every public name in docs/api.md is exercised by a test; the few that had no test get one here.

The meta-test parses docs/api.md (inline code, outside code blocks), keeps the names that are
functions, methods or classes of this project, and requires each to appear in tests/: a function or
method as a call `name(`, a class by name.
"""

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.evaluation import pessimistic_rank
from training.gradcache import backward_chunks, embed_no_grad, embedding_gradients
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.lora import add_lora
from training.demo.tiny_models import tiny_processor, tiny_unime

REPO_ROOT = Path(__file__).resolve().parents[1]
API_MODULES = ("modeling_unime", "training.losses", "training.distributed", "training.distillation",
               "training.hard_negative", "training.trainer_base", "training.data", "training.mmeb_data",
               "training.teacher", "training.lora", "training.gradcache", "training.evaluation",
               "training.eval_suite", "training.callbacks")
OURS = ("modeling_unime", "training")


def _ours(obj):
    return getattr(obj, "__module__", "").startswith(OURS)


def documented_api():
    """`{name: "module" or "Class"}` of the project's callables named in docs/api.md."""
    text = re.sub(r"```.*?```", "", (REPO_ROOT / "docs" / "api.md").read_text(encoding="utf-8"), flags=re.S)
    mentioned = {ident for code in re.findall(r"`([^`]+)`", text)
                 for ident in re.findall(r"(?:^|[\s.(])([A-Za-z_]\w*)(?=\(|$)", code)}
    modules = [importlib.import_module(name) for name in API_MODULES]
    classes = {cls for module in modules for _, obj in vars(module).items() if inspect.isclass(obj) and _ours(obj)
               for cls in obj.__mro__ if _ours(cls)}
    api = {}
    for name in sorted(mentioned):
        owner = next((module.__name__ for module in modules
                      if callable(getattr(module, name, None)) and _ours(getattr(module, name))), None)
        owner = owner or next((cls.__name__ for cls in sorted(classes, key=lambda c: c.__name__)
                               if not name.startswith("_") and callable(vars(cls).get(name))), None)
        if owner:
            api[name] = owner
    return api


def test_every_documented_name_is_exercised_by_a_test():
    api = documented_api()
    # the parser really finds the API (a broken regex would make this test pass vacuously)
    assert {"merge_lora", "distillation_loss", "gradcache_step", "evaluate_suite", "format_prompt", "encode",
            "UniMEModel", "HardNegativeStats", "pessimistic_rank"} <= set(api)
    assert len(api) >= 60
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (REPO_ROOT / "tests").rglob("*.py"))
    untested = []
    for name in api:
        pattern = rf"\b{name}\b" if name[0].isupper() else rf"\b{name}\("
        if not re.search(pattern, sources):
            untested.append(f"{api[name]}.{name}")
    assert not untested, f"documented in docs/api.md but never called in tests/: {untested}"


# ----------------------------------------------------------------------------- names that had no test


def test_pessimistic_rank_hand_cases():
    scores = torch.tensor([[0.9, 0.5, 0.9, 0.1],    # positive 0; a tie at 0.9 counts against it
                           [0.2, 0.8, 0.7, 0.3],    # positives 1 and 2: the best (0.8) is first
                           [0.1, 0.4, 0.3, 0.2],    # positive 3 (0.2): 0.4 and 0.3 beat it
                           [0.5, 0.5, 0.5, 0.5]])   # positives 0, 1: two tied negatives count
    positive = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert pessimistic_rank(scores, positive).tolist() == [1, 0, 2, 2]
    assert pessimistic_rank(scores, positive, tie_tolerance=-0.01).tolist() == [0, 0, 2, 0]  # ties now win
    nan_row = torch.tensor([[0.5, float("nan"), 0.1]])
    assert pessimistic_rank(nan_row, torch.tensor([[True, False, False]])).tolist() == [1]


def test_gradcache_parts_give_the_full_graph_gradients():
    """embed_no_grad -> embedding_gradients -> backward_chunks equals autograd over the whole batch."""
    model, processor = tiny_unime("qwen2_vl")
    model = add_lora(model.double(), rank=2, alpha=4, dropout=0.0)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    texts = ["a red ball", "two cats", "rain on a window", "a green field", "the old bridge"]
    targets = ["a ball", "cats", "rain", "a field", "a bridge"]
    chunks = [processor(text=texts[:2]), processor(text=texts[2:])]
    target_chunks = [processor(text=targets[:3]), processor(text=targets[3:])]

    def loss_fn(query, target):  # InfoNCE at tau 0.1, written out
        logits = query @ target.T / 0.1
        return (logits.logsumexp(dim=1) - logits.diagonal()).mean(), "aux"

    def trainable():
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    query = torch.cat([model(**chunk).embeddings for chunk in chunks])
    target = torch.cat([model(**chunk).embeddings for chunk in target_chunks])
    reference_loss, _ = loss_fn(query, target)
    (0.5 * reference_loss).backward()
    reference = {name: p.grad.clone() for name, p in trainable().items()}
    model.zero_grad()

    query, query_states = embed_no_grad(model, chunks)
    target, target_states = embed_no_grad(model, target_chunks)
    assert query.shape == (5, 32) and not query.requires_grad and len(query_states) == 2
    loss, aux, query_grad, target_grad = embedding_gradients(loss_fn, query, target, loss_scale=0.5)
    assert aux == "aux" and query_grad.shape == (5, 32)
    torch.testing.assert_close(loss, reference_loss.detach())
    backward_chunks(model, chunks, [query_grad[:2], query_grad[2:]], query_states)
    backward_chunks(model, target_chunks, [target_grad[:3], target_grad[3:]], target_states)
    for name, parameter in trainable().items():
        torch.testing.assert_close(parameter.grad, reference[name], rtol=1e-9, atol=1e-12, msg=name)


def test_unime_model_is_the_wrapped_model(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEHardNegativeTrainer(model, HardNegativeConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                                       processor=processor)
    assert trainer.model is not model and trainer.unime_model() is model
    assert type(trainer.unime_model()).__name__ == "UniMEModel"


@pytest.mark.parametrize("family, class_name", [("qwen2_vl", "Qwen2VLProcessor"), ("llava_next", "LlavaNextProcessor")])
def test_backbone_processor_is_the_backbone_class_without_video(family, class_name):
    processor = tiny_processor(family)
    backbone = processor.backbone_processor()
    assert class_name in [cls.__name__ for cls in type(backbone).__mro__]
    assert getattr(backbone, "video_processor", None) is None
    assert backbone.tokenizer is processor.tokenizer and backbone.image_processor is processor.image_processor
    prompt = processor.format_prompt("a dog")
    assert backbone(text=[prompt], return_tensors="pt")["input_ids"].tolist() == \
        processor(text=["a dog"])["input_ids"].tolist()


def test_validate_image_refuses_what_the_backbone_would():
    qwen, llava = tiny_processor("qwen2_vl"), tiny_processor("llava")
    fine, strip = Image.new("RGB", (400, 2)), Image.new("RGB", (402, 2))  # aspect ratios 200 and 201
    assert qwen.validate_image(fine, "images[3]") is fine
    with pytest.raises(ValueError, match=r"images\[3\]: image of size \(402, 2\) has aspect ratio 201; "
                                         r"qwen2_vl accepts at most 200"):
        qwen.validate_image(strip, "images[3]")
    assert llava.validate_image(strip, "x") is strip  # CLIP resizes any shape


def test_unime_model_output_fields_and_pooling():
    from modeling_unime import UniMEModelOutput

    model, processor = tiny_unime("qwen2_vl")
    batch = processor(text=["a dog", "a much longer caption about a dog"], padding_side="right")
    with torch.no_grad():
        plain = model(**batch)
        full = model(**batch, output_last_hidden_state=True)
    assert isinstance(plain, UniMEModelOutput) and plain.last_hidden_state is None
    assert full.last_hidden_state.shape == (*batch["input_ids"].shape, 32)
    last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token of each row
    pooled = full.last_hidden_state[torch.arange(2), last]
    expected = pooled / pooled.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(plain.embeddings, expected)
    torch.testing.assert_close(plain.embeddings.norm(dim=-1), torch.ones(2))


def test_shared_training_config_defaults(tmp_path):
    from training.distillation import DistillationConfig
    from training.trainer_base import UniMETrainingConfig

    shared = UniMETrainingConfig(output_dir=str(tmp_path))
    assert (shared.lora_rank, shared.lora_alpha, shared.lora_dropout, shared.lora_scope, shared.save_merged_model,
            shared.remove_unused_columns) == (16, None, 0.05, "language_model", True, False)
    assert shared.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert issubclass(DistillationConfig, UniMETrainingConfig) and issubclass(HardNegativeConfig, UniMETrainingConfig)
    assert DistillationConfig(output_dir=str(tmp_path)).lora_rank == 32  # the paper's stage-1 rank
