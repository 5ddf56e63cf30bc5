"""`encode`: lists of texts, images and image+text items in, one embedding tensor out."""

import time

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .batching import estimate_tokens, plan_batches, prefetch
from .inputs import normalize_item

logger = logging.get_logger(__name__)


class EncodeMixin:
    """sentence-transformers-style `encode` for [`UniMEModel`]."""

    def encode(
        self,
        items,
        processor=None,
        batch_size=32,
        show_progress_bar=None,
        prompt_style="summary",
        instruction=None,
        normalize_embeddings=True,
        convert_to_tensor=True,
        device="cpu",
        max_tokens_per_batch=None,
    ):
        """Embed texts, images and image+text items, in any mix.

        Args:
            items (`list`): each item is a `str` (text), a `PIL.Image` or `pathlib.Path` (image), or a
                dict `{"image": ..., "text": ...}` (fused). A single item is accepted too.
            processor ([`UniMEProcessor`]): formats prompts and runs the backbone's processor.
            batch_size (`int`): items per forward pass.
            show_progress_bar (`bool`, *optional*): defaults to showing it when there are more than 4 batches.
            prompt_style (`str`): `"summary"` (UniME templates) or `"instruction"` (raw MMEB text).
            instruction (`str`, *optional*): MMEB-style instruction put before each item.
            normalize_embeddings (`bool`): L2-normalise the output (the model already does when
                `config.normalize`).
            convert_to_tensor (`bool`): `False` returns a numpy array.
            device (`str` or `torch.device`, *optional*): where the returned tensor lives; `None` keeps
                the model's device.
            max_tokens_per_batch (`int`, *optional*): most padded language-model tokens (image tokens
                included) per forward pass. Batches hold items of one modality and similar length, so
                padded tokens stay within 5% of the real ones (`modeling_unime.batching`).

        Returns:
            `torch.FloatTensor` `[num_items, hidden_size]` in the input order (`[hidden_size]` for a single item).
        """
        if processor is None:
            raise ValueError("encode needs the model's UniMEProcessor: model.encode(items, processor=processor)")
        single = not isinstance(items, (list, tuple))
        items = [items] if single else list(items)
        if not items:
            raise ValueError("encode got an empty list of items")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_tokens_per_batch is not None and (not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
            raise ValueError(f"max_tokens_per_batch must be a positive int or None, got {max_tokens_per_batch!r}")
        placeholders = processor.placeholder_tokens()
        if instruction is not None:
            processor.validate_text(instruction, "instruction", placeholders)
        entries = [self._checked_item(item, i, processor, placeholders) for i, item in enumerate(items)]
        lengths = estimate_tokens(processor, entries, prompt_style, instruction)
        batches = plan_batches(entries, lengths, batch_size, max_tokens_per_batch)
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 4
        embeddings = [None] * len(items)
        was_training = self.training
        self.eval()
        try:
            start, done = time.perf_counter(), 0
            with torch.inference_mode(), tqdm(total=len(batches), desc="encode", disable=not show_progress_bar) as bar:
                # Preprocessing of the next batches runs in a worker thread during this batch's forward.
                prepare = lambda batch: self._batch_inputs(batch, processor, prompt_style, instruction)  # noqa: E731
                for batch, inputs in prefetch(prepare, batches):
                    for (index, _, _), embedding in zip(batch, self._encode_batch(inputs)):
                        embeddings[index] = embedding
                    done += len(batch)
                    bar.set_postfix(items_per_s=f"{done / (time.perf_counter() - start):.1f}", refresh=False)
                    bar.update()
            logger.debug(f"encode: {done} items in {len(batches)} batches, "
                         f"{done / (time.perf_counter() - start):.1f} items/s")
        finally:
            self.train(was_training)
        result = torch.stack(embeddings).float()
        if normalize_embeddings:
            result = F.normalize(result, p=2, dim=-1)
        if device is not None:
            result = result.to(device)
        result = result[0] if single else result
        return result if convert_to_tensor else result.cpu().numpy()

    @staticmethod
    def _checked_item(item, index, processor, placeholders):
        text, image = normalize_item(item, index)
        if text is not None:
            processor.validate_text(text, f"item {index}", placeholders)
        if image is not None:
            processor.validate_image(image, f"item {index}")
        return index, text, image

    def _batch_inputs(self, batch, processor, prompt_style, instruction):
        """Processor output for one batch of `(index, text, image)` entries (CPU tensors)."""
        texts = [text for _, text, _ in batch]
        images = [image for _, _, image in batch]
        inputs = processor(
            text=None if all(t is None for t in texts) else texts,
            images=None if all(i is None for i in images) else images,
            prompt_style=prompt_style,
            instruction=instruction,
        )
        self._check_lengths(inputs["attention_mask"], [index for index, _, _ in batch])
        return inputs

    def _encode_batch(self, inputs):
        """Embeddings `[batch_size, hidden_size]` of one processor batch, on the model's device."""
        inputs = {
            key: value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            if torch.is_tensor(value) else value
            for key, value in inputs.items()
        }
        return self(**inputs).embeddings

    def _check_lengths(self, attention_mask, indices):
        max_length = self.config.max_sequence_length
        if max_length is None:
            return
        lengths = attention_mask.sum(dim=1)
        for index, length in zip(indices, lengths.tolist()):
            if length > max_length:
                raise ValueError(
                    f"item {index} is {length} tokens long after formatting; the model accepts at most "
                    f"{max_length} (config.max_length). Shorten the text or the image resolution."
                )

    def encode_text(self, texts, processor=None, **kwargs):
        """`encode` for a list of strings; `TypeError` naming the first non-string item."""
        for index, text in enumerate([texts] if isinstance(texts, str) else texts):
            if not isinstance(text, str):
                raise TypeError(f"item {index}: encode_text expects str, got {type(text).__name__}")
        return self.encode(texts, processor=processor, **kwargs)

    def encode_image(self, images, processor=None, **kwargs):
        """`encode` for a list of `PIL.Image`s or image paths."""
        single = isinstance(images, (Image.Image, str))
        items = [images] if single else list(images)
        for index, image in enumerate(items):
            if image is None or not isinstance(image, (Image.Image, str)) and not hasattr(image, "__fspath__"):
                raise TypeError(f"item {index}: encode_image expects a PIL.Image or a path, got {type(image).__name__}")
        items = [{"image": image} for image in items]
        result = self.encode(items, processor=processor, **kwargs)
        return result[0] if single else result

    @staticmethod
    def similarity(embeddings_a, embeddings_b):
        """Cosine similarity matrix: `[N, D]` x `[M, D]` -> `[N, M]` (1-D inputs count as one row)."""
        a = torch.as_tensor(embeddings_a)
        b = torch.as_tensor(embeddings_b)
        a = a.unsqueeze(0) if a.dim() == 1 else a
        b = b.unsqueeze(0) if b.dim() == 1 else b
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
