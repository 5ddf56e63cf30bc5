"""Pushing UniME checkpoints to the Hugging Face Hub together with their model card.

transformers' `push_to_hub` writes the repo's existing README.md (or a placeholder card) over the
one `save_pretrained` generated; `UniMEModel.push_to_hub` goes through `push_model_to_hub` instead,
which uploads the UniME card built for the repo id, and keeps a card a person wrote on the Hub (see
`model_card.py`). Everything is one commit; nothing in a local checkpoint folder is modified.
"""

import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from huggingface_hub import utils as hub_utils
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

from .model_card import build_model_card, is_generated_card, load_checkpoint_config

DEFAULT_COMMIT_MESSAGE = "Upload UniME model"
# `save_pretrained(..., push_to_hub=True, **kwargs)` keywords that belong to the push.
SAVE_PUSH_KWARGS = ("commit_message", "commit_description", "private", "token", "create_pr", "revision", "tags")


def _unreachable_errors():
    """Exceptions meaning the Hub could not be reached (no network, wrong HF_ENDPOINT, offline mode)."""
    # huggingface_hub re-exports the HTTP client it is built on (httpx, or its fork httpx2).
    client = getattr(hub_utils, "httpx", None)
    return (OSError, client.TransportError) if client is not None else (OSError,)


def _unreachable(api, repo_id, error):
    return ConnectionError(
        f"push_to_hub could not reach the Hugging Face Hub at {api.endpoint} to push {repo_id!r} "
        f"({type(error).__name__}: {error}). Nothing was pushed and no local file was changed; check the "
        "network connection, HF_ENDPOINT and HF_HUB_OFFLINE."
    )


def create_repo(repo_id, *, private=None, token=None, api=None):
    """Create `repo_id` if needed and return its full id (`owner/name`).

    Raises:
        ConnectionError: naming the endpoint, when the Hub cannot be reached.
    """
    api = api or HfApi()
    try:
        return api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except _unreachable_errors() as error:
        raise _unreachable(api, repo_id, error) from error


def _remote_card(repo_id, token, revision):
    try:
        return ModelCard.load(hf_hub_download(repo_id, "README.md", revision=revision, token=token))
    except (EntryNotFoundError, RevisionNotFoundError):
        return None


def card_for_push(repo_id, config, *, token=None, revision=None, tags=None):
    """The README.md to upload: UniME's card for `repo_id`, unless the repo has a card a person wrote, which
    is kept (`None`: leave it untouched) or, with `tags`, re-uploaded with the tags added."""
    card = _remote_card(repo_id, token, revision)
    if card is None or is_generated_card(card.content):
        card = build_model_card(config, model_id=repo_id)
    elif not tags:
        return None
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    return card


def push_checkpoint(folder, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr=False, tags=None):
    """Upload a saved UniME checkpoint folder and its model card in one commit.

    Every file under `folder` is uploaded (hidden files and folders aside), except its README.md,
    which is replaced by `card_for_push`. The folder is not modified.

    Args:
        folder (`str` or `Path`): a directory written by `UniMEModel.save_pretrained` (+ the processor's).
        repo_id (`str`): `owner/name` or `name` (in the token owner's namespace); created if missing.
        commit_message, commit_description, private, token, revision, create_pr: as in `push_to_hub`.
        tags (`list[str]`, *optional*): extra card tags.

    Returns:
        `huggingface_hub.CommitInfo`.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a saved UniME checkpoint: it has no config.json")
    config = load_checkpoint_config(folder)
    api = HfApi()
    repo_id = create_repo(repo_id, private=private, token=token, api=api)
    try:
        card = card_for_push(repo_id, config, token=token, revision=revision, tags=tags)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != "README.md"
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        ]
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)
    except _unreachable_errors() as error:
        raise _unreachable(api, repo_id, error) from error


def push_model_to_hub(model, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                      revision=None, create_pr=False, max_shard_size="50GB", tags=None):
    """`UniMEModel.push_to_hub`: save to a temporary folder, then `push_checkpoint` it.

    The repo is created first, so an unreachable Hub fails before the weights are serialised.
    """
    repo_id = create_repo(repo_id, private=private, token=token)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *tags]))
    with tempfile.TemporaryDirectory(prefix="unime-push-") as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        return push_checkpoint(staging, repo_id, commit_message=commit_message, commit_description=commit_description,
                               token=token, revision=revision, create_pr=create_pr, tags=tags)


def pop_push_kwargs(save_directory, kwargs):
    """Take the push settings of `save_pretrained(save_directory, push_to_hub=True, **kwargs)` out of
    `kwargs`: `push_checkpoint` keywords, with `repo_id` defaulting to the folder's name as in transformers."""
    push_kwargs = {key: kwargs.pop(key) for key in SAVE_PUSH_KWARGS if key in kwargs}
    push_kwargs["repo_id"] = kwargs.pop("repo_id", Path(save_directory).name)
    return push_kwargs
