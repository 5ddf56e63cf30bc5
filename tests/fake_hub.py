"""An offline fake of the Hugging Face Hub HTTP API, so `push_to_hub` and `from_pretrained(repo_id)` run in tests.

The server only ever binds 127.0.0.1 on an ephemeral port, and keeps file contents in a temporary directory.
Request and response shapes follow the client code of huggingface_hub 2.4.0 (`hf_api.py`, `_commit_api.py`,
`file_download.py`):

* `GET /api/whoami-v2`: a fixed user (`FakeHub.user`).
* `POST /api/repos/create`: 200 with the repo `url`, or 409 (still with `url`, which `exist_ok=True` reads).
* `POST /api/validate-yaml`: always valid (uploading a README.md calls it).
* `GET /api/{type}s/{repo_id}[/revision/{rev}]`: repo info with `sha` and `siblings`.
* `POST /api/{type}s/{repo_id}/preupload/{rev}`: `uploadMode: "regular"` for every file, so every file comes inlined
  as base64 in the commit (no LFS, no Xet), plus the stored `oid` so that, as on the Hub, unchanged files are skipped.
* `POST /api/{type}s/{repo_id}/commit/{rev}`: NDJSON body of a `header`, then `file`, `deletedFile`, `deletedFolder`.
* `GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]` and `.../commits/{rev}`: file listings and history.
* `HEAD`/`GET /[{type}s/]{repo_id}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`, `ETag` (the quoted git blob
  sha1) and `Content-Length`.

Errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), so huggingface_hub raises
its usual typed errors and transformers' probing for optional files works. Each repo has one branch, `main`, with its
whole commit history; any commit sha is also a valid revision. Writes need a bearer token (any value). Not implemented:
LFS/Xet uploads, other branches, pull requests, private or gated repos.

The `fake_hub` fixture starts a server, points huggingface_hub and transformers at it, in this process (environment
and the module constants they copied from it at import time) and in subprocesses (which inherit `os.environ`), and
stops it afterwards. Load `trust_remote_code` checkpoints in a subprocess: Python cannot unload the dynamic
`transformers_modules` it imports.
"""

import base64
import hashlib
import importlib
import json
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Commit:
    """One commit of a repo's `main` branch; `files` maps each path in the repo to its git blob sha1."""

    sha: str
    title: str
    message: str
    date: str
    files: Mapping[str, str]


class HubError(Exception):
    """An HTTP error, answered with the Hub's `X-Error-Code` header when `code` is set."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


def git_blob_sha1(content: bytes) -> str:
    """The git object id of `content`: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _new_commit(parent: str | None, title: str, message: str, files: dict) -> Commit:
    sha = hashlib.sha1(f"{parent}:{uuid.uuid4()}".encode()).hexdigest()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return Commit(sha, title, message, date, MappingProxyType(files))


class HubStore:
    """Repos and their commit histories; file contents live on disk under `root`, named by blob sha1."""

    def __init__(self, root: Path):
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], list[Commit]] = {}  # (repo_type, repo_id) -> commits, oldest first
        self.lock = threading.RLock()

    def create(self, repo_type: str, repo_id: str) -> bool:
        """Create a repo holding one empty initial commit; return False if it already exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            self.repos[repo_type, repo_id] = [_new_commit(None, "initial commit", "", {})]
            return True

    def history(self, repo_type: str, repo_id: str, revision: str = "main") -> list[Commit]:
        """The commits up to `revision` ("main" or any commit sha), newest first."""
        with self.lock:
            commits = list(self.repos.get((repo_type, repo_id), []))
        if not commits:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        shas = [commit.sha for commit in commits]
        if revision != "main" and revision not in shas:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        end = len(commits) if revision == "main" else shas.index(revision) + 1
        return commits[:end][::-1]

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> Commit:
        return self.history(repo_type, repo_id, revision)[0]

    def commit(self, repo_type: str, repo_id: str, revision: str, header: dict, operations: list[dict]) -> Commit:
        """Apply NDJSON commit operations on top of `main`, all or none, and return the new commit."""
        if revision != "main":
            raise HubError(400, None, f"Only the main branch can be committed to, not {revision!r}")
        with self.lock:
            head = self.resolve(repo_type, repo_id, "main")
            if header.get("parentCommit") not in (None, head.sha):
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for operation in operations:
                self._apply(files, operation["key"], operation["value"], head.sha)
            commit = _new_commit(head.sha, header.get("summary", ""), header.get("description", ""), files)
            self.repos[repo_type, repo_id].append(commit)
            return commit

    def _apply(self, files: dict, key: str, value: dict, head_sha: str) -> None:
        path = value["path"]
        if key == "file":
            content = base64.b64decode(value["content"])
            files[path] = git_blob_sha1(content)
            (self.blobs / files[path]).write_bytes(content)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}", head_sha)
        elif key == "deletedFolder":
            for name in [name for name in files if name.startswith(path.rstrip("/") + "/")]:
                del files[name]
        else:
            raise HubError(400, None, f"Unsupported commit operation {key!r}: this fake Hub has no LFS")

    def read(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def size(self, oid: str) -> int:
        return (self.blobs / oid).stat().st_size


_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # (method, path pattern, handler method); HEAD requests use the GET routes
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("GET", rf"/api/{_REPO}/commits/(?P<rev>[^/]+)", "commits"),
    ("GET", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to a `route_*` method, which returns (status, JSON-able or bytes body, headers)."""

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET", send_body=False)

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _dispatch(self, method: str, send_body: bool = True) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.store: HubStore = self.server.store
        try:
            route = next(((name, match) for verb, pattern, name in _ROUTES
                          if verb == method and (match := re.fullmatch(pattern, url.path))), None)
            if route is None:
                raise HubError(404, None, f"Not implemented by the fake Hub: {self.command} {url.path}")
            # Revisions and paths arrive percent-encoded (huggingface_hub quotes "refs/pr/1" as one segment).
            args = {key: unquote(value) for key, value in route[1].groupdict().items() if value is not None}
            status, body, headers = getattr(self, "route_" + route[0])(**args)
        except HubError as error:
            status, body = error.status, {"error": str(error)}
            headers = {"X-Error-Message": str(error).encode("ascii", "replace").decode()}
            headers.update({"X-Error-Code": error.code} if error.code else {})
            headers.update({"X-Repo-Commit": error.commit} if error.commit else {})
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def route_whoami(self):
        self._require_token()
        return 200, {"type": "user", "name": self.server.user, "fullname": "Fake User", "orgs": []}, {}

    def route_create_repo(self):
        self._require_token()
        payload = json.loads(self.body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.server.user}/{payload['name']}"
        answer = {"url": self._url(repo_type, repo_id), "name": repo_id}
        if self.store.create(repo_type, repo_id):
            return 200, answer, {}
        return 409, {**answer, "error": "You already created this repo"}, {}

    def route_validate_yaml(self):
        return 200, {"errors": [], "warnings": []}, {}

    def route_repo_info(self, type, repo, rev="main"):
        commit = self.store.resolve(type, repo, rev)
        siblings = [{"rfilename": path, "blobId": oid, "size": self.store.size(oid)}
                    for path, oid in commit.files.items()]
        return 200, {"id": repo, "author": repo.split("/")[0], "sha": commit.sha, "private": False, "gated": False,
                     "disabled": False, "lastModified": commit.date, "tags": [], "siblings": siblings}, {}

    def route_preupload(self, type, repo, rev):
        self._require_token()
        files = self.store.resolve(type, repo, rev).files
        answer = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(item["path"])}
                  for item in json.loads(self.body)["files"]]
        return 200, {"files": answer}, {}

    def route_commit(self, type, repo, rev):
        self._require_token()
        if self.query.get("create_pr") == ["1"]:
            raise HubError(400, None, "This fake Hub has no pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        commit = self.store.commit(type, repo, rev, header, [line for line in lines if line["key"] != "header"])
        url = f"{self._url(type, repo)}/commit/{commit.sha}"
        return 200, {"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""}, {}

    def route_tree(self, type, repo, rev, path=""):
        commit = self.store.resolve(type, repo, rev)
        root, recursive = path.strip("/"), self.query.get("recursive", [""])[0].lower() == "true"
        entries = {}
        for name, oid in commit.files.items():
            if root and not name.startswith(root + "/"):
                continue
            parts = name[len(root):].lstrip("/").split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = "/".join([root, *parts[:depth]]).lstrip("/")
                # Folders get a stable made-up oid: no client reads it.
                entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())}
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "oid": oid, "size": self.store.size(oid)}
        if root and not entries:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", commit.sha)
        return 200, sorted(entries.values(), key=lambda entry: entry["path"]), {}

    def route_commits(self, type, repo, rev):
        return 200, [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                      "authors": [{"user": self.server.user}]} for c in self.store.history(type, repo, rev)], {}

    def route_resolve(self, repo, rev, path, type="model"):
        commit = self.store.resolve(type, repo, rev)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", commit.sha)
        oid = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}
        return 200, self.store.read(oid), headers


class FakeHub:
    """A fake Hub server on 127.0.0.1 (a context manager); see the `fake_hub` fixture to point clients at it."""

    def __init__(self, root: str | Path | None = None, user: str = "user"):
        self._tempdir = None if root else tempfile.TemporaryDirectory(prefix="fake_hub_")
        self.store = HubStore(Path(root or self._tempdir.name))
        self.user = user
        self.endpoint = ""  # known once started
        self.env: dict[str, str] = {}  # set by the `fake_hub` fixture: the environment pointing clients here
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> "FakeHub":
        server = ThreadingHTTPServer((HOST, 0), _Handler)
        server.daemon_threads = True
        server.store, server.user = self.store, self.user
        server.endpoint = self.endpoint = f"http://{HOST}:{server.server_address[1]}"
        # A short poll interval keeps `shutdown()` (and so each test's teardown) quick.
        threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True).start()
        self._server = server
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of `repo_id` at `revision`, as {path in repo: content}."""
        commit = self.store.resolve(repo_type, repo_id, revision)
        return {path: self.store.read(oid) for path, oid in commit.files.items()}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """The commits of `repo_id`'s main branch, newest first (like `HfApi.list_repo_commits`)."""
        return self.store.history(repo_type, repo_id)


def point_hub_clients_at(endpoint: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point huggingface_hub and transformers at `endpoint`, with caches under `home`; return the env vars set.

    Subprocesses read the environment. This process also needs the module attributes that huggingface_hub and
    transformers copied from it at import time. `monkeypatch` undoes all of it.
    """
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "fake", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_MODULES_CACHE": str(home / "modules"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "NO_PROXY": HOST, "no_proxy": HOST}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_ASSETS_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)

    from huggingface_hub import constants, hf_api

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {HOST},  # hosts that keep the auth header across redirects
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),  # a registry fetched from ENDPOINT, cached here
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    # `huggingface_hub.create_repo`, `upload_file`, ... are methods of this module-level HfApi built at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    for module in ("huggingface_hub.utils._git_credential", "huggingface_hub.cli.auth"):  # `from constants import`
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "ENDPOINT", endpoint)
    try:
        transformers_hub = importlib.import_module("transformers.utils.hub")
        dynamic_modules = importlib.import_module("transformers.dynamic_module_utils")
    except ImportError:
        return env
    # transformers builds one HfApi, with the endpoint of that moment, for all its Hub calls: drop it (restored later).
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])
    return env


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running `FakeHub` that huggingface_hub and transformers use, here and in subprocesses (via `os.environ`).

    Use it from any test module with `from tests.fake_hub import fake_hub  # noqa: F401`.
    """
    with FakeHub(tmp_path / "fake_hub_repos") as hub:
        hub.env = point_hub_clients_at(hub.endpoint, tmp_path / "fake_hub_home", monkeypatch)
        yield hub
