"""Publishing a training run: the model-card records of what was trained and evaluated, and the
push of the LoRA-merged model to the Hub.

What the model card says about training and evaluation: records stored in the model's config.

`modeling_unime/model_card.py` renders `config.unime_training` and `config.unime_eval_results`;
this module builds them from a trainer's arguments and state. The records are plain JSON data, so
they are saved in `config.json`, survive `from_pretrained`, and accumulate from stage 1 to stage 2:

```python
record = trainer_stage_record(trainer, "distillation", datasets=["sentence-transformers/all-nli"],
                              teacher="nvidia/NV-Embed-v2")
record_training_stage(trainer.unime_model(), record, base_model="Qwen/Qwen2-VL-2B-Instruct")
record_eval_results(model, {"MMEB": {"average": 0.66}})   # training.evaluation's {task: {metric: value}}
```

Pushing the result of a UniME training run to the Hub: the LoRA-merged model, never adapters alone.

The trainers' `--push_to_hub --hub_model_id` end here. The pushed repo is a standalone UniME
checkpoint (weights with LoRA merged, config with `auto_map`, the modeling code, the processor files,
sentence-transformers files) and its model card, which renders the training stages and evaluation
results recorded in the config (see above).
"""

import copy
import dataclasses
import enum
import json
import numbers
import tempfile
from collections.abc import Mapping
from pathlib import Path

from transformers import Trainer, TrainingArguments

from modeling_unime.hub import create_repo, push_checkpoint
from modeling_unime.model_card import EVAL_ATTRIBUTE, TRAINING_ATTRIBUTE

from .lora import save_merged_model, unwrap_unime

KNOWN_STAGES = ("distillation", "hard_negative")

# The TrainingArguments that make a recipe; the others are plumbing (logging, saving, devices).
RECIPE_ARGUMENTS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "seed",
)
# Fields that UniME configs add to TrainingArguments but that do not change the trained model.
NOT_RECIPE_FIELDS = ("save_merged_model", "remove_unused_columns")


def _json_value(value, where):
    """`value` as JSON data: enums by value, tuples as lists; anything else must already be JSON."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(key): _json_value(item, f"{where}.{key}") for key, item in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON data (str, number, bool, list, dict or None)")


def recipe_hyperparameters(args):
    """The hyper-parameters of `args` (a `TrainingArguments` or a UniME subclass) worth a model card.

    Standard recipe fields (`RECIPE_ARGUMENTS`), every field a UniME config adds to `TrainingArguments`
    (LoRA, loss temperature, hard negatives, ...), the world size and the global batch size
    (`per_device_train_batch_size x gradient_accumulation_steps x world_size`).
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    base_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    names = [name for name in RECIPE_ARGUMENTS if hasattr(args, name)]
    names += [field.name for field in dataclasses.fields(args)
              if field.name not in base_fields and field.name not in NOT_RECIPE_FIELDS]
    hyperparameters = {name: _json_value(getattr(args, name), f"args.{name}") for name in names}
    world_size = int(getattr(args, "world_size", 1) or 1)
    hyperparameters["world_size"] = world_size
    hyperparameters["global_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    )
    return hyperparameters


def stage_record(stage, args, *, datasets, steps=None, epochs=None, num_examples=None, **extra):
    """One entry of `config.unime_training["stages"]`.

    Args:
        stage (`str`): `"distillation"` (stage 1), `"hard_negative"` (stage 2), or another name.
        args (`TrainingArguments`): the stage's training arguments.
        datasets (`list[str]`): Hub ids or paths of the training data (Hub ids go into the card metadata).
        steps (`int`, *optional*): optimizer steps run. epochs (`float`, *optional*): epochs run.
        num_examples (`int`, *optional*): training examples (rows) in the data.
        **extra: further JSON data to show, e.g. `teacher="nvidia/NV-Embed-v2"`.
    """
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty name such as {KNOWN_STAGES}, got {stage!r}")
    if isinstance(datasets, str) or not all(isinstance(name, str) and name for name in datasets):
        raise ValueError(f"datasets must be a list of Hub ids or paths, got {datasets!r}")
    record = {"stage": stage, "datasets": list(datasets), "steps": steps, "epochs": epochs,
              "num_examples": num_examples, **extra, "hyperparameters": recipe_hyperparameters(args)}
    return {key: _json_value(value, f"stage record {key!r}") for key, value in record.items() if value is not None}


def trainer_stage_record(trainer, stage, *, datasets, **extra):
    """`stage_record` with steps, epochs and example count read from a finished `Trainer`."""
    dataset = trainer.train_dataset
    num_examples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    epochs = trainer.state.epoch
    return stage_record(stage, trainer.args, datasets=datasets, steps=trainer.state.global_step,
                        epochs=round(epochs, 4) if epochs is not None else None, num_examples=num_examples,
                        **extra)


def record_training_stage(model, record, *, base_model=None, license=None):
    """Append a stage record to the UniME model's `config.unime_training` (a copy is stored).

    Args:
        model: a [`UniMEModel`] (PEFT/DDP wrappers are unwrapped).
        record (`dict`): from `stage_record` / `trainer_stage_record`.
        base_model (`str`, *optional*): the backbone's Hub id; the first one recorded is kept, since
            later stages start from the earlier stage's output.
        license (`str`, *optional*): the license of the trained weights (usually the backbone's).
    """
    if not isinstance(record, Mapping) or not isinstance(record.get("stage"), str):
        raise ValueError(f"record must be a stage record dict with a 'stage' name, got {record!r}")
    config = unwrap_unime(model).config
    training = copy.deepcopy(getattr(config, TRAINING_ATTRIBUTE, None) or {})
    training.setdefault("stages", []).append(_json_value(dict(record), "record"))
    if base_model is not None:
        training.setdefault("base_model", base_model)
    if license is not None:
        training["license"] = license
    json.dumps(training)  # stored in config.json
    setattr(config, TRAINING_ATTRIBUTE, training)
    return training


def record_eval_results(model, results):
    """Merge `{task: {metric: value}}` (the format `training.evaluation.write_results` takes; values are
    fractions) into the UniME model's `config.unime_eval_results`; a task's metrics replace the old ones."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty {task: {metric: value}} mapping")
    clean = {}
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"results[{task!r}] must be a non-empty {{metric: value}} mapping, got {metrics!r}")
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"results[{task!r}][{metric!r}] must be a number, got {value!r}")
        clean[str(task)] = {str(metric): float(value) for metric, value in metrics.items()}
    config = unwrap_unime(model).config
    merged = {**copy.deepcopy(getattr(config, EVAL_ATTRIBUTE, None) or {}), **clean}
    setattr(config, EVAL_ATTRIBUTE, merged)
    return merged


DEFAULT_COMMIT_MESSAGE = "Upload UniME model (LoRA merged)"


def _hub_settings(trainer, repo_id, token, private, revision):
    """Fill unset push settings from the trainer's `hub_*` arguments, as `Trainer.push_to_hub` does."""
    args = trainer.args
    repo_id = repo_id or args.hub_model_id or Path(args.output_dir).name
    token = token if token is not None else args.hub_token
    private = private if private is not None else args.hub_private_repo
    revision = revision if revision is not None else getattr(args, "hub_revision", None)
    return repo_id, token, private, revision


def push_merged_model(trainer_or_model, processor=None, repo_id=None, *, checkpoint_dir=None, eval_results=None,
                      token=None, private=None, revision=None, create_pr=False, commit_message=DEFAULT_COMMIT_MESSAGE,
                      tags=None):
    """Push a trained UniME model, LoRA merged, with its processor and model card.

    Args:
        trainer_or_model: a UniME `Trainer` (its model, processor and `hub_model_id` / `hub_token` /
            `hub_private_repo` / `hub_revision` arguments are used), or a [`UniMEModel`], possibly
            LoRA-wrapped.
        processor ([`UniMEProcessor`], *optional*): required with a model; defaults to the trainer's.
        repo_id (`str`, *optional*): target repo; defaults to the trainer's `hub_model_id`, else the
            name of its `output_dir`. Required with a model.
        checkpoint_dir (`str`, *optional*): an already saved merged checkpoint (e.g. the trainer's
            `<output_dir>/merged`) to upload as it is; otherwise the model is merged and saved to a
            temporary folder first (the live weights are not modified, so training can go on).
        eval_results (`dict`, *optional*): `{task: {metric: value}}` to record in the config first (only
            used when saving, not with `checkpoint_dir`).
        token, private, revision, create_pr, commit_message, tags: as in `push_to_hub`.

    Returns:
        `huggingface_hub.CommitInfo`, or `None` on processes other than the main one (they push nothing).

    Raises:
        ConnectionError: the Hub cannot be reached (raised before anything is saved or uploaded).
    """
    if isinstance(trainer_or_model, Trainer):
        trainer = trainer_or_model
        if not trainer.is_world_process_zero():
            return None
        repo_id, token, private, revision = _hub_settings(trainer, repo_id, token, private, revision)
        model = trainer.accelerator.unwrap_model(trainer.model)
        processor = processor or getattr(trainer, "processor", None) or trainer.processing_class
    else:
        model = trainer_or_model
        if repo_id is None:
            raise ValueError("push_merged_model(model, processor, repo_id): repo_id is required with a model")
    if processor is None and checkpoint_dir is None:
        raise ValueError("push_merged_model needs the model's UniMEProcessor (processor=...)")
    repo_id = create_repo(repo_id, private=private, token=token)  # fail fast, before merging and saving
    push_kwargs = dict(commit_message=commit_message, token=token, revision=revision, create_pr=create_pr, tags=tags)
    if checkpoint_dir is not None:
        return push_checkpoint(checkpoint_dir, repo_id, **push_kwargs)
    if eval_results:
        record_eval_results(model, eval_results)
    with tempfile.TemporaryDirectory(prefix="unime-merged-push-") as staging:
        folder = save_merged_model(model, processor, Path(staging) / "merged")
        return push_checkpoint(folder, repo_id, **push_kwargs)
