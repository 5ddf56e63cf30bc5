"""`encode` batches on a token budget with <= 5% padding, prefetches preprocessing, same embeddings."""

import threading

import pytest
import torch

from modeling_unime import batching
from modeling_unime.batching import estimate_tokens, plan_batches, prefetch
from training.demo.tiny_models import tiny_unime

from conftest import drawn_image  # noqa: I001

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees".split()


def mixed_items(count, seed=0):
    """Texts of 2-60 words, images of 28-140 pixels a side and image+text items, in a shuffled mix."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index in range(count):
        kind = index % 3
        words = int(torch.randint(2, 60, (1,), generator=generator))
        text = " ".join(WORDS[(index + j) % len(WORDS)] for j in range(words))
        width, height = (int(v) for v in torch.randint(28, 140, (2,), generator=generator))
        image = drawn_image(index, size=(width, height))
        items.append(text if kind == 0 else {"image": image} if kind == 1 else {"image": image, "text": text[:80]})
    return items


@pytest.fixture(scope="module")
def qwen():
    model, processor = tiny_unime("qwen2_vl")
    return model.eval(), processor


def test_plan_batches_by_hand():
    entries = [(0, "a", None), (1, "b", None), (2, "c", None), (3, None, "img"), (4, "d", None), (5, "e", None)]
    lengths = [20, 30, 20, 50, 21, 31]
    # Texts sorted by length: 20 (0), 20 (2), 21 (4) | 30 (1), 31 (5); the image alone. Adding item 1
    # to the first batch would pad 4 x 30 = 120 tokens for 91 real ones (> 1.05).
    assert [[e[0] for e in b] for b in plan_batches(entries, lengths, batch_size=8)] == [[0, 2, 4], [1, 5], [3]]
    assert [[e[0] for e in b] for b in plan_batches(entries, lengths, batch_size=2)] == [[0, 2], [4], [1, 5], [3]]
    # 3 x 21 = 63 padded tokens > 60: the budget closes the batch after two items; 2 x 31 > 60 too.
    assert [[e[0] for e in b] for b in plan_batches(entries, lengths, 8, max_tokens_per_batch=60)] == \
        [[0, 2], [4], [1], [5], [3]]


def real_and_processed_tokens(model, call):
    """Run `call()`; return (real, processed) language-model tokens over all forwards of `model`."""
    counts = [0, 0]

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        counts[0] += int(mask.sum())
        counts[1] += mask.numel()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = call()
    finally:
        handle.remove()
    return counts[0], counts[1], result


def test_padding_within_5_percent_at_every_batch_size_and_embeddings_unchanged(qwen):
    model, processor = qwen
    items = mixed_items(60)
    # Independent reference: one item per forward (no padding at all).
    reference = torch.cat([model.encode([item], processor=processor, batch_size=1) for item in items])
    for batch_size in (8, 32, 128):
        real, processed, embeddings = real_and_processed_tokens(
            model, lambda: model.encode(items, processor=processor, batch_size=batch_size))
        assert processed / real <= 1.05, (batch_size, processed / real)
        assert (embeddings - reference).abs().max().item() <= 1e-5
    real, processed, embeddings = real_and_processed_tokens(
        model, lambda: model.encode(items, processor=processor, batch_size=32, max_tokens_per_batch=120))
    assert (embeddings - reference).abs().max().item() <= 1e-5


def test_old_fixed_size_batches_padded_more(qwen):
    """Control: the same mix in fixed-size batches sorted as before (modality, image area, characters)
    pads well over 5%, so the bound above is not trivially met."""
    model, processor = qwen
    items = mixed_items(60)
    entries = [model._checked_item(item, i, processor, processor.placeholder_tokens()) for i, item in enumerate(items)]
    lengths = estimate_tokens(processor, entries)
    order = sorted(range(len(entries)), key=lambda i: (batching.MODALITY_ORDER[batching.modality(*entries[i][1:])],
                                                       0 if entries[i][2] is None else entries[i][2].width * entries[i][2].height,
                                                       len(entries[i][1] or "")))
    processed = 0
    for start in range(0, len(order), 32):
        rows = order[start:start + 32]
        groups = {}
        for i in rows:
            groups.setdefault(batching.modality(*entries[i][1:]), []).append(lengths[i])
        processed += sum(len(g) * max(g) for g in groups.values())
    assert processed / sum(lengths) > 1.1


def test_estimated_tokens_are_the_processor_counts(qwen):
    model, processor = qwen
    items = mixed_items(9)
    entries = [model._checked_item(item, i, processor, processor.placeholder_tokens()) for i, item in enumerate(items)]
    actual = [int(processor(text=[t] if t else None, images=[im] if im else None)["attention_mask"].sum())
              for _, t, im in entries]
    assert estimate_tokens(processor, entries) == actual


def test_prefetch_runs_ahead_in_a_worker_thread_and_raises_at_the_failing_batch():
    threads, seen = [], []

    def work(batch):
        threads.append(threading.current_thread().name)
        if batch == 3:
            raise ValueError("item 3 is broken")
        return batch * 10

    with pytest.raises(ValueError, match="item 3 is broken"):
        for batch, result in prefetch(work, range(6)):
            seen.append((batch, result))
    assert seen == [(0, 0), (1, 10), (2, 20)]
    assert all(name.startswith("unime-encode-prefetch") for name in threads)
    assert list(prefetch(lambda b: -b, [1, 2])) == [(1, -1), (2, -2)]


def test_progress_bar_reports_items_per_second(qwen, capsys):
    model, processor = qwen
    model.encode(mixed_items(12), processor=processor, batch_size=2, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "items_per_s=" in err and "encode" in err


def test_bad_max_tokens_per_batch(qwen):
    model, processor = qwen
    with pytest.raises(ValueError, match="max_tokens_per_batch must be a positive int or None, got 0"):
        model.encode(["a"], processor=processor, max_tokens_per_batch=0)
