"""Pushing the result of a UniME training run to the Hub: the LoRA-merged model, never adapters alone.

The trainers' `--push_to_hub --hub_model_id` end here. The pushed repo is a standalone UniME
checkpoint (weights with LoRA merged, config with `auto_map`, the modeling code, the processor files,
sentence-transformers files) and its model card, which renders the training stages and evaluation
results recorded in the config (see `training/model_card.py`).
"""

import tempfile
from pathlib import Path

from transformers import Trainer

from modeling_unime.hub import create_repo, push_checkpoint

from .lora import save_merged_model
from .model_card import record_eval_results

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
