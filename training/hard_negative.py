"""Stage 2 trainer: hard-negative-enhanced instruction tuning (DESIGN §4.2), optionally with GradCache.

    model, processor = ...  # a UniMEModel, best with the stage-1 LoRA merged in
    args = HardNegativeConfig("out", per_device_train_batch_size=128, gradcache_chunk_size=8, ...)
    train = load_mmeb_train("TIGER-Lab/MMEB-train", subsets=[...], num_sample_per_subset=50_000)
    collator = MMEBCollator(processor, image_root="MMEB-train", image_size=args.image_size,
                            chunk_size=args.gradcache_chunk_size, max_length=args.max_length)
    trainer = UniMEHardNegativeTrainer(model, args, processor=processor, train_dataset=train,
                                       data_collator=collator)
    trainer.train()
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType

from .checks import check_int
from .distributed import gather_with_grad
from .gradcache import embed, gradcache_step
from .losses import (
    _check_margin,
    _check_num_hard_negatives,
    _check_temperature,
    hard_negative_infonce_loss,
    matryoshka_loss,
)
from .mmeb_data import MMEBCollator
from .trainer_base import UniMETrainerBase, UniMETrainingConfig


@dataclass
class HardNegativeConfig(UniMETrainingConfig):
    """`TrainingArguments` for stage 2. With GradCache, `per_device_train_batch_size` is the whole
    contrastive batch of this process (global batch = per-device batch x processes; gradient
    accumulation adds steps, not negatives)."""

    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (paper stage 2: 16)."})
    contrastive_temperature: float = field(
        default=0.02, metadata={"help": "tau dividing the cosine similarities (released code: 0.02)."}
    )
    num_hard_negatives: int | None = field(
        default=8,
        metadata={"help": "k hardest in-batch negatives per query (paper: 8); None = plain in-batch InfoNCE."},
    )
    false_negative_margin: float | None = field(
        default=0.1,
        metadata={"help": "beta: negatives scoring above sim(positive) + beta are dropped (paper: 0.1); None = off."},
    )
    gradcache_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache chunk size (items per forward); None = plain backprop over the batch."},
    )
    gradcache_max_tokens: int | None = field(
        default=None,
        metadata={"help": "GradCache: also close a chunk before its padded LM tokens (image tokens included) "
                          "exceed this, so one long item cannot blow a chunk's memory; None = items only."},
    )
    image_size: int | None = field(
        default=336, metadata={"help": "Images are resized to image_size x image_size (paper: 336); None = as is."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Cut each text to this many tokens (image tokens not counted)."}
    )
    ddp_broadcast_buffers: bool | None = field(
        default=False,
        metadata={"help": "Kept False: GradCache runs a data-dependent number of forwards per step, and a "
                          "buffer broadcast in each DDP forward would deadlock ranks with unequal chunk counts. "
                          "UniME backbones have no trained buffers."},
    )

    def __post_init__(self):
        super().__post_init__()
        # The loss's own checks, so the config refuses exactly what the loss would refuse mid-training.
        _check_temperature(self.contrastive_temperature, "contrastive_temperature")
        _check_num_hard_negatives(self.num_hard_negatives)
        _check_margin(self.false_negative_margin)
        for name in ("gradcache_chunk_size", "gradcache_max_tokens", "image_size", "max_length"):
            check_int(name, getattr(self, name), optional=True)
        if self.gradcache_max_tokens is not None and self.gradcache_chunk_size is None:
            raise ValueError("gradcache_max_tokens bounds GradCache chunks: set gradcache_chunk_size too")


class UniMEHardNegativeTrainer(UniMETrainerBase):
    """Stage-2 `Trainer`: `hard_negative_infonce_loss` on the batch gathered from all processes.

    Batches are `{"query": ..., "target": ...}` from [`MMEBCollator`] (built from the config when no
    `data_collator` is given). Row i of the targets is the positive of query i; the negatives are
    the other targets of the global batch.

    Without GradCache, `compute_loss` embeds queries and targets with autograd, gathers them with
    `gather_with_grad` and computes the loss. With `gradcache_chunk_size`, `training_step` runs
    `training.gradcache.gradcache_step` over the collator's chunks instead (same gradients, memory
    of one chunk).

    The loss statistics (`mean_positive_similarity`, `mean_hard_negative_similarity`,
    `false_negative_fraction`, `rows_with_false_negatives_fraction` - the paper's FalseNeg% -,
    `rows_short_of_k`, `rows_without_negatives`; means over the micro-batches since the last log) and
    `skipped_pairs` (their total since the last log) are logged at every logging step.

    Multi-process note: without GradCache, queries and targets are two forwards before one
    backward. That is fine under DDP as long as both forwards use the same trainable parameters,
    which holds for the default `lora_scope="language_model"`. With `lora_scope="all"` (vision LoRA)
    and text-only targets, use GradCache or set `ddp_find_unused_parameters=False`.
    """

    # The loss is not divided by the number of tokens; Trainer scales it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args=None, processor=None, data_collator=None, **kwargs):
        if not isinstance(args, HardNegativeConfig):
            raise TypeError(f"args must be a HardNegativeConfig, got {type(args).__name__}")
        if data_collator is None and processor is not None:
            data_collator = MMEBCollator(processor, image_size=args.image_size, chunk_size=args.gradcache_chunk_size,
                                         max_length=args.max_length, max_tokens_per_chunk=args.gradcache_max_tokens)
        super().__init__(model=model, args=args, processor=processor, data_collator=data_collator, **kwargs)
        self.num_skipped_pairs = 0

    def contrastive_loss(self, query, target):
        """`hard_negative_infonce_loss` with this run's settings: `[B, D]` x 2 -> `(loss, stats)`.

        With `matryoshka_dims`, the weighted sum of the loss over the re-normalised prefixes
        (`matryoshka_loss`); the stats are those of the largest dim. GradCache uses this function as
        its loss, so its gradients stay those of the whole sum.
        """
        def loss_at(query_d, target_d):
            return hard_negative_infonce_loss(
                query_d,
                target_d,
                temperature=self.args.contrastive_temperature,
                num_hard_negatives=self.args.num_hard_negatives,
                false_negative_margin=self.args.false_negative_margin,
            )

        if not self.args.matryoshka_dims:
            return loss_at(query, target)
        loss, per_dim = matryoshka_loss(loss_at, (query, target), self.args.matryoshka_dims,
                                        self.args.matryoshka_weights)
        return loss, per_dim[self.args.matryoshka_dims[-1]][1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_skipped(inputs, model.training)
        query = gather_with_grad(_embed_all(model, inputs["query"]))
        target = gather_with_grad(_embed_all(model, inputs["target"]))
        loss, stats = self.contrastive_loss(query, target)
        if model.training:
            self.record_stats(stats.to_dict())
        return (loss, {"query": query, "target": target}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradcache_chunk_size is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._count_skipped(inputs, training=True)
        # Trainer divides each micro-batch's loss by the accumulation steps before backward.
        scale = 1.0 / self.current_gradient_accumulation_steps
        # Chunks go to the device one at a time (gradcache_step), not the whole batch's images at once.
        loss, stats = gradcache_step(
            model,
            _as_chunks(inputs["query"], "query"),
            _as_chunks(inputs["target"], "target"),
            self.contrastive_loss,
            backward=self._backward,
            no_sync=lambda: _no_gradient_sync(self.accelerator, model),
            loss_scale=scale,
            prepare=self._prepare_input,
        )
        self.record_stats(stats.to_dict())
        return self.check_finite_loss((loss * scale).detach())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the contrastive loss of the batch only (no logits or labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _backward(self, surrogate):
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        self.accelerator.backward(surrogate, **kwargs)

    def _count_skipped(self, inputs, training):
        if not training or "num_skipped" not in inputs:
            return
        skipped = int(inputs["num_skipped"])
        self.num_skipped_pairs += skipped
        self.record_totals({"skipped_pairs": skipped})


def _embed_all(model, batch) -> torch.Tensor:
    """`[N, D]` embeddings of one processor batch or of a list of chunks."""
    if isinstance(batch, Mapping):
        return embed(model, batch)
    return torch.cat([embed(model, chunk) for chunk in batch])


def _as_chunks(batch, name):
    if isinstance(batch, Mapping):
        raise ValueError(
            f"gradcache_chunk_size is set but the collator returned one unchunked {name!r} batch; build the "
            "collator with chunk_size=args.gradcache_chunk_size (MMEBCollator) so each chunk is processed apart"
        )
    return list(batch)


@contextlib.contextmanager
def _no_gradient_sync(accelerator, model):
    """Accumulate this chunk's gradients locally: DDP/FSDP `no_sync`; for DeepSpeed, not a
    gradient-accumulation boundary (so its engine neither reduces nor steps)."""
    previous = accelerator.gradient_state.sync_gradients
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(previous)
