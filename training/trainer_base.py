"""What both UniME trainers share: LoRA fields, LoRA setup (seeded), logging of loss statistics, merged
saves with the stage recorded for the model card, atomic checkpoints, resuming (`"true"` or a folder;
no silent overwrite of an earlier run's checkpoints) and a stop on a non-finite loss."""

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments, enable_full_determinism, set_seed
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    align_special_tokens,
    get_last_checkpoint,
    rotate_checkpoints,
)
from transformers.utils import logging as transformers_logging

from modeling_unime.atomic import publish_directory, recover

from .checks import check_bool, check_int, check_number
from .lora import (
    LANGUAGE_MODEL_LINEAR_LAYERS,
    LORA_SCOPES,
    add_lora,
    save_merged_model,
    unwrap_unime,
    write_adapter_checkpoint_config,
)
from .losses import check_matryoshka, record_matryoshka_dims
from .publishing import push_merged_model, record_training_stage, trainer_stage_record


def _record_base_model_absolutely(model):
    """A model loaded from a relative local path records that path (`name_or_path`), and peft copies it
    into every checkpoint's `adapter_config.json`: make it absolute, so a checkpoint loads from any
    directory. Hub ids and models built from a config are left as they are."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name and not os.path.isabs(name) and os.path.isdir(name):
        model.name_or_path = model.config._name_or_path = os.path.abspath(name)


def _align_special_tokens_quietly(model, processor):
    """What `Trainer.__init__` does (copy the tokenizer's PAD/BOS/EOS ids into the model's configs),
    without its notice: the notice is about generation, and an embedding model never generates."""
    logger = transformers_logging.get_logger("transformers.trainer_utils")
    level = logger.level
    logger.setLevel(transformers_logging.ERROR)
    try:
        align_special_tokens(model, processor)
    finally:
        logger.setLevel(level)


@dataclass
class UniMETrainingConfig(TrainingArguments):
    """`TrainingArguments` plus the LoRA and saving settings of both UniME stages."""

    lora_rank: int = field(default=16, metadata={"help": "LoRA rank; 0 trains the model as given (no new adapters)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    matryoshka_dims: list[int] | None = field(
        default=None,
        metadata={"help": "Matryoshka prefix sizes, strictly increasing, e.g. [64, 128, 256, 512, D]: the loss is "
                          "summed over the first d dims of the embeddings, re-normalised (None = off)."},
    )
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per Matryoshka dim (default: 1.0 each, as in MRL)."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LANGUAGE_MODEL_LINEAR_LAYERS),
        metadata={"help": "Names of the linear layers that get LoRA adapters."},
    )
    lora_scope: str = field(
        default="language_model",
        metadata={"help": "'language_model' (adapt the LLM only) or 'all' (also every linear layer of the vision tower and projector)."},
    )
    save_merged_model: bool = field(
        default=True,
        metadata={"help": "At the end of training, also save the LoRA-merged model as a full UniME checkpoint "
                          "in `<output_dir>/merged` (loads with AutoModel + trust_remote_code)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the UniME collators need the raw text/image columns."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.matryoshka_dims is not None:
            self.matryoshka_dims, self.matryoshka_weights = map(list, check_matryoshka(self.matryoshka_dims,
                                                                                      self.matryoshka_weights))
        elif self.matryoshka_weights is not None:
            raise ValueError("matryoshka_weights is set but matryoshka_dims is not")
        check_int("lora_rank", self.lora_rank, minimum=0)
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha, positive=True)
        check_number("lora_dropout", self.lora_dropout)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets or not all(
            isinstance(name, str) and name for name in targets
        ):
            raise TypeError(f"lora_target_modules must be a non-empty list of layer names, got {targets!r}")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"lora_scope={self.lora_scope!r}; expected one of {LORA_SCOPES}")
        check_bool("save_merged_model", self.save_merged_model)


def remove_leftover_staging(run_dir):
    """Clear what jobs killed mid-checkpoint left in `run_dir`: `.checkpoint-N.partial` staging folders and
    the `.checkpoint-N.tmp` / `.checkpoint-N.old` of an interrupted swap (a complete old checkpoint is put back)."""
    if not os.path.isdir(run_dir):
        return
    for entry in sorted(os.listdir(run_dir)):
        if entry.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and entry.endswith(".partial"):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
        elif entry.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and entry.endswith((".tmp", ".old")):
            recover(os.path.join(run_dir, entry[1:].rsplit(".", 1)[0]))


class UniMETrainerBase(Trainer):
    """`Trainer` with LoRA setup, per-step loss statistics in the logs and a merged-model save.

    Subclasses implement `compute_loss` and call `self.record_stats(dict)` with floats to log; the
    means since the last logging step are added to the Trainer's logs (and so to every `report_to`).

    Reliability on top of `Trainer`:
    - a checkpoint is written into a hidden `.checkpoint-N.partial/` folder and renamed to
      `checkpoint-N` only once complete, so a job killed mid-save never leaves a `checkpoint-N` that
      `resume_from_checkpoint=True` (or `from_pretrained`) would half-load;
    - a non-finite loss stops training with a `FloatingPointError` naming the optimizer step and the
      micro-batch, before that step is applied or checkpointed (`Trainer` alone would log a filtered
      loss and step the optimizer with NaN gradients). Resume from the last checkpoint after fixing
      the cause.
    """

    def __init__(self, model=None, args=None, processor=None, **kwargs):
        if processor is None:
            raise ValueError("UniME trainers need the model's UniMEProcessor (processor=...)")
        # Trainer seeds in its __init__, after the LoRA adapters exist: seed first, so that their random
        # initialisation (and so the whole run) is the same for the same seed.
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        if model is not None:
            _record_base_model_absolutely(model)
        if args.lora_rank and args.lora_rank > 0:
            model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             target_modules=tuple(args.lora_target_modules), scope=args.lora_scope)
        if model is not None:
            _align_special_tokens_quietly(model, processor)
        super().__init__(model=model, args=args, processing_class=processor, **kwargs)
        self.processor = processor
        self._stats_sums = defaultdict(float)
        self._stats_counts = defaultdict(int)
        self._totals = defaultdict(int)
        self._checkpoint_staging_dir = None
        self._loss_check_position = (None, 0)  # (global step, micro-batches seen in that step)
        self._stage_to_record = None
        if args.matryoshka_dims:  # the trained prefix sizes travel with the model (encode, exports, card)
            record_matryoshka_dims(self.unime_model(), args.matryoshka_dims)

    def record_stats(self, stats):
        """Accumulate scalar statistics (e.g. mean positive similarity) until the next log."""
        for key, value in stats.items():
            value = float(value)
            if value == value:  # skip NaN (e.g. no negatives in a batch)
                self._stats_sums[key] += value
                self._stats_counts[key] += 1

    def record_totals(self, counts):
        """Accumulate counts (e.g. pairs skipped) until the next log, which shows their sum, not a mean."""
        for key, value in counts.items():
            self._totals[key] += int(value)

    def log(self, logs, start_time=None):
        if (self._stats_counts or self._totals) and "loss" in logs:
            for key, total in self._stats_sums.items():
                logs[key] = round(total / self._stats_counts[key], 6)
            logs.update(self._totals)
            self._stats_sums.clear()
            self._stats_counts.clear()
            self._totals.clear()
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.check_finite_loss(super().training_step(model, inputs, num_items_in_batch))

    def check_finite_loss(self, loss):
        """Return `loss` (a detached scalar) if finite; else raise `FloatingPointError` naming the step.

        Called on every micro-batch. `Trainer` already reads the loss's finiteness on every step
        (`logging_nan_inf_filter`), so this adds no device synchronisation. The loss is computed on
        the batch gathered from all processes, so under DDP every rank raises at the same step.
        """
        step, micro_batch = self._loss_check_position
        micro_batch = micro_batch + 1 if step == self.state.global_step else 1
        self._loss_check_position = (self.state.global_step, micro_batch)
        if torch.isfinite(loss).all():
            return loss
        output_dir = self.args.output_dir
        last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        raise FloatingPointError(
            f"non-finite training loss ({loss.float().mean().item()}) at optimizer step {self.state.global_step + 1} "
            f"(micro-batch {micro_batch} of {self.args.gradient_accumulation_steps} in that step, epoch "
            f"{self.state.epoch or 0:.2f}); training stopped before applying or checkpointing the step. Last "
            f"checkpoint: {last or 'none'}. Look for NaN/Inf in that batch's inputs (e.g. teacher embeddings) or "
            "lower the learning rate / use bf16 or fp32, then resume from the checkpoint."
        )

    def _save_checkpoint(self, model, trial):
        """`Trainer._save_checkpoint`, made atomic: every process writes into
        `<run_dir>/.checkpoint-N.partial/checkpoint-N` (a name `get_last_checkpoint` and checkpoint
        rotation never match), then the saving process renames it to `<run_dir>/checkpoint-N`."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".{name}.partial")
        if self.args.should_save:
            remove_leftover_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish_checkpoint(staging, name, run_dir)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, staging, name, run_dir):
        # Inside super() the run dir was the staging folder: fix what it recorded there.
        best_step = self.state.best_global_step
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}") if best_step else None
        if best is not None and (best_step == self.state.global_step or os.path.isdir(best)):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
        publish_directory(os.path.join(staging, name), os.path.join(run_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir=None, state_dict=None):
        """`Trainer._save`, plus the UniME config and code next to LoRA adapters, so that a checkpoint (or the
        adapters `save_model` writes) loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`
        on its base model, found from any directory or machine (see `write_adapter_checkpoint_config`)."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if not self.args.should_save or not isinstance(model, PeftModel):
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        final_dir = output_dir
        staging = self._checkpoint_staging_dir
        if staging is not None and os.path.dirname(os.path.abspath(output_dir)) == os.path.abspath(staging):
            final_dir = os.path.join(os.path.dirname(os.path.abspath(staging)), os.path.basename(output_dir))
        write_adapter_checkpoint_config(model, output_dir, final_dir)

    def _get_output_dir(self, trial):
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def unime_model(self):
        """The underlying [`UniMEModel`] (LoRA weights not merged)."""
        return unwrap_unime(self.model)

    def save_merged(self, output_dir=None):
        """Save the LoRA-merged model + processor as a standalone UniME checkpoint (atomic).

        The trainer's model keeps its adapters and its weights are untouched (see `merged_state_dict`), so
        training can continue. Call it on every process: under FSDP it gathers the weights from all of them.
        """
        output_dir = output_dir or f"{self.args.output_dir}/merged"
        # FSDP shards the weights: gather them whole onto the main process (a collective: every rank).
        full_state_dict = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None
        if not self.is_world_process_zero():
            return output_dir
        save_merged_model(self.accelerator.unwrap_model(self.model), self.processor, output_dir,
                          full_state_dict=full_state_dict)
        return output_dir

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **kwargs):
        """Push the LoRA-merged model + processor + model card (never the adapters alone).

        `Trainer.push_to_hub` would upload the PEFT adapters; a UniME repo must load with
        `AutoModel.from_pretrained(repo, trust_remote_code=True)`, so the merged model goes up instead.
        Returns the commit info (None on processes other than the main one).
        """

        return push_merged_model(self, token=token, revision=revision, commit_message=commit_message,
                                 tags=kwargs.get("tags"))

    def _push_from_checkpoint(self, checkpoint_folder):
        # Intermediate Trainer checkpoints hold adapters and optimizer state: they stay local, and the
        # Hub repo only ever receives complete merged models (push_to_hub at the end of training).
        return

    def record_stage(self, stage, *, datasets, base_model=None, **extra):
        """Have `train` record this run in the model's `config.unime_training` when it ends (before the
        merged model is saved or pushed), so that their model card says what was trained.

        Args:
            stage (`str`): `"distillation"` or `"hard_negative"`.
            datasets (`list[str]`): Hub ids or paths of the training data.
            base_model (`str`, *optional*): the backbone; ignored when an earlier stage recorded one.
            **extra: further JSON data for the card, e.g. `teacher=...` (see `training.publishing.stage_record`).
        """
        self._stage_to_record = (stage, list(datasets), base_model, extra)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, plus: `resume_from_checkpoint` also takes the strings `"true"`/`"false"` (as
        `--resume_from_checkpoint true` arrives from the command line), a run that would write over the
        checkpoints of an earlier run in `output_dir` without resuming stops with a `ValueError`
        (unless `overwrite_output_dir`), and the merged model is saved at the end (`save_merged_model`)."""
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is None:
            self._refuse_to_overwrite_checkpoints()
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self._stage_to_record is not None:
            stage, datasets, base_model, extra = self._stage_to_record
            record = trainer_stage_record(self, stage, datasets=datasets, **extra)
            record_training_stage(self.unime_model(), record, base_model=base_model)
        if self.args.save_merged_model:
            self.save_merged()
        return output

    def _refuse_to_overwrite_checkpoints(self):
        output_dir = self.args.output_dir
        last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if last is None or getattr(self.args, "overwrite_output_dir", False):
            return
        raise ValueError(
            f"output_dir {output_dir!r} already holds checkpoints of an earlier run (latest: {last}); a new run "
            "would write over them. Pass --resume_from_checkpoint true to continue that run, "
            f"--resume_from_checkpoint {last} to continue from a given checkpoint, or another --output_dir "
            "(or delete the folder) to start over."
        )


def resolve_resume_from_checkpoint(value, output_dir):
    """What `Trainer.train(resume_from_checkpoint=...)` should get for `value`, checked.

    Args:
        value (`str`, `bool` or `None`): a checkpoint folder, `True` / `"true"` (the latest
            `checkpoint-N` in `output_dir`), or `None` / `False` / `"false"` / `""` (start fresh).
        output_dir (`str`): the run's output folder.

    Returns:
        `str` (the checkpoint folder) or `None`.

    Raises:
        ValueError: `true` but `output_dir` holds no `checkpoint-N`. FileNotFoundError: the folder is missing.
    """
    if isinstance(value, str) and value.strip().lower() in ("", "false", "none", "no"):
        value = None
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "latest")):
        last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint=true, but output_dir {output_dir!r} holds no checkpoint-N "
                             "folder to resume from (was save_strategy 'no'?)")
        return last
    path = os.fspath(value)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        what = "is not a folder" if not os.path.isdir(path) else "has no trainer_state.json (not a Trainer checkpoint)"
        raise FileNotFoundError(f"resume_from_checkpoint {path!r} {what}; give a <output_dir>/checkpoint-N folder "
                                "or true for the latest one")
    return path