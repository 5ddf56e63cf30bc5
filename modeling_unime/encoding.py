"""`encode`: lists of texts, images and image+text items in, one embedding tensor out."""

import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .batching import estimate_tokens, plan_batches, prefetch
from .inputs import normalize_item

logger = logging.get_logger(__name__)


# `encode` may run from several threads on one model (e.g. an evaluation thread while training): the
# model is put in eval mode once for all concurrent calls and its own mode restored by the last to leave.
_MODE_LOCK = threading.Lock()

OUTPUT_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantize(embeddings, precision):
    """`[N, D]` float numpy array -> `precision`, by sentence-transformers' `quantize_embeddings` rules.

    `int8`/`uint8` use per-dimension ranges taken from `embeddings` itself (256 equal buckets between each
    dimension's min and max); `binary`/`ubinary` pack `embedding > 0` into bits, `[N, ceil(D / 8)]`.
    sentence-transformers' own function is used where it is installed.
    """
    if precision == "float32":
        return embeddings.astype(np.float32)
    try:
        from sentence_transformers import quantize_embeddings
    except ImportError:
        quantize_embeddings = None
    if quantize_embeddings is not None:
        return quantize_embeddings(embeddings, precision=precision)
    if precision.endswith("int8"):
        if embeddings.shape[0] < 2:
            raise ValueError(f"precision={precision!r} needs at least 2 embeddings to compute its ranges")
        starts = embeddings.min(axis=0)
        steps = (embeddings.max(axis=0) - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)


def _check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check_device(device):
    """`device` as a `torch.device`, or `ValueError` naming it, before any item is embedded."""
    if device is None:
        return None
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"device={device!r} is not a usable torch device ({error})") from None
    return device


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
        prompt_name=None,
        normalize_embeddings=None,
        convert_to_numpy=None,
        convert_to_tensor=None,
        device="cpu",
        max_length=None,
        truncate_dim=None,
        precision="float32",
        max_tokens_per_batch=None,
    ):
        """Embed texts, images and image+text items, in any mix.

        Args:
            items (`list`): each item is a `str` (text, always; even when a file of that name exists), a
                `PIL.Image` or `pathlib.Path` (image), or a dict `{"image": ..., "text": ...}` (fused).
                A single item is accepted too.
            processor ([`UniMEProcessor`], *optional*): defaults to the model's own (`model.processor`,
                loaded from the checkpoint the model came from).
            batch_size (`int`): items per forward pass.
            show_progress_bar (`bool`, *optional*): defaults to showing it when there are more than 4 batches.
            prompt_style (`str`): `"summary"` (UniME templates) or `"instruction"` (raw MMEB text).
            instruction (`str`, *optional*): MMEB-style instruction put before each item.
            prompt_name (`str`, *optional*): use `config.prompts[prompt_name]` as the instruction (`"query"`,
                `"document"`); an empty prompt means no instruction.
            normalize_embeddings (`bool`, *optional*): L2-normalise the output; `False` returns the raw
                pooled hidden state. Defaults to `config.normalize`.
            convert_to_numpy (`bool`, *optional*): return a numpy array (`False` with `convert_to_tensor=False`:
                a list of 1-D tensors).
            convert_to_tensor (`bool`, *optional*): return one tensor; wins over `convert_to_numpy`. The
                default, when neither is given, is a tensor.
            device (`str` or `torch.device`, *optional*): where a returned tensor lives; `None` keeps the
                model's device.
            max_length (`int`, *optional*): longest formatted input in tokens; a longer item's *text* is cut
                (the prompt template and images are kept whole). Defaults to `config.max_sequence_length`.
            truncate_dim (`int`, *optional*): keep the first `truncate_dim` dimensions (re-normalised when
                normalising), e.g. one of `config.matryoshka_dims`.
            precision (`str`): `"float32"`, `"int8"`, `"uint8"`, `"binary"` or `"ubinary"` (quantised with
                sentence-transformers' rules; not float32 implies a numpy array).
            max_tokens_per_batch (`int`, *optional*): most padded language-model tokens (image tokens
                included) per forward pass. Batches hold items of one modality and similar length, so
                padded tokens stay within 5% of the real ones (`modeling_unime.batching`).

        Returns:
            `[num_items, dim]` in the input order (`[dim]` for a single item), `dim` = `truncate_dim` or
            `config.text_hidden_size` (`ceil(dim / 8)` for the binary precisions). An empty list gives `[0, dim]`.
        """
        single = not isinstance(items, (list, tuple))
        items = [items] if single else list(items)
        _check_positive_int(batch_size, "batch_size")
        _check_positive_int(max_length, "max_length", allow_none=True)
        _check_positive_int(max_tokens_per_batch, "max_tokens_per_batch", allow_none=True)
        truncate_dim = self._checked_truncate_dim(truncate_dim)
        if precision not in OUTPUT_PRECISIONS:
            raise ValueError(f"precision={precision!r}; expected one of {OUTPUT_PRECISIONS}")
        device = _check_device(device)
        instruction = self._instruction(instruction, prompt_name)
        if normalize_embeddings is None:
            normalize_embeddings = self.config.normalize
        dim = truncate_dim or self.config.text_hidden_size
        if items:
            result = self._embed(items, processor, batch_size, show_progress_bar, prompt_style, instruction,
                                 max_length or self.config.max_sequence_length, max_tokens_per_batch)
        else:
            result = torch.zeros(0, dim)
        result = result[:, :dim]
        if normalize_embeddings:
            result = F.normalize(result, p=2, dim=-1)
        if precision != "float32":
            result = quantize(result.cpu().numpy(), precision)
            return result[0] if single else result
        if device is not None:
            result = result.to(device)
        result = result[0] if single else result
        if convert_to_tensor or (convert_to_tensor is None and convert_to_numpy is None):
            return result
        if convert_to_numpy is not False:
            return result.cpu().numpy()
        return list(result) if not single else result

    def _checked_truncate_dim(self, truncate_dim):
        if truncate_dim is None:
            return None
        width = self.config.text_hidden_size
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= width:
            raise ValueError(f"truncate_dim must be an int in [1, {width}] (the embedding width), got {truncate_dim!r}")
        trained = getattr(self.config, "matryoshka_dims", None)
        if trained and truncate_dim != width and truncate_dim not in trained:
            raise ValueError(f"truncate_dim={truncate_dim} is not one of the dimensions this model was trained for "
                             f"(config.matryoshka_dims={list(trained)}), nor the full width {width}")
        return truncate_dim

    def _instruction(self, instruction, prompt_name):
        if prompt_name is None:
            return instruction
        if instruction is not None:
            raise ValueError("pass either instruction= or prompt_name=, not both")
        prompts = getattr(self.config, "prompts", None) or {}
        if prompt_name not in prompts:
            raise ValueError(f"prompt_name={prompt_name!r} is not in config.prompts (names: {sorted(prompts)})")
        return prompts[prompt_name] or None

    def _embed(self, items, processor, batch_size, show_progress_bar, prompt_style, instruction, max_length,
               max_tokens_per_batch=None):
        """The raw pooled states `[len(items), hidden_size]` (float32, model device), in input order."""
        processor = processor if processor is not None else self.processor
        placeholders = processor.placeholder_tokens()
        if instruction is not None:
            processor.validate_text(instruction, "instruction", placeholders)
        entries = [self._checked_item(item, i, processor, placeholders) for i, item in enumerate(items)]
        lengths = estimate_tokens(processor, entries, prompt_style, instruction)
        batches = plan_batches(entries, lengths, batch_size, max_tokens_per_batch)
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 4
        embeddings = [None] * len(items)

        def prepare(batch):
            return self._batch_inputs(batch, processor, prompt_style, instruction, max_length)

        start, done = time.perf_counter(), 0
        with self._eval_mode(), torch.inference_mode(), \
                tqdm(total=len(batches), desc="encode", disable=not show_progress_bar) as bar:
            # Preprocessing of the next batches runs in a worker thread during this batch's forward.
            for batch, inputs in prefetch(prepare, batches):
                for (index, _, _), embedding in zip(batch, self._encode_batch(inputs)):
                    embeddings[index] = embedding
                done += len(batch)
                bar.set_postfix(items_per_s=f"{done / (time.perf_counter() - start):.1f}", refresh=False)
                bar.update()
        logger.debug(f"encode: {done} items in {len(batches)} batches, {done / (time.perf_counter() - start):.1f} items/s")
        result = torch.stack(embeddings).float()
        not_finite = (~torch.isfinite(result).all(dim=1)).nonzero().flatten().tolist()
        if not_finite:
            raise ValueError(f"items {not_finite} have non-finite embeddings (NaN or inf): the model's weights or "
                             "its dtype's range are broken; nothing was returned")
        return result

    @contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout) for the duration; the model's own mode is restored by the last caller out."""
        with _MODE_LOCK:
            depth = self.__dict__.get("_encode_depth", 0)
            if depth == 0:
                self.__dict__["_encode_was_training"] = self.training
                self.eval()
            self.__dict__["_encode_depth"] = depth + 1
        try:
            yield
        finally:
            with _MODE_LOCK:
                self.__dict__["_encode_depth"] -= 1
                if self.__dict__["_encode_depth"] == 0:
                    self.train(self.__dict__.pop("_encode_was_training"))

    @staticmethod
    def _checked_item(item, index, processor, placeholders):
        text, image = normalize_item(item, index)
        if text is not None:
            processor.validate_text(text, f"item {index}", placeholders)
        if image is not None:
            processor.validate_image(image, f"item {index}")
        return index, text, image

    def _batch_inputs(self, batch, processor, prompt_style, instruction, max_length):
        """Processor output (CPU tensors) for one batch of `(index, text, image)` entries; texts cut to `max_length`."""
        texts = [text for _, text, _ in batch]
        images = [image for _, _, image in batch]
        return processor(
            text=None if all(t is None for t in texts) else texts,
            images=None if all(i is None for i in images) else images,
            prompt_style=prompt_style,
            instruction=instruction,
            truncation=max_length is not None,
            max_length=max_length,
            item_names=[f"item {index}" for index, _, _ in batch],
        )

    def _encode_batch(self, inputs):
        """Raw pooled states `[batch_size, hidden_size]` of one processor batch, on the model's device."""
        inputs = {
            key: value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            if torch.is_tensor(value) else value
            for key, value in inputs.items()
        }
        return self(**inputs, normalize=False).embeddings

    def encode_query(self, items, **kwargs):
        """`encode` with the `"query"` prompt of `config.prompts` (an MMEB-style retrieval instruction by default)."""
        kwargs.setdefault("prompt_name", "query")
        return self.encode(items, **kwargs)

    def encode_document(self, items, **kwargs):
        """`encode` with the `"document"` prompt of `config.prompts` (no instruction by default)."""
        kwargs.setdefault("prompt_name", "document")
        return self.encode(items, **kwargs)

    def encode_text(self, texts, processor=None, **kwargs):
        """`encode` for a list of strings; `TypeError` naming the first non-string item."""
        if not isinstance(texts, (str, list, tuple)):
            raise TypeError(f"encode_text expects a str or a list of str, got {type(texts).__name__}")
        for index, text in enumerate([texts] if isinstance(texts, str) else texts):
            if not isinstance(text, str):
                raise TypeError(f"item {index}: encode_text expects str, got {type(text).__name__}")
        return self.encode(texts, processor=processor, **kwargs)

    def encode_image(self, images, processor=None, **kwargs):
        """`encode` for a list of `PIL.Image`s or image paths."""
        single = isinstance(images, (Image.Image, str)) or hasattr(images, "__fspath__")
        items = [images] if single else list(images)
        for index, image in enumerate(items):
            if image is None or not isinstance(image, (Image.Image, str)) and not hasattr(image, "__fspath__"):
                raise TypeError(f"item {index}: encode_image expects a PIL.Image or a path, got {type(image).__name__}")
        items = [{"image": image} for image in items]
        result = self.encode(items, processor=processor, **kwargs)
        return result[0] if single else result

    @staticmethod
    def similarity(embeddings_a, embeddings_b):
        """Cosine similarity matrix: `[N, D]` x `[M, D]` -> `[N, M]` (1-D inputs count as one row).

        Accepts tensors, numpy arrays or lists of floats; `TypeError`/`ValueError` saying what it got otherwise.
        """
        a = _as_embeddings(embeddings_a, "embeddings_a")
        b = _as_embeddings(embeddings_b, "embeddings_b")
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"similarity needs embeddings of one width: embeddings_a is {tuple(a.shape)}, "
                             f"embeddings_b is {tuple(b.shape)}")
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _as_embeddings(value, name):
    """`[N, D]` float tensor from a tensor, numpy array or list of floats (1-D counts as one row)."""
    if isinstance(value, (str, bytes)) or isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        raise TypeError(f"{name}: similarity compares embeddings, got text; embed it with encode first")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name}: expected a tensor, numpy array or list of floats, got {type(value).__name__}") from error
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8)) or tensor.dim() not in (1, 2):
        raise ValueError(f"{name}: expected [N, D] or [D] float embeddings, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
