"""Every config field that changes the maths, at a NON-default value, against a loop written here.

A trainer that ignored a setting (used the default instead) would pass a test run at the defaults;
each test below sets values the defaults cannot produce and first checks that the defaults would
give a different number, so the setting is shown to matter. The expected losses come from plain
Python loops over the similarity matrix (no call into `training.losses`).

At the first optimizer step the LoRA B matrices are zero, so the adapted model is exactly the base
model and the logged step-1 loss is the loss of embeddings computed here with the untouched model.
"""

import json
import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from training.distillation import DistillationConfig, UniMEDistillationTrainer
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.lora import add_lora, merge_lora
from training.mmeb_data import MMEBCollator, load_mmeb_train
from training.demo.tiny_models import tiny_unime

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", save_merged_model=False, disable_tqdm=True,
              train_sampling_strategy="sequential", logging_steps=1, seed=0, dataloader_num_workers=0)


# ----------------------------------------------------------------------------- loop references


def _log_softmax(values):
    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]


def _similarities(a, b):
    a, b = a.double().tolist(), b.double().tolist()
    return [[sum(x * y for x, y in zip(row_a, row_b)) for row_b in b] for row_a in a]


def kd_loop(student, teacher, temperature, direction, mask_diagonal):
    """Mean over rows of KL between the row softmaxes of S/tau (DESIGN.md §4.1), one row at a time."""
    s, t = _similarities(student, student), _similarities(teacher, teacher)
    n = len(s)
    total = 0.0
    for i in range(n):
        columns = [j for j in range(n) if not (mask_diagonal and j == i)]
        log_ps = _log_softmax([s[i][j] / temperature for j in columns])
        log_pt = _log_softmax([t[i][j] / temperature for j in columns])
        if direction == "forward":  # KL(P_t || P_s)
            total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
        else:  # KL(P_s || P_t)
            total += sum(math.exp(ls) * (ls - lt) for lt, ls in zip(log_pt, log_ps))
    return total / n


def infonce_loop(query, target, temperature, k, margin):
    """Paper Eq. 3-4 with the false-negative filter, one row at a time (DESIGN.md §4.2)."""
    s = _similarities(query, target)
    total = 0.0
    for i, row in enumerate(s):
        negatives = sorted((row[j] for j in range(len(row))
                            if j != i and (margin is None or row[j] <= row[i] + margin)), reverse=True)
        if k is not None and negatives:
            negatives = [negatives[slot % len(negatives)] for slot in range(k)]  # repeat when short of k
        logits = [row[i] / temperature] + [value / temperature for value in negatives]
        total += -_log_softmax(logits)[0]
    return total / len(s)


def step_one_log(trainer):
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry][0]


# ----------------------------------------------------------------------------- stage 1


SENTENCES = ["a dog runs in the park", "a puppy plays on grass", "two men play chess", "people sit at a table",
             "the sky is blue today", "clouds gather over the sea", "a red car on the road", "a truck parks"]


@pytest.fixture(scope="module")
def kd_rows():
    generator = torch.Generator().manual_seed(3)
    teacher = F.normalize(torch.randn(len(SENTENCES), 16, generator=generator), dim=-1)
    return [{"sent0": SENTENCES[i], "sent1": SENTENCES[i + 1], "teacher_sent0": teacher[i].tolist(),
             "teacher_sent1": teacher[i + 1].tolist()} for i in range(0, len(SENTENCES), 2)]


KD_SETTINGS = [
    pytest.param(0.07, "forward", False, id="tau0.07-forward-unmasked"),
    pytest.param(0.5, "reverse", False, id="tau0.5-reverse-unmasked"),
    pytest.param(0.2, "reverse", True, id="tau0.2-reverse-masked"),
]


@pytest.mark.parametrize("temperature, direction, mask_diagonal", KD_SETTINGS)
def test_stage1_step_loss_uses_kd_temperature_direction_and_mask(kd_rows, tmp_path, temperature, direction,
                                                                 mask_diagonal):
    model, processor = tiny_unime("qwen2_vl")
    texts = [row[column] for row in kd_rows for column in ("sent0", "sent1")]
    teacher = torch.tensor([row[f"teacher_{column}"] for row in kd_rows for column in ("sent0", "sent1")])
    with torch.no_grad():
        student = model(**processor(text=texts)).embeddings
    expected = kd_loop(student, teacher, temperature, direction, mask_diagonal)
    assert abs(expected - kd_loop(student, teacher, 0.02, "forward", True)) > 1e-3  # the setting matters

    args = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(kd_rows),
                              kd_temperature=temperature, kd_direction=direction, kd_mask_diagonal=mask_diagonal,
                              **COMMON)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor,
                                       train_dataset=datasets.Dataset.from_list(kd_rows))
    log = step_one_log(trainer)
    assert log["loss"] == pytest.approx(expected, rel=1e-4)
    assert log["kd_rows"] == len(texts)
    off_diagonal = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if i != j]
    s = _similarities(student, student)
    assert log["kd_student_mean_similarity"] == pytest.approx(
        sum(s[i][j] for i, j in off_diagonal) / len(off_diagonal), abs=1e-5)


# ----------------------------------------------------------------------------- stage 2


COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (235, 200, 20), (130, 40, 170), (245, 120, 190),
           (120, 120, 120), (130, 75, 25)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    records = []
    for index, colour in enumerate(COLOURS):
        image = Image.new("RGB", (56, 56), tuple(int(c) for c in rng.integers(0, 60, 3)))
        ImageDraw.Draw(image).ellipse([8 + index, 10, 40, 44 - index], fill=colour)
        image.save(root / f"{index}.png")
        records.append({"qry": "<|image_1|> Represent the given image for classification.",
                        "qry_image_path": f"{index}.png", "pos_text": f"shape number {index}", "pos_image_path": ""})
    (root / "pairs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return root, load_mmeb_train(root / "pairs.jsonl")


def stage2_embeddings(model, processor, root, rows):
    batch = MMEBCollator(processor, image_root=root, image_size=56)(rows)
    with torch.no_grad():
        return model(**batch["query"]).embeddings, model(**batch["target"]).embeddings


STAGE2_SETTINGS = [
    # (tau, k, beta, GradCache chunk): none of them the defaults (0.02, 8, 0.1, None)
    pytest.param(0.05, 3, 0.002, None, id="tau0.05-k3-beta0.002"),
    pytest.param(0.05, 3, 0.002, 3, id="tau0.05-k3-beta0.002-chunk3"),
    pytest.param(0.1, 2, -0.001, 5, id="tau0.1-k2-beta-0.001-chunk5"),
    pytest.param(0.03, None, None, None, id="tau0.03-plain-infonce"),
    pytest.param(0.03, 4, None, 2, id="tau0.03-k4-no-filter-chunk2"),
]


@pytest.mark.parametrize("temperature, k, margin, chunk", STAGE2_SETTINGS)
def test_stage2_step_loss_uses_temperature_k_margin_and_chunks(pairs, tmp_path, temperature, k, margin, chunk):
    root, train = pairs
    model, processor = tiny_unime("qwen2_vl")
    query, target = stage2_embeddings(model, processor, root, [train[i] for i in range(len(train))])
    expected = infonce_loop(query, target, temperature, k, margin)
    assert abs(expected - infonce_loop(query, target, 0.02, 8, 0.1)) > 1e-3  # the settings matter

    args = HardNegativeConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=len(train),
                              image_size=56, contrastive_temperature=temperature, num_hard_negatives=k,
                              false_negative_margin=margin, gradcache_chunk_size=chunk, **COMMON)
    collator = MMEBCollator(processor, image_root=root, image_size=56, chunk_size=chunk)
    if chunk is not None:  # the collator really splits the batch into chunks of `chunk` items
        sizes = [int(part["input_ids"].shape[0]) for part in collator([train[i] for i in range(len(train))])["query"]]
        assert sizes == [min(chunk, len(train) - start) for start in range(0, len(train), chunk)]
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor, train_dataset=train, data_collator=collator)
    log = step_one_log(trainer)
    assert log["loss"] == pytest.approx(expected, rel=1e-4)
    s = _similarities(query, target)
    n = len(s)
    filtered = sum(1 for i in range(n) for j in range(n) if j != i and margin is not None and s[i][j] > s[i][i] + margin)
    assert log["false_negative_fraction"] == pytest.approx(filtered / (n * (n - 1)), abs=1e-6)


def test_stage2_default_collator_takes_image_size_chunk_and_max_length_from_the_config(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    args = HardNegativeConfig(output_dir=str(tmp_path), image_size=84, gradcache_chunk_size=5, max_length=7, **COMMON)
    collator = UniMEHardNegativeTrainer(model, args, processor=processor).data_collator
    assert (collator.image_size, collator.chunk_size, collator.max_length) == (84, 5, 7)


# ----------------------------------------------------------------------------- LoRA settings


def adapted_layers(peft_model):
    return sorted(name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                  if hasattr(module, "lora_A") and "default" in module.lora_A)


def test_lora_rank_alpha_targets_and_scope_reach_the_model(tmp_path):
    model, processor = tiny_unime("llava")  # a CLIP tower with its own q_proj / v_proj
    names = [name for name, _ in model.named_modules()]
    language = sorted(n for n in names if ".language_model." in f".{n}" and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj"))
    # scope "all": the named layers of the language model, and every linear layer of the CLIP tower and projector.
    vision = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." not in f".{n}")
    everywhere = sorted(language + vision)
    assert len(language) == 4  # 2 decoder layers x (q, v)
    assert {n.rsplit(".", 1)[-1] for n in vision} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
                                                       "linear_1", "linear_2"}

    args = HardNegativeConfig(output_dir=str(tmp_path), lora_rank=4, lora_alpha=12, lora_dropout=0.0,
                              lora_target_modules=["q_proj", "v_proj"], **COMMON)
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor)
    assert adapted_layers(trainer.model) == language
    layer = dict(trainer.model.named_modules())["base_model.model." + language[0]]
    assert layer.lora_A["default"].weight.shape[0] == 4 and layer.scaling["default"] == pytest.approx(12 / 4)

    # The adapted layer computes W x + (alpha / r) B A x: check with a non-zero B.
    torch.manual_seed(0)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features)
    base, a, b = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + 3.0 * (x @ a.T) @ b.T)

    wide = UniMEHardNegativeTrainer(tiny_unime("llava")[0], HardNegativeConfig(
        output_dir=str(tmp_path), lora_rank=2, lora_target_modules=["q_proj", "v_proj"], lora_scope="all", **COMMON),
        processor=processor)
    assert adapted_layers(wide.model) == everywhere
    default_alpha = dict(wide.model.named_modules())["base_model.model." + everywhere[0]]
    assert default_alpha.scaling["default"] == pytest.approx(2.0)  # alpha None -> 2 x rank


def test_lora_rank_zero_trains_the_model_as_given(tmp_path):
    model, processor = tiny_unime("qwen2_vl")
    trainer = UniMEHardNegativeTrainer(model, HardNegativeConfig(output_dir=str(tmp_path), lora_rank=0, **COMMON),
                                       processor=processor)
    assert trainer.model is model and adapted_layers(trainer.model) == []


def test_lora_dropout_setting_reaches_the_adapters():
    model, _ = tiny_unime("qwen2_vl")
    peft_model = add_lora(model, rank=2, dropout=0.3, target_modules=("o_proj",))
    dropouts = {module.lora_dropout["default"].p for module in peft_model.modules() if hasattr(module, "lora_dropout")
                and "default" in module.lora_dropout}
    assert dropouts == {0.3}


def test_merge_lora_gives_w_plus_scaled_ba():
    model, _ = tiny_unime("qwen2_vl")
    peft_model = add_lora(model, rank=3, alpha=5, dropout=0.0, target_modules=("down_proj",))
    torch.manual_seed(1)
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            expected[name.removeprefix("base_model.model.")] = module.base_layer.weight.detach() + (5 / 3) * b @ a
    assert len(expected) == 2
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "UniMEModel"
    weights = dict(merged.named_modules())
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name].weight.detach(), weight)
    assert merge_lora(merged) is merged  # no adapters: returned as is


# ----------------------------------------------------------------------------- model and encode settings


def last_token_states(model, processor, prompts):
    """Final hidden state of each prompt's last token, one prompt at a time (no padding involved)."""
    states = []
    with torch.no_grad():
        for prompt in prompts:
            ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
            states.append(model(input_ids=ids, output_last_hidden_state=True).last_hidden_state[0, -1])
    return torch.stack(states)


def test_normalize_off_and_encode_options_against_hidden_states():
    model, processor = tiny_unime("qwen2_vl")
    model.config.normalize = False
    texts = ["a dog", "three small birds on a wire", "rain"]
    prompts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               f"{text}\nSummary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n" for text in texts]
    raw = last_token_states(model, processor, prompts)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)  # the setting matters
    unnormalised = model.encode(texts, processor=processor, batch_size=2, normalize_embeddings=False)
    torch.testing.assert_close(unnormalised, raw, rtol=1e-4, atol=1e-5)
    # normalize_embeddings=None (the default) follows config.normalize, here False: the raw states.
    torch.testing.assert_close(model.encode(texts, processor=processor, batch_size=3), raw, rtol=1e-4, atol=1e-5)
    normalised = model.encode(texts, processor=processor, batch_size=1, normalize_embeddings=True)
    torch.testing.assert_close(normalised, raw / raw.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-5)
    as_numpy = model.encode(texts, processor=processor, batch_size=3, convert_to_tensor=False,
                            normalize_embeddings=True)
    np.testing.assert_allclose(as_numpy, normalised.numpy(), rtol=1e-4, atol=1e-5)


def test_encode_instruction_and_prompt_style_reach_the_prompt():
    model, processor = tiny_unime("llava_next")
    raw = last_token_states(model, processor, ["Find a caption. a dog", "a dog"])
    expected = raw / raw.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.encode(["a dog"], processor=processor, instruction="Find a caption.")[0],
                               expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.encode("a dog", processor=processor, prompt_style="instruction"),
                               expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, vision_layers", [
    ("qwen2_vl", {"qkv", "proj", "fc1", "fc2", "0", "2"}),        # Qwen2-VL tower and merger MLP
    ("qwen2_5_vl", {"qkv", "proj", "gate_proj", "up_proj", "down_proj", "0", "2"}),
])
def test_lora_scope_all_reaches_the_qwen_vision_towers(family, vision_layers):
    """Qwen vision towers name their layers `qkv`, `proj`, `fc1`...: scope "all" adapts them too (it used to
    match only names shared with the language model, which no Qwen tower layer has)."""
    model, _ = tiny_unime(family)
    peft_model = add_lora(model, rank=2, target_modules=("q_proj",), scope="all")
    adapted = adapted_layers(peft_model)
    visual = [name for name in adapted if name.startswith("backbone.visual.")]
    assert {name.rsplit(".", 1)[-1] for name in visual} == vision_layers
    assert not [name for name in visual if "patch_embed" in name]  # a Conv3d, left as it is
    language = [name for name in adapted if not name.startswith("backbone.visual.")]
    assert language and all(".language_model." in name and name.endswith(".q_proj") for name in language)
