"""Batch planning and preprocessing prefetch for `encode`: few padded tokens, no idle forward.

A batch is padded to its longest item, so fixed-size batches over long-tailed lengths (texts of 30
to 400 tokens, images of 50 to 1,200 tokens) process up to twice the real tokens. `plan_batches`
sorts the items by modality and estimated length and closes a batch before it would exceed
`batch_size` items, `max_tokens_per_batch` padded tokens, or `1 + max_padding` times its real
tokens. Every item's embedding is independent of its batch (batches never mix modalities), so the
plan changes the cost, not the result.

`prefetch` runs the preprocessing (tokenizer, image processor) of the next batches in a worker
thread while the current batch's forward runs: both release the GIL for their heavy parts.
"""

from concurrent.futures import ThreadPoolExecutor

# Sorting by modality first keeps every batch homogeneous, so an item's embedding never depends on
# a neighbour's modality.
MODALITY_ORDER = {"text": 0, "image": 1, "fused": 2}
MAX_PADDING = 0.05  # padded tokens / real tokens of a batch stay <= 1.05


def modality(text, image):
    """`"text"`, `"image"` or `"fused"` for an item's `(text, image)` (either may be None)."""
    if image is None:
        return "text"
    return "image" if text is None else "fused"


def estimate_tokens(processor, entries, prompt_style="summary", instruction=None):
    """Estimated language-model tokens of each item after formatting, image tokens included.

    Args:
        processor ([`UniMEProcessor`]): formats the prompts and knows the image-token counts.
        entries (`list[tuple[int, str | None, PIL.Image | None]]`): `(index, text, image)` per item.

    Returns:
        `list[int]`, one count per entry: the tokens of the formatted prompt (its image placeholder
        counted once) plus the image's tokens, from the image size alone (no pixel is processed).
    """
    prompts = [processor.format_prompt(text, image is not None, prompt_style, instruction)
               for _, text, image in entries]
    counts = [len(ids) for ids in processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    sizes = [(image.height, image.width) for _, _, image in entries if image is not None]
    image_tokens = iter(_image_token_counts(processor, sizes))
    return [count + (next(image_tokens) - 1 if image is not None else 0)
            for count, (_, _, image) in zip(counts, entries)]


def _image_token_counts(processor, sizes):
    """Tokens each `(height, width)` image becomes (the backbone processor's own count when it has one)."""
    if not sizes:
        return []
    try:
        counts = processor.backbone_processor()._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        return [int(count) for count in counts]
    except (AttributeError, TypeError, KeyError, ValueError, NotImplementedError):
        return [max(1, height * width // (28 * 28)) for height, width in sizes]  # 28x28 pixels per token


def plan_batches(entries, lengths, batch_size, max_tokens_per_batch=None, max_padding=MAX_PADDING):
    """Group items into batches of one modality with little padding.

    Args:
        entries (`list[tuple[int, str | None, PIL.Image | None]]`): `(index, text, image)` per item.
        lengths (`list[int]`): estimated tokens per entry (`estimate_tokens`).
        batch_size (`int`): most items per batch.
        max_tokens_per_batch (`int`, *optional*): most padded tokens per batch (items x longest);
            an item longer than this is a batch of its own.
        max_padding (`float`): a batch closes before its padded tokens exceed `1 + max_padding`
            times its real tokens.

    Returns:
        `list[list[entry]]`, covering every entry once.
    """
    order = sorted(range(len(entries)),
                   key=lambda i: (MODALITY_ORDER[modality(*entries[i][1:])], lengths[i], entries[i][0]))
    batches, batch, real, kind = [], [], 0, None
    for i in order:
        length, item_kind = lengths[i], modality(*entries[i][1:])
        padded = (len(batch) + 1) * length  # sorted ascending: this item is the longest so far
        if batch and (item_kind != kind or len(batch) == batch_size
                      or (max_tokens_per_batch is not None and padded > max_tokens_per_batch)
                      or padded > (1 + max_padding) * (real + length)):
            batches.append(batch)
            batch, real = [], 0
        batch.append(entries[i])
        real, kind = real + length, item_kind
    if batch:
        batches.append(batch)
    return batches


def prefetch(function, batches, depth=2):
    """Yield `(batch, function(batch))` in order, computing up to `depth` batches ahead in a worker thread.

    An exception raised by `function` is raised here, at its batch.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unime-encode-prefetch") as pool:
        pending = []
        iterator = iter(batches)
        for batch in iterator:
            pending.append((batch, pool.submit(function, batch)))
            if len(pending) > depth:
                break
        while pending:
            batch, future = pending.pop(0)
            next_batch = next(iterator, None)
            if next_batch is not None:
                pending.append((next_batch, pool.submit(function, next_batch)))
            yield batch, future.result()
