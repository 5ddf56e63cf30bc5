"""Round trips through the offline fake Hub (tests/fake_hub.py): huggingface_hub uploads and downloads, transformers
`push_to_hub` / `from_pretrained` in this process and in a fresh one, custom code with `trust_remote_code`, and a
quick clear failure when the endpoint is unreachable."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, RepoFile, RepoFolder, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel

from tests.fake_hub import fake_hub, point_hub_clients_at  # noqa: F401  (fake_hub is the fixture)

# `echo -n hello | git hash-object --stdin`: the blob id git (and the Hub) give the 5 bytes "hello".
HELLO_GIT_OID = "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def run_python(code: str, env: dict[str, str], cwd: Path) -> None:
    """Run `code` in a fresh interpreter (so nothing is shared with this process but `env`) and check it succeeds."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_clients_point_at_a_loopback_server(fake_hub):
    from huggingface_hub import constants

    assert fake_hub.endpoint.startswith("http://127.0.0.1:")
    assert fake_hub._server.server_address[0] == "127.0.0.1"
    assert os.environ["HF_ENDPOINT"] == constants.ENDPOINT == fake_hub.endpoint
    assert HfApi().whoami()["name"] == fake_hub.user


def test_create_repo_upload_file_and_download(fake_hub):
    api = HfApi()
    url = api.create_repo("user/demo")
    assert (url.repo_id, url.endpoint) == ("user/demo", fake_hub.endpoint)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("user/demo")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("user/demo", exist_ok=True).repo_id == "user/demo"

    commit = api.upload_file(path_or_fileobj=b"hello", path_in_repo="greeting.txt", repo_id="user/demo",
                             commit_message="add greeting")

    assert fake_hub.files("user/demo") == {"greeting.txt": b"hello"}
    assert [(c.sha, c.title) for c in fake_hub.commits("user/demo")][0] == (commit.oid, "add greeting")
    info = api.model_info("user/demo")
    assert info.sha == commit.oid
    assert [(s.rfilename, s.blob_id, s.size) for s in info.siblings] == [("greeting.txt", HELLO_GIT_OID, 5)]
    path = hf_hub_download("user/demo", "greeting.txt")
    assert Path(path).read_bytes() == b"hello"
    assert Path(path).is_relative_to(os.environ["HF_HUB_CACHE"])


def test_upload_folder_snapshot_download_history_and_deletes(fake_hub, tmp_path):
    folder = tmp_path / "folder"
    contents = {"a.txt": b"first", "sub/b.bin": bytes(range(256)) * 3, "sub/deeper/c.json": b'{"k": 1}'}
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    api = HfApi()
    api.create_repo("user/folder")
    first = api.upload_folder(folder_path=folder, repo_id="user/folder")
    (folder / "a.txt").write_bytes(b"second")
    second = api.upload_folder(folder_path=folder, repo_id="user/folder")

    latest = {**contents, "a.txt": b"second"}
    assert fake_hub.files("user/folder") == latest
    assert fake_hub.files("user/folder", revision=first.oid) == contents
    assert [c.sha for c in fake_hub.commits("user/folder")][:2] == [second.oid, first.oid]
    history = [c.sha for c in fake_hub.commits("user/folder")]
    assert [c.commit_id for c in api.list_repo_commits("user/folder")] == history
    snapshot = Path(snapshot_download("user/folder"))
    assert {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} == latest
    assert Path(hf_hub_download("user/folder", "a.txt", revision=first.oid)).read_bytes() == b"first"
    assert api.list_repo_files("user/folder") == sorted(latest)
    top = {(type(entry), entry.path) for entry in api.list_repo_tree("user/folder")}
    assert top == {(RepoFile, "a.txt"), (RepoFolder, "sub")}

    # Like the Hub, the preupload answer carries each file's oid, so re-uploading unchanged files makes no commit.
    api.upload_folder(folder_path=folder, repo_id="user/folder")
    assert fake_hub.commits("user/folder")[0].sha == second.oid
    api.delete_file("sub/b.bin", repo_id="user/folder")
    assert sorted(fake_hub.files("user/folder")) == ["a.txt", "sub/deeper/c.json"]


def test_missing_repo_revision_and_file_raise_the_hub_errors(fake_hub):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/absent", "config.json")
    HfApi().create_repo("user/empty")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/empty", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/empty", "config.json", revision="0" * 40)


def test_push_to_hub_then_from_pretrained_here_and_in_a_subprocess(fake_hub, tmp_path):
    model = tiny_bert()
    expected = model.state_dict()

    model.push_to_hub("user/tiny")

    files = fake_hub.files("user/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert_same_weights(expected, load_safetensors_bytes(files["model.safetensors"]))
    loaded = AutoModel.from_pretrained("user/tiny")
    assert type(loaded) is BertModel
    assert_same_weights(expected, loaded.state_dict())

    # A fresh interpreter with an empty cache can only get the weights from the server.
    out = tmp_path / "subprocess_weights.safetensors"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "subprocess_cache")}
    run_python(f"""
        from safetensors.torch import save_file
        from transformers import AutoModel
        save_file(AutoModel.from_pretrained("user/tiny").state_dict(), {str(out)!r})
    """, env, cwd=tmp_path)
    assert_same_weights(expected, load_file(out))


CUSTOM_CONFIG = """
from transformers import PretrainedConfig


class FakeHubTinyConfig(PretrainedConfig):
    model_type = "fake-hub-tiny"

    def __init__(self, width=3, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""

CUSTOM_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_fake_hub_tiny import FakeHubTinyConfig


class FakeHubTinyModel(PreTrainedModel):
    config_class = FakeHubTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, inputs):
        return self.proj(inputs)
"""


def test_custom_code_loads_with_trust_remote_code_in_a_subprocess(fake_hub, tmp_path, monkeypatch):
    package = tmp_path / "fake_hub_tiny_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_fake_hub_tiny.py").write_text(CUSTOM_CONFIG)
    (package / "modeling_fake_hub_tiny.py").write_text(CUSTOM_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    from fake_hub_tiny_pkg.configuration_fake_hub_tiny import FakeHubTinyConfig
    from fake_hub_tiny_pkg.modeling_fake_hub_tiny import FakeHubTinyModel

    FakeHubTinyConfig.register_for_auto_class()
    FakeHubTinyModel.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model = FakeHubTinyModel(FakeHubTinyConfig())
    model.push_to_hub("user/custom")

    files = fake_hub.files("user/custom")
    assert files["modeling_fake_hub_tiny.py"].decode() == CUSTOM_MODEL
    assert files["configuration_fake_hub_tiny.py"].decode() == CUSTOM_CONFIG
    # The subprocess runs where the package is not importable: the code can only come from the Hub.
    out, modules = tmp_path / "custom_weights.safetensors", tmp_path / "subprocess_modules"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "subprocess_cache"), "HF_MODULES_CACHE": str(modules)}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    run_python(f"""
        from safetensors.torch import save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained("user/custom", trust_remote_code=True)
        assert type(model).__name__ == "FakeHubTinyModel", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        save_file(model.state_dict(), {str(out)!r})
    """, env, cwd=workdir)
    assert_same_weights(model.state_dict(), load_file(out))
    assert list(modules.rglob("modeling_fake_hub_tiny.py"))


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_push_to_an_unreachable_endpoint_fails_fast_with_a_connection_error(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    point_hub_clients_at(endpoint, tmp_path / "home", monkeypatch)
    model = tiny_bert()
    start = time.monotonic()

    # `create_repo`, the first call of `push_to_hub`, is not retried. (Downloads are: `from_pretrained` here would
    # back off 1+2+4+8+8 s per file before its OSError, and huggingface_hub 2.4 has no setting to shorten that.)
    with pytest.raises(httpx2.ConnectError):
        model.push_to_hub("user/tiny")

    assert time.monotonic() - start < 5
