"""What the model card says about training and evaluation: records stored in the model's config.

`modeling_unime/model_card.py` renders `config.unime_training` and `config.unime_eval_results`;
this module builds them from a trainer's arguments and state. The records are plain JSON data, so
they are saved in `config.json`, survive `from_pretrained`, and accumulate from stage 1 to stage 2:

```python
record = trainer_stage_record(trainer, "distillation", datasets=["sentence-transformers/all-nli"],
                              teacher="nvidia/NV-Embed-v2")
record_training_stage(trainer.unime_model(), record, base_model="Qwen/Qwen2-VL-2B-Instruct")
record_eval_results(model, {"MMEB": {"average": 0.66}})   # training.evaluation's {task: {metric: value}}
```
"""

import copy
import dataclasses
import enum
import json
import numbers
from collections.abc import Mapping

from transformers import TrainingArguments

from modeling_unime.model_card import EVAL_ATTRIBUTE, TRAINING_ATTRIBUTE

from .lora import unwrap_unime

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
