"""MMEB-train loading, per-subset caps, validation and the stage-2 collator (training/mmeb_data.py)."""

import json

import datasets
import pytest
import torch
from PIL import Image

from training.mmeb_data import (
    BadImageError,
    MMEBCollator,
    load_mmeb_train,
    missing_image_files,
    mix_subsets,
)
from training.demo.tiny_models import tiny_processor

CLASSIFY = "<|image_1|> Represent the given image for classification."


def write_image(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def pair(i, subset=None):
    record = {"qry": CLASSIFY, "qry_image_path": f"img/{i}.png", "pos_text": f"label {i}", "pos_image_path": ""}
    return record if subset is None else {**record, "subset": subset}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_images")
    for i in range(12):
        write_image(root / "img" / f"{i}.png", (20 * i, 255 - 20 * i, 90), size=(30 + 3 * i, 24 + 2 * i))
    (root / "img" / "corrupt.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def processor():
    return tiny_processor("qwen2_vl")


# ---- loading and subsets ----------------------------------------------------------------------


def test_loads_a_jsonl_file_with_row_ids(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [pair(i) for i in range(5)])
    table = load_mmeb_train(tmp_path / "pairs.jsonl")
    assert len(table) == 5
    assert table[3]["pos_text"] == "label 3"
    assert table[3]["subset_row"] == 3 and table[3]["subset"] == str(tmp_path / "pairs.jsonl")


def test_folder_of_subset_files_and_hub_layout(tmp_path):
    write_jsonl(tmp_path / "A.jsonl", [pair(i) for i in range(4)])
    hub_dir = tmp_path / "B"
    hub_dir.mkdir()
    datasets.Dataset.from_list([pair(i) for i in range(6)]).to_parquet(str(hub_dir / "original-00000-of-00001.parquet"))
    datasets.Dataset.from_list([pair(100)]).to_parquet(str(hub_dir / "diverse_instruction-00000-of-00001.parquet"))

    table = load_mmeb_train(tmp_path, subsets=["B", "A"], split="original")
    assert table["subset"] == ["B"] * 6 + ["A"] * 4
    assert table["subset_row"] == list(range(6)) + list(range(4))
    assert "label 100" not in table["pos_text"]  # other split not read

    with pytest.raises(ValueError, match=r"subsets \['C'\] not found"):
        load_mmeb_train(tmp_path, subsets=["C"], split="original")


def test_subset_column_of_one_table_and_mapping(tmp_path):
    rows = [pair(i, "even" if i % 2 == 0 else "odd") for i in range(8)]
    table = load_mmeb_train(datasets.Dataset.from_list(rows), subsets=["odd"])
    assert table["pos_text"] == [f"label {i}" for i in (1, 3, 5, 7)]
    mapping = {"x": datasets.Dataset.from_list([pair(0)]), "y": datasets.Dataset.from_list([pair(1), pair(2)])}
    assert load_mmeb_train(mapping)["subset"] == ["x", "y", "y"]
    with pytest.raises(ValueError, match="no 'subset' column"):
        load_mmeb_train(datasets.Dataset.from_list([pair(0)]), subsets=["x"])


def test_per_subset_cap_is_a_seeded_sample_in_original_order():
    tables = {"big": datasets.Dataset.from_list([pair(i) for i in range(50)]),
              "small": datasets.Dataset.from_list([pair(i) for i in range(3)])}
    first = mix_subsets(tables, num_sample_per_subset=10, seed=7)
    again = mix_subsets(tables, num_sample_per_subset=10, seed=7)
    other = mix_subsets(tables, num_sample_per_subset=10, seed=8)
    big_rows = [row for row, subset in zip(first["subset_row"], first["subset"]) if subset == "big"]
    assert len(first) == 13 and first["subset"].count("small") == 3  # a subset under the cap is kept whole
    assert big_rows == sorted(big_rows) and len(set(big_rows)) == 10
    assert big_rows != list(range(10))
    assert first["subset_row"] == again["subset_row"]
    assert first["subset_row"] != other["subset_row"]
    # The text really is the selected row's (not merely the row id).
    assert [text for text, subset in zip(first["pos_text"], first["subset"]) if subset == "big"] == \
        [f"label {row}" for row in big_rows]
    # A subset's sample does not depend on which other subsets are mixed.
    alone = mix_subsets({"big": tables["big"]}, num_sample_per_subset=10, seed=7)
    assert alone["subset_row"] == big_rows
    # seed=None: the first rows, as VLM2Vec.
    assert mix_subsets(tables, 10, seed=None)["subset_row"][:10] == list(range(10))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pos_text": None}, r"file '.*pairs\.jsonl', row 2\): field 'pos_text' must be a string"),
        ({"qry": "", "qry_image_path": ""}, r"row 2\): 'qry' and 'qry_image_path' are both empty"),
        ({"pos_text": "<|image_1|> a photo", "pos_image_path": ""}, r"row 2\): 'pos_text' contains <\|image_1\|>"),
    ],
)
def test_bad_records_are_rejected_before_training(tmp_path, change, message):
    records = [pair(i) for i in range(4)]
    records[2] = {**records[2], **change}
    write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(ValueError, match=message):
        load_mmeb_train(tmp_path / "pairs.jsonl")


def test_missing_column_is_named(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"qry": "q", "qry_image_path": "", "pos_text": "t"}])
    with pytest.raises(ValueError, match=r"lacks MMEB-train fields \['pos_image_path'\]"):
        load_mmeb_train(tmp_path / "pairs.jsonl")


def test_missing_image_files_preflight(image_root):
    table = load_mmeb_train(datasets.Dataset.from_list([pair(0), {**pair(1), "qry_image_path": "img/nope.png"}]))
    missing = missing_image_files(table, image_root)
    assert missing == [("subset 'train', row 1", str(image_root / "img" / "nope.png"))]


# ---- collator ---------------------------------------------------------------------------------


def rows_of(records):
    return list(load_mmeb_train(datasets.Dataset.from_list(records)))


def test_collator_rewrites_placeholder_and_resizes(processor, image_root):
    records = [pair(0), {"qry": "Find me an image of: a red square", "qry_image_path": "",
                         "pos_text": "", "pos_image_path": "img/5.png"}, pair(7)]
    batch = MMEBCollator(processor, image_root=image_root, image_size=56)(rows_of(records))
    query, target = batch["query"], batch["target"]
    assert batch["num_skipped"] == 0
    assert query["input_ids"].shape[0] == target["input_ids"].shape[0] == 3
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    decoded = processor.tokenizer.batch_decode(query["input_ids"])
    assert all("<|image_1|>" not in text for text in decoded)
    # VLM2Vec / UniME-V2 instruction mode: the bare image pad, expanded, without vision_start / vision_end
    assert decoded[0].endswith("<|image_pad|>" * 4 + " Represent the given image for classification.")
    assert "<|vision_start|>" not in decoded[0]
    # 56x56 images -> 4x4 patches of 14 px -> 4 image tokens after the 2x2 merge, whatever the file size.
    assert query["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert (query["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 0, 4]
    # The image-only target is just the image token (empty text).
    assert target["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (target["input_ids"] == image_pad).sum(dim=1).tolist() == [0, 4, 0]


def test_collator_matches_processor_on_the_same_images(processor, image_root):
    records = [pair(3), pair(4)]
    batch = MMEBCollator(processor, image_root=image_root, image_size=56)(rows_of(records))
    images = [Image.open(image_root / "img" / f"{i}.png").convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
              for i in (3, 4)]
    expected = processor(text=[CLASSIFY, CLASSIFY], images=images, prompt_style="instruction")
    assert torch.equal(batch["query"]["input_ids"], expected["input_ids"])
    assert torch.equal(batch["query"]["pixel_values"], expected["pixel_values"])


def test_collator_chunks_for_gradcache(processor, image_root):
    batch = MMEBCollator(processor, image_root=image_root, image_size=56, chunk_size=2)(
        rows_of([pair(i) for i in range(5)]))
    assert [chunk["input_ids"].shape[0] for chunk in batch["query"]] == [2, 2, 1]
    assert [chunk["image_grid_thw"].shape[0] for chunk in batch["query"]] == [2, 2, 1]
    assert [chunk["input_ids"].shape[0] for chunk in batch["target"]] == [2, 2, 1]


@pytest.mark.parametrize("bad_path, reason", [("img/missing.png", "does not exist"),
                                               ("img/corrupt.png", "cannot read image file")])
def test_bad_image_error_names_file_and_row(processor, image_root, bad_path, reason):
    rows = rows_of([pair(0), pair(1), {**pair(2), "qry_image_path": bad_path}])
    collator = MMEBCollator(processor, image_root=image_root, image_size=56)
    with pytest.raises(ValueError, match=r"subset 'train', row 2\), 'qry_image_path'") as error:
        collator(rows)
    assert str(image_root / bad_path) in str(error.value) and reason in str(error.value)


def test_skip_bad_images_drops_and_counts(processor, image_root):
    rows = rows_of([pair(0), {**pair(1), "qry_image_path": "img/missing.png"}, pair(2),
                    {**pair(3), "qry_image_path": "img/corrupt.png"}])
    collator = MMEBCollator(processor, image_root=image_root, image_size=56, skip_bad_images=True)
    batch = collator(rows)
    assert batch["num_skipped"] == 2 and collator.num_skipped == 2
    assert batch["query"]["input_ids"].shape[0] == 2
    decoded = processor.tokenizer.batch_decode(batch["target"]["input_ids"], skip_special_tokens=True)
    assert [text.strip() for text in decoded] == ["label 0", "label 2"]
    collator(rows)
    assert collator.num_skipped == 4
    with pytest.raises(BadImageError, match="all 1 pairs"):
        collator(rows[1:2])


def test_max_length_cuts_text_not_image_tokens(processor, image_root):
    long = "<|image_1|> " + " ".join(["word"] * 50)
    rows = rows_of([{**pair(0), "qry": long}])
    batch = MMEBCollator(processor, image_root=image_root, image_size=56, max_length=10)(rows)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["query"]["input_ids"] == image_pad).sum()) == 4
    full = MMEBCollator(processor, image_root=image_root, image_size=56)(rows)
    assert batch["query"]["input_ids"].shape[1] < full["query"]["input_ids"].shape[1] - 30


def test_collator_rejects_bad_settings(processor):
    for kwargs in ({"image_size": 0}, {"chunk_size": 0}, {"image_size": 3.5}):
        with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
            MMEBCollator(processor, **kwargs)
