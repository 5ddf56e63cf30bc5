"""Stage 1 of UniME: textual discriminative knowledge distillation (DESIGN.md §4.1).

The MLLM's language model alone ("decoupled" from the vision tower) learns to reproduce a text
teacher's batch-wise similarity distributions. Teacher embeddings come from an offline cache
(`training.teacher`), joined to the texts by `training.data.load_distillation_dataset`; the student
sees each text wrapped in the backbone's summary text prompt and is pooled at the prompt's last
token. Only LoRA adapters on the language model train; the vision tower and projector never run
(there are no pixel inputs) and are frozen.

Example::

    config = DistillationConfig(output_dir="out", per_device_train_batch_size=32, learning_rate=5e-4)
    dataset = load_distillation_dataset("nli.jsonl", "teacher_cache.safetensors")
    model = UniMEModel.from_backbone(backbone, **student_loading_kwargs(config))
    trainer = UniMEDistillationTrainer(model=model, args=config, processor=processor, train_dataset=dataset)
    trainer.train()  # adapters via trainer.save_model(); merged checkpoint in out/merged
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checks import check_bool, check_int
from .data import DistillationCollator
from .distributed import gather_with_grad
from .gradcache import embed
from .losses import (
    KD_DIRECTIONS,
    _check_temperature,
    distillation_loss,
    matryoshka_loss,
)
from .trainer_base import UniMETrainerBase, UniMETrainingConfig

# Parameter-name marker of the language model inside every supported backbone's base model.
LANGUAGE_MODEL_MARKER = "language_model."


@dataclass
class DistillationConfig(UniMETrainingConfig):
    """`TrainingArguments` + LoRA settings (see `UniMETrainingConfig`) + the stage-1 KD settings.

    The KD similarity matrix spans one micro-batch on every rank: `per_device_train_batch_size x
    (text columns per row) x world size` texts. Gradient accumulation averages the losses of several
    such matrices; it does not make one larger matrix (the KD loss over a batch is not a sum over
    rows, so a larger matrix needs the memory of a larger micro-batch).
    """

    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (paper stage 1: 32); 0 trains the model as given."})
    kd_temperature: float = field(
        default=0.02, metadata={"help": "tau dividing the cosine similarities of both matrices."}
    )
    kd_direction: str = field(
        default="forward",
        metadata={"help": "'forward': KL(P_teacher || P_student) (conventional KD); 'reverse': KL(P_student || "
                          "P_teacher), as printed in the paper (Eq. 2)."},
    )
    kd_mask_diagonal: bool = field(
        default=True, metadata={"help": "Drop each text's self-similarity from both distributions."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens of each text before the prompt template is added; longer texts are "
                          "cut so the template's last token (the pooled one) is always kept. None: no limit."},
    )
    use_qlora: bool = field(
        default=False,
        metadata={"help": "Train LoRA on a 4-bit (NF4) quantised model (QLoRA, as the paper); needs bitsandbytes "
                          "and a model loaded with `student_loading_kwargs(config)`."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kd_direction not in KD_DIRECTIONS:
            raise ValueError(f"kd_direction={self.kd_direction!r}; expected one of {KD_DIRECTIONS}")
        _check_temperature(self.kd_temperature, "kd_temperature")  # the loss's own check, named for the field
        check_bool("kd_mask_diagonal", self.kd_mask_diagonal)
        check_int("max_length", self.max_length, optional=True)
        check_bool("use_qlora", self.use_qlora)
        if self.lora_scope != "language_model":
            raise ValueError(
                f"lora_scope={self.lora_scope!r}: stage 1 runs the language model only (the vision tower "
                "never sees an input), so LoRA must stay on the language model (lora_scope='language_model')"
            )


def student_loading_kwargs(config: DistillationConfig) -> dict:
    """`UniMEModel.from_backbone` keyword arguments for `config`: the weight dtype and, with
    `use_qlora`, a 4-bit NF4 `quantization_config` placed on this process's device.

    Raises:
        ImportError: `use_qlora` is set but bitsandbytes is not installed.
    """
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    if not config.use_qlora:
        return {"dtype": dtype}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "use_qlora=True needs the bitsandbytes package (pip install bitsandbytes, CUDA only); "
            "install it or set use_qlora=False to train LoRA on unquantised weights"
        )
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    # One full copy per process (DDP), on the process's own GPU.
    return {"dtype": dtype, "quantization_config": quantization, "device_map": {"": PartialState().local_process_index}}


def freeze_outside_language_model(model: torch.nn.Module) -> list[str]:
    """Freeze every parameter outside the language model (vision tower, projector); return their names."""
    frozen = []
    for name, parameter in model.named_parameters():
        if LANGUAGE_MODEL_MARKER not in name:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def is_quantized_4bit(model: torch.nn.Module) -> bool:
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


class DistillationDataCollator:
    """Rows of `load_distillation_dataset` -> the UniME processor's text inputs + teacher embeddings.

    Texts are flattened row-major by `DistillationCollator` and wrapped in the backbone's summary
    text prompt (`processor(text=texts)`); no pixel inputs are produced, so the vision tower never runs.

    Args:
        processor: the model's [`UniMEProcessor`].
        columns: text columns to take from each row (default: every column with teacher embeddings).
        max_length: maximum tokens of each text before the prompt is added (None: no limit).

    Returns (from `__call__`):
        `{"input_ids": [n, seq], "attention_mask": [n, seq], ... processor outputs,
        "teacher_embeddings": float32 [n, d_t]}` with `n = rows x columns`.
    """

    def __init__(self, processor, columns: Sequence[str] | None = None, max_length: int | None = None):
        self.processor = processor
        self.collate_texts = DistillationCollator(columns)
        self.max_length = max_length

    def __call__(self, rows):
        batch = self.collate_texts(rows)
        inputs = self.processor(text=self.truncate(batch["texts"]))
        return {**inputs, "teacher_embeddings": batch["teacher_embeddings"]}

    def truncate(self, texts: list[str]) -> list[str]:
        """Cut each text to `max_length` tokens *before* the prompt: truncating the formatted prompt
        would cut its end, which is the pooled token."""
        if self.max_length is None:
            return texts
        tokenizer = self.processor.tokenizer
        token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [
            tokenizer.decode(ids[: self.max_length]) if len(ids) > self.max_length else text
            for text, ids in zip(texts, token_ids)
        ]


def similarity_stats(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cheap diagnostics of one KD batch: `[N, d_s]`, `[N, d_t]` -> floats.

    `kd_similarity_pearson`: Pearson correlation of the off-diagonal entries of the two cosine
    similarity matrices (1 = the student orders and spaces pairs exactly as the teacher);
    `kd_student_mean_similarity` / `kd_teacher_mean_similarity`: their means (a collapsing student
    drifts towards 1); `kd_rows`: N, the number of texts in the similarity matrix.
    """
    with torch.no_grad():
        n = student.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
        s = (student.float() @ student.float().T)[off_diagonal]
        t = (teacher.float() @ teacher.float().T)[off_diagonal]
        s_centred, t_centred = s - s.mean(), t - t.mean()
        pearson = (s_centred * t_centred).sum() / (s_centred.norm() * t_centred.norm()).clamp_min(1e-12)
        return {
            "kd_similarity_pearson": pearson.item(),
            "kd_student_mean_similarity": s.mean().item(),
            "kd_teacher_mean_similarity": t.mean().item(),
            "kd_rows": float(n),
        }


class UniMEDistillationTrainer(UniMETrainerBase):
    """`Trainer` for UniME stage 1: LoRA on the language model, KD loss over the gathered batch.

    Each step embeds the micro-batch's texts (`[n, d_s]`, last-token pooled, L2-normalised), gathers
    student and teacher embeddings from all ranks with gradient (`gather_with_grad`), and applies
    `distillation_loss` to the `[N, N]` similarity matrices, `N = n x world size`. The gather's
    backward sums over ranks, so DDP's averaging yields the single-process gradient of the global
    micro-batch loss and no world-size scaling is applied. With gradient accumulation the Trainer
    divides each micro-batch loss by the number of accumulation steps (see `DistillationConfig`).

    Args:
        model: a [`UniMEModel`] (without adapters; `args.lora_rank > 0` adds them).
        args: a [`DistillationConfig`].
        processor: the model's [`UniMEProcessor`].
        data_collator: default `DistillationDataCollator(processor, max_length=args.max_length)`.
        **kwargs: `train_dataset` (from `load_distillation_dataset`), `eval_dataset`, callbacks, ...
    """

    # The KD loss is a mean over one micro-batch's rows: the Trainer must divide it for accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args=None, processor=None, data_collator=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("UniMEDistillationTrainer needs a model (a UniMEModel)")
        model = self._prepare_student(model, args)
        if data_collator is None and processor is not None:
            data_collator = DistillationDataCollator(processor, max_length=args.max_length)
        super().__init__(model=model, args=args, processor=processor, data_collator=data_collator, **kwargs)

    @staticmethod
    def _prepare_student(model, args):
        freeze_outside_language_model(model)
        if args.use_qlora:
            if not is_quantized_4bit(model):
                raise ValueError(
                    "use_qlora=True but the model has no 4-bit layers; load it with "
                    "UniMEModel.from_backbone(path, **student_loading_kwargs(config))"
                )
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        if args.gradient_checkpointing or args.activation_checkpointing:
            # Reentrant checkpointing needs an input that requires grad; the embeddings are frozen.
            model.enable_input_require_grads()
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """KD loss of one micro-batch gathered over ranks; `inputs` are the collator's outputs."""
        inputs = dict(inputs)
        teacher = inputs.pop("teacher_embeddings")
        student = embed(model, inputs)  # [n, d_s]
        student_all = gather_with_grad(student)  # [N, d_s]
        teacher_all = gather_with_grad(teacher.to(student.device))  # [N, d_t]
        def kd_loss(student_embeddings):
            return distillation_loss(
                student_embeddings,
                teacher_all,
                temperature=self.args.kd_temperature,
                mask_diagonal=self.args.kd_mask_diagonal,
                direction=self.args.kd_direction,
            )

        if self.args.matryoshka_dims:
            # Only the student is cut: the KD loss compares N x N similarity matrices, whatever d.
            loss, _ = matryoshka_loss(kd_loss, (student_all,), self.args.matryoshka_dims,
                                      self.args.matryoshka_weights)
        else:
            loss = kd_loss(student_all)
        if model.training:
            self.record_stats(similarity_stats(student_all, teacher_all))
        return (loss, {"embeddings": student}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the KD loss of the batch (there are no labels or logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
