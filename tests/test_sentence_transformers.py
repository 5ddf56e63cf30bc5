"""A saved UniME checkpoint loads with `SentenceTransformer(path, trust_remote_code=True)` (through the module
shipped in the checkpoint, modeling_unime/sentence_transformers_module.py) and embeds exactly like
`UniMEModel.encode`: text, images, image+text dicts and mixed lists, from a folder, from the Hub, in a fresh process."""

import os
import sys
from pathlib import Path

import pytest
import torch

from modeling_unime.model_card import LOCAL_MODEL_ID
from tests.fake_hub import fake_hub  # noqa: F401  (the fixture)
from tests.test_hub import run_fresh_python, snippet_inputs
from tests.test_model_card import RUN_SNIPPET, python_blocks
from training.demo.tiny_models import tiny_unime

sentence_transformers = pytest.importorskip("sentence_transformers")
SentenceTransformer = sentence_transformers.SentenceTransformer


def use_modules_cache(patch, cache):
    import transformers.dynamic_module_utils as dynamic_modules
    import transformers.utils.hub as transformers_hub

    patch.setenv("HF_MODULES_CACHE", cache)
    patch.setattr(dynamic_modules, "HF_MODULES_CACHE", cache)
    patch.setattr(transformers_hub, "HF_MODULES_CACHE", cache)


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """One cache for the checkpoints' code (dynamic modules) loaded in this process, not the user's.

    The `transformers_modules` package binds to the first cache it is imported from, and Python cannot unload
    it: a second cache in the same process breaks the checkpoint code's relative imports. So reuse the cache of
    an earlier in-process load, if any.
    """
    loaded = sys.modules.get("transformers_modules")
    cache = str(Path(loaded.__path__[0]).parent) if loaded is not None else str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as patch:
        use_modules_cache(patch, cache)
        yield cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory, modules_cache):
    """(model, processor, checkpoint directory, SentenceTransformer loaded from it)."""
    model, processor = tiny_unime("qwen2_vl")
    checkpoint = tmp_path_factory.mktemp("st_checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return model, processor, checkpoint, SentenceTransformer(str(checkpoint), trust_remote_code=True)


def st_encode(st_model, items, **kwargs):
    return st_model.encode(items, convert_to_tensor=True, **kwargs).cpu()


def test_the_checkpoint_names_its_module_and_sentence_transformers_uses_the_shipped_code(saved):
    model, _, checkpoint, st_model = saved
    assert (checkpoint / "modules.json").is_file() and (checkpoint / "modeling_unime.py").is_file()
    module = st_model[0]
    assert type(module).__name__ == "UniMESentenceTransformer"
    assert type(module).__module__.startswith("transformers_modules."), type(module).__module__
    assert repr(module) == "UniMESentenceTransformer(backbone=Qwen2VLModel, embedding_dimension=32)"
    assert st_model.get_embedding_dimension() == model.config.text_hidden_size == 32
    assert st_model.similarity_fn_name == "cosine"
    assert st_model.supports("image") and st_model.supports(("image", "text")) and not st_model.supports("audio")


def test_same_embeddings_as_encode_for_text_images_fused_and_mixed(saved, images):
    model, processor, _, st_model = saved
    texts = ["a dog on the grass", "two cats", "a red car parked outside"]
    fused = [{"image": image, "text": text} for image, text in zip(images, texts)]
    for items in (texts, images, fused, [texts[0], images[1], fused[2], images[3], texts[2]]):
        assert torch.equal(st_encode(st_model, items), model.encode(items, processor=processor))
    # One item in, one vector out, as in both libraries.
    assert torch.equal(st_encode(st_model, images[0]), model.encode(images[0], processor=processor))


def test_several_batches_agree_with_encode_up_to_float_noise(saved, images):
    model, processor, _, st_model = saved
    items = ["a dog", "a much longer caption about a cat", *images[:4], {"image": images[4], "text": "what?"}]
    # sentence-transformers cuts batches by its own length order, so padding (and so the last bits) can differ.
    difference = st_encode(st_model, items, batch_size=2) - model.encode(items, processor=processor)
    assert difference.abs().max().item() < 1e-5


def test_prompt_is_the_unime_instruction(saved, images):
    model, processor, _, st_model = saved
    queries = ["a dog", "a cat on a mat"]
    instruction = "Find an image that matches the given caption: "
    expected = model.encode(queries, processor=processor, instruction=instruction)
    assert torch.equal(st_encode(st_model, queries, prompt=instruction), expected)
    expected = model.encode(queries, processor=processor, prompt_style="instruction")
    assert torch.equal(st_encode(st_model, queries, prompt_style="instruction"), expected)


def test_a_str_is_text_even_when_a_file_of_that_name_exists(saved, images, tmp_path, monkeypatch):
    """Issue 12 observation 5: a str naming an existing image file was an image here and text in `encode`."""
    model, processor, _, st_model = saved
    monkeypatch.chdir(tmp_path)
    images[1].save(tmp_path / "photo.png")
    text_embedding = model.encode(["photo.png"], processor=processor)
    assert torch.equal(model.encode(["photo.png", images[1]], processor=processor)[:1], text_embedding)
    assert torch.equal(st_encode(st_model, ["photo.png"]), text_embedding)
    assert torch.equal(st_encode(st_model, [Path("photo.png")]),
                       model.encode([Path("photo.png")], processor=processor))
    with pytest.raises(ValueError, match=r"dict items need 'image' and/or 'text' keys, got \['content', 'role'\]"):
        st_model.encode(["a dog", {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat-style message lists are not UniME inputs"):
        st_model.encode([{"role": "user", "content": "hi"}])  # one conversation, for sentence-transformers


def test_loading_needs_trust_remote_code(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(saved[2]))


def test_model_kwargs_reach_from_pretrained(saved, images):
    model, processor, checkpoint, _ = saved
    bf16 = SentenceTransformer(str(checkpoint), trust_remote_code=True, model_kwargs={"dtype": torch.bfloat16})
    assert bf16[0].model.dtype == torch.bfloat16
    items = ["a dog", images[0]]
    difference = st_encode(bf16, items) - model.encode(items, processor=processor)
    assert difference.abs().max().item() < 0.1


def test_sentence_transformers_save_and_reload(saved, tmp_path, images):
    model, processor, _, st_model = saved
    st_model.save(str(tmp_path / "resaved"))
    reloaded = SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True)
    items = ["a dog", images[0], {"image": images[1], "text": "what is it?"}]
    assert torch.equal(st_encode(reloaded, items), model.encode(items, processor=processor))


def test_load_from_the_hub(fake_hub, modules_cache, monkeypatch, images):
    use_modules_cache(monkeypatch, modules_cache)  # not the fake Hub's own: see `modules_cache`
    model, processor = tiny_unime("qwen2_vl")
    model.push_to_hub("user/unime-st")
    processor.push_to_hub("user/unime-st")
    st_model = SentenceTransformer("user/unime-st", trust_remote_code=True)
    items = ["a dog", images[0], {"image": images[1], "text": "what is it?"}]
    assert torch.equal(st_encode(st_model, items), model.encode(items, processor=processor))


def test_card_snippet_runs_in_a_fresh_process_without_the_project(saved, tmp_path):
    model, processor, checkpoint, _ = saved
    blocks = python_blocks((checkpoint / "README.md").read_text())
    [snippet] = [block for block in blocks if "SentenceTransformer" in block]
    snippet_file = tmp_path / "snippet.py"
    snippet_file.write_text(snippet.replace(LOCAL_MODEL_ID, str(checkpoint)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}

    embeddings = run_fresh_python(RUN_SNIPPET, [snippet_file], env, tmp_path)

    assert torch.equal(embeddings, model.encode(snippet_inputs(), processor=processor))


def test_max_seq_length_reads_sets_and_truncates_like_encode(saved):
    """Issue 12 observation 3: `st.max_seq_length = 128` raised AttributeError."""
    model, processor, checkpoint, _ = saved
    st_model = SentenceTransformer(str(checkpoint), trust_remote_code=True)
    assert st_model.max_seq_length == model.config.max_sequence_length
    long_text = " ".join(["hello"] * 300)
    st_model.max_seq_length = 48
    assert st_model.max_seq_length == 48
    assert torch.equal(st_encode(st_model, [long_text]), model.encode([long_text], processor=processor, max_length=48))
    with pytest.raises(ValueError, match="max_seq_length must be a positive int or None, got 0"):
        st_model.max_seq_length = 0


def test_truncate_dim_precision_and_empty_input_match_encode(saved):
    model, processor, _, st_model = saved
    texts = ["a dog", "a cat", "two birds", "the sea"]
    # sentence-transformers normalises (its Normalize module), slices, normalises again: equal up to rounding.
    torch.testing.assert_close(st_encode(st_model, texts, truncate_dim=8, normalize_embeddings=True),
                               model.encode(texts, processor=processor, truncate_dim=8), rtol=1e-6, atol=1e-6)
    for precision in ("int8", "ubinary"):
        assert (st_model.encode(texts, precision=precision)
                == model.encode(texts, processor=processor, precision=precision)).all()
    assert st_model.encode([]).shape[0] == 0 and model.encode([], processor=processor).shape == (0, 32)


def test_query_and_document_prompts_come_from_the_checkpoint(saved):
    model, processor, checkpoint, st_model = saved
    settings = (checkpoint / "config_sentence_transformers.json").read_text()
    assert '"query": "Retrieve the image or passage that matches this query:"' in settings
    assert '"document": ""' in settings
    texts = ["a dog", "a cat"]
    assert torch.equal(torch.as_tensor(st_model.encode_query(texts)), model.encode_query(texts, processor=processor))
    assert torch.equal(torch.as_tensor(st_model.encode_document(texts)),
                       model.encode_document(texts, processor=processor))


def test_multi_process_encoding_gives_the_single_process_result(saved):
    model, processor, _, st_model = saved
    texts = ["a dog", "a cat", "two birds", "the sea", "a red square"]
    expected = model.encode(texts, processor=processor)
    got = torch.as_tensor(st_model.encode(texts, device=["cpu", "cpu"], batch_size=2, chunk_size=3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
