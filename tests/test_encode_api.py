"""`UniMEModel.encode` as a sentence-transformers user expects it (issue 12 observations 2-4, issue 14's doors).

Expected values come from independent formulas: the backbone's own last hidden state at the last position (left
padding), sentence-transformers' quantisation rules written out with numpy, and the tokenizer's own tokens.
"""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from modeling_unime import UniMEConfig, UniMEModel
from training.demo.tiny_models import tiny_unime

TEXTS = ["a dog runs on the beach", "hello", "two cats sleep", "the quick brown fox"]
TEMPLATE_END = "Summary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny():
    return tiny_unime("qwen2_vl")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, processor = tiny
    directory = tmp_path_factory.mktemp("encode_api_checkpoint")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def raw_pooled_states(model, processor, texts):
    """The backbone's final hidden state at each text's last token, one text at a time (no padding)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = processor(text=[text])
            rows.append(model.backbone(**inputs).last_hidden_state[0, -1])
    return torch.stack(rows)


# Observation 2: `encode` after `AutoModel.from_pretrained` raised "encode needs the model's UniMEProcessor".
def test_a_loaded_model_encodes_without_a_processor(tiny, checkpoint):
    model, processor = tiny
    loaded = AutoModel.from_pretrained(checkpoint)
    expected = model.encode(TEXTS, processor=processor)
    assert torch.equal(loaded.encode(TEXTS), expected)
    assert torch.equal(loaded.encode_text(TEXTS), expected)
    assert torch.equal(UniMEModel.from_pretrained(checkpoint).encode_document(TEXTS), expected)
    assert loaded.processor is loaded.processor  # loaded once


def test_a_model_from_a_config_alone_names_what_to_pass(tiny):
    model, _ = tiny
    bare = UniMEModel(model.config)
    with pytest.raises(ValueError, match=r"no processor: pass processor=UniMEProcessor.from_pretrained"):
        bare.encode(["hello"])


def test_from_backbone_carries_the_backbone_processor(backbone_checkpoints):
    directory = backbone_checkpoints("llava")
    model = UniMEModel.from_backbone(directory)
    from modeling_unime import UniMEProcessor

    processor = UniMEProcessor.from_backbone(directory)
    assert torch.equal(model.encode(["hello"]), model.encode(["hello"], processor=processor))


# Observation 3: a long text raised "item 0 is 4027 tokens long"; the processor's truncation cut the template's end.
def test_long_text_is_cut_before_the_template(tiny):
    model, processor = tiny
    long_text = " ".join(["hello"] * 400)
    ids = processor.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 400  # " hello" is one token: a prefix of k tokens is exactly k words
    overhead = processor(text=["hello"])["attention_mask"].sum().item() - 1
    max_length = 48
    kept = max_length - overhead
    prefix = " ".join(["hello"] * kept)

    truncated = model.encode([long_text, "a cat"], processor=processor, max_length=max_length)

    assert torch.equal(truncated[0], model.encode([prefix], processor=processor)[0])
    # Padded next to the long text: equal up to float noise.
    torch.testing.assert_close(truncated[1], model.encode(["a cat"], processor=processor)[0], rtol=1e-5, atol=1e-6)
    batch = processor(text=[long_text], truncation=True, max_length=max_length)
    assert batch["input_ids"].shape == (1, max_length)
    assert processor.tokenizer.decode(batch["input_ids"][0]).endswith(TEMPLATE_END)
    padded = processor(text=["hello", long_text], truncation=True, max_length=max_length, padding="max_length")
    assert padded["attention_mask"].sum(dim=1).tolist() == [overhead + 1, max_length]
    assert torch.equal(padded["input_ids"][1], batch["input_ids"][0])


def test_the_config_default_truncates_and_is_saved(tiny, tmp_path):
    model, processor = tiny
    config = UniMEConfig.from_dict({**model.config.to_dict(), "max_sequence_tokens": 40})
    limited = UniMEModel(config)
    limited.load_state_dict(model.state_dict())
    limited.eval()
    long_text = " ".join(["hello"] * 400)
    expected = limited.encode([long_text], processor=processor, max_length=40)
    assert torch.equal(limited.encode([long_text], processor=processor), expected)
    config.save_pretrained(tmp_path)
    assert UniMEConfig.from_pretrained(tmp_path).max_sequence_tokens == 40


def test_config_max_length_is_still_read_and_saves(tmp_path):
    config = UniMEConfig(backbone_config=tiny_unime("qwen2_vl")[0].config.backbone_config, max_length=77)
    assert config.max_sequence_length == 77
    config.save_pretrained(tmp_path)  # transformers refuses to save a config attribute named max_length
    text = (tmp_path / "config.json").read_text()
    assert '"max_sequence_tokens": 77' in text and '"max_length"' not in text
    old = text.replace('"max_sequence_tokens": 77', '"max_length": 55')
    (tmp_path / "config.json").write_text(old)
    assert UniMEConfig.from_pretrained(tmp_path).max_sequence_length == 55


def test_truncation_that_leaves_no_room_for_text_or_cuts_an_image_raises(tiny, images):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"item 0: the prompt template, instruction and image take \d+ of max_length=5"):
        model.encode(["hello world"], processor=processor, max_length=5)
    with pytest.raises(ValueError, match=r"item 0: the image and prompt template take \d+ tokens.*images are never cut"):
        model.encode([images[0]], processor=processor, max_length=10)
    with pytest.raises(ValueError, match=r"truncation needs max_length"):
        processor(text=["hello"], truncation=True)


# Observation 4: normalize_embeddings=False still returned unit vectors; no convert_to_numpy/truncate_dim; [] raised.
def test_normalize_false_returns_the_raw_pooled_state(tiny):
    model, processor = tiny
    raw = raw_pooled_states(model, processor, TEXTS)
    got = model.encode(TEXTS, processor=processor, normalize_embeddings=False)
    torch.testing.assert_close(got, raw, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(model.encode(TEXTS, processor=processor), F.normalize(raw, dim=-1), rtol=1e-5, atol=1e-5)


def test_truncate_dim_slices_then_renormalises(tiny):
    model, processor = tiny
    raw = raw_pooled_states(model, processor, TEXTS)
    got = model.encode(TEXTS, processor=processor, truncate_dim=8)
    torch.testing.assert_close(got, F.normalize(raw[:, :8], dim=-1), rtol=1e-5, atol=1e-5)
    unnormalised = model.encode(TEXTS, processor=processor, truncate_dim=8, normalize_embeddings=False)
    torch.testing.assert_close(unnormalised, raw[:, :8], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"truncate_dim must be an int in \[1, 32\].*got 33"):
        model.encode(TEXTS, processor=processor, truncate_dim=33)


def test_truncate_dim_must_be_a_trained_matryoshka_dim_when_the_config_lists_them(tiny):
    model, processor = tiny
    model.config.matryoshka_dims = [16, 8]
    try:
        assert model.encode(TEXTS, processor=processor, truncate_dim=16).shape == (4, 16)
        with pytest.raises(ValueError, match=r"truncate_dim=12 is not one of .*matryoshka_dims=\[16, 8\]"):
            model.encode(TEXTS, processor=processor, truncate_dim=12)
    finally:
        del model.config.matryoshka_dims


def test_convert_to_numpy_and_tensor(tiny):
    model, processor = tiny
    tensor = model.encode(TEXTS, processor=processor)
    array = model.encode(TEXTS, processor=processor, convert_to_numpy=True)
    assert isinstance(array, np.ndarray) and np.array_equal(array, tensor.numpy())
    assert torch.is_tensor(model.encode(TEXTS, processor=processor, convert_to_numpy=True, convert_to_tensor=True))
    rows = model.encode(TEXTS, processor=processor, convert_to_numpy=False, convert_to_tensor=False)
    assert isinstance(rows, list) and len(rows) == 4 and torch.equal(rows[2], tensor[2])


def test_precision_follows_sentence_transformers_rules(tiny):
    model, processor = tiny
    floats = model.encode(TEXTS, processor=processor).numpy()
    starts, stops = floats.min(axis=0), floats.max(axis=0)
    steps = np.where(stops - starts == 0, 1, (stops - starts) / 255)
    buckets = np.clip(np.floor((floats - starts) / steps), 0, 255)
    bits = np.array([[int("".join("1" if v > 0 else "0" for v in row[i:i + 8]), 2) for i in range(0, 32, 8)]
                     for row in floats])
    assert np.array_equal(model.encode(TEXTS, processor=processor, precision="uint8"), buckets.astype(np.uint8))
    assert np.array_equal(model.encode(TEXTS, processor=processor, precision="int8"), (buckets - 128).astype(np.int8))
    assert np.array_equal(model.encode(TEXTS, processor=processor, precision="ubinary"), bits.astype(np.uint8))
    assert np.array_equal(model.encode(TEXTS, processor=processor, precision="binary"), (bits - 128).astype(np.int8))
    with pytest.raises(ValueError, match=r"precision='int4'"):
        model.encode(TEXTS, processor=processor, precision="int4")


def test_an_empty_list_gives_an_empty_result(tiny):
    model, processor = tiny
    assert model.encode([], processor=processor).shape == (0, 32)
    assert model.encode([], processor=processor, truncate_dim=8, convert_to_numpy=True).shape == (0, 8)


def test_encode_query_and_document_use_the_config_prompts(tiny):
    model, processor = tiny
    query_instruction = model.config.prompts["query"]
    assert query_instruction == "Retrieve the image or passage that matches this query:"
    assert model.config.prompts["document"] == ""
    assert torch.equal(model.encode_query(TEXTS, processor=processor),
                       model.encode(TEXTS, processor=processor, instruction=query_instruction))
    assert torch.equal(model.encode_document(TEXTS, processor=processor), model.encode(TEXTS, processor=processor))
    with pytest.raises(ValueError, match=r"prompt_name='passage' is not in config.prompts \(names: \['document', 'query'\]\)"):
        model.encode(TEXTS, processor=processor, prompt_name="passage")


# Issue 14: the doors name the argument and its value.
@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=True), r"batch_size must be a positive int, got True"),
    (dict(batch_size=0), r"batch_size must be a positive int, got 0"),
    (dict(max_length=2.5), r"max_length must be a positive int or None, got 2.5"),
    (dict(device="nodev"), r"device='nodev' is not a usable torch device"),
])
def test_bad_arguments_are_named_before_anything_is_embedded(tiny, kwargs, match, monkeypatch):
    model, processor = tiny

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran before the argument was checked")

    monkeypatch.setattr(model.backbone, "forward", must_not_run)
    with pytest.raises(ValueError, match=match):
        model.encode(TEXTS, processor=processor, **kwargs)


def test_similarity_checks_what_it_got(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"one width: embeddings_a is \(2, 8\), embeddings_b is \(3, 4\)"):
        model.similarity(torch.ones(2, 8), torch.ones(3, 4))
    with pytest.raises(TypeError, match=r"embeddings_b: similarity compares embeddings, got text"):
        model.similarity(torch.ones(2, 8), ["a dog"])
    expected = torch.tensor([[1.0, 0.0]])
    assert torch.equal(model.similarity(torch.tensor([3.0, 0.0]), np.array([[2.0, 0.0], [0.0, 5.0]])), expected)


def test_encode_text_and_processor_refuse_non_text(tiny):
    model, processor = tiny
    with pytest.raises(TypeError, match=r"encode_text expects a str or a list of str, got NoneType"):
        model.encode_text(None, processor=processor)
    with pytest.raises(TypeError, match=r"text must be a str or a list of str .*got int"):
        processor(text=5)
    with pytest.raises(TypeError, match=r"text must be a str or a list of str .*got dict"):
        processor(text={"text": "a"})
    with pytest.raises(TypeError, match=r"text\[1\]: expected text as str, got int"):
        processor(text=["a", 3])


def test_non_finite_embeddings_are_named(tiny):
    model, processor = tiny
    broken, _ = tiny_unime("qwen2_vl")
    with torch.no_grad():
        broken.backbone.language_model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"items \[0, 1, 2, 3\] have non-finite embeddings"):
        broken.encode(TEXTS, processor=processor)


def test_threads_encoding_a_model_in_train_mode(tiny):
    model, processor = tiny
    expected = model.encode(TEXTS, processor=processor)
    model.train()
    results = [None] * 4
    try:
        def work(slot):
            results[slot] = model.encode(TEXTS, processor=processor, batch_size=1 + slot % 2)

        threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert model.training and all(module.training for module in model.modules())
    finally:
        model.eval()
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
