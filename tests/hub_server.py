"""A loopback Hugging Face Hub for tests: model and data-set repos held in memory, served over HTTP on
127.0.0.1 through the endpoints that ``huggingface_hub`` (and ``datasets``, through it) call, so the real
client code runs without internet.

Served (``{type}`` is ``models`` or ``datasets``; a revision is a branch name or a commit hash, URL-quoted):

* ``GET  /api/{type}/{org}/{name}[/revision/{rev}]``: repo info (``id``, ``sha``, ``siblings``, ...);
* ``GET  /api/{type}/{org}/{name}/tree/{rev}[/{path}]?recursive=...&expand=...``: the file listing (one page);
* ``POST /api/{type}/{org}/{name}/paths-info/{rev}`` (form field ``paths``, repeated): entries of those paths;
* ``HEAD``/``GET`` ``/{org}/{name}/resolve/{rev}/{file}`` and ``/datasets/{org}/{name}/resolve/{rev}/{file}``:
  the file, with ``X-Repo-Commit``, ``ETag`` (the sha256, as the Hub gives for LFS files),
  ``Content-Length`` and byte ranges (``Range``), which ``HfFileSystem`` reads with.

Errors are what the Hub answers and huggingface_hub maps to its exceptions: 404 with ``X-Error-Code``
``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``. Every request is recorded in
:attr:`LoopbackHub.requests` (method, path, ``Authorization`` header), so a test can check which files
were fetched and with which token. Every response closes its connection, so after :meth:`stop` no
pooled connection can still reach a handler.

Repos change like a Hub's: :meth:`LoopbackHub.push` makes a new commit and moves the branch to it
(a ``main`` that moved).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub stores with git-LFS (big binaries): their listing entry carries an `lfs` block.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".gguf")
REPO_TYPES = {"models": "model", "datasets": "dataset"}


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    branches: Dict[str, str] = field(default_factory=dict)  # branch name -> commit hash
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # commit hash -> {path: content}

    def commit_of(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted, without the query
    authorization: Optional[str]


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LoopbackHub:
    """The in-memory Hub and its HTTP server (a thread). Use as a context manager, or start()/stop()."""

    def __init__(self) -> None:
        self.repos: Dict[Tuple[str, str], Repo] = {}
        self.requests: List[Request] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- repos

    def push(self, repo_id: str, files: Mapping[str, bytes], repo_type: str = "model", branch: str = "main") -> str:
        """Commit ``files`` (the whole tree) to ``branch`` of the repo (created when new); the new commit hash."""
        with self._lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
            parent = repo.branches.get(branch, "")
            tree = {path: bytes(content) for path, content in files.items()}
            listing = "".join(f"{p}:{_git_blob_id(c)}\n" for p, c in sorted(tree.items()))
            commit = hashlib.sha1(f"{repo_type}/{repo_id}\n{parent}\n{listing}".encode()).hexdigest()
            repo.commits[commit] = tree
            repo.branches[branch] = commit
            return commit

    def fetched(self, suffix: str = "") -> List[str]:
        """Paths of the files downloaded (GET on a resolve URL) so far, optionally only those ending so."""
        return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(suffix)]

    # ---------------------------------------------------------------- server

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the loopback Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LoopbackHub":
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the tests read hub.requests instead
        pass

    # ---------------------------------------------------------------- plumbing

    def _send(self, status: int, body: bytes = b"", headers: Optional[Mapping[str, str]] = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode())

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message})

    def _record(self) -> Tuple[List[str], Dict[str, List[str]]]:
        split = urlsplit(self.path)
        # Split before unquoting: a revision such as refs/convert/parquet arrives as one %2F-quoted segment.
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.hub.requests.append(Request(self.command, "/" + "/".join(segments), self.headers.get("Authorization")))
        return segments, parse_qs(split.query)

    def _repo(self, repo_type: str, org: str, name: str) -> Optional[Repo]:
        repo = self.hub.repos.get((repo_type, f"{org}/{name}"))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_type} {org}/{name}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Optional[str]:
        commit = repo.commit_of(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # ---------------------------------------------------------------- methods

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        segments, query = self._record()
        try:
            if len(segments) >= 4 and segments[0] == "api" and segments[1] in REPO_TYPES:
                self._api(REPO_TYPES[segments[1]], segments[2], segments[3], segments[4:], query)
            elif len(segments) >= 6 and segments[0] == "datasets" and segments[3] == "resolve":
                self._resolve("dataset", segments[1], segments[2], segments[4], "/".join(segments[5:]))
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._resolve("model", segments[0], segments[1], segments[3], "/".join(segments[4:]))
            else:
                self._error(404, "EntryNotFound", f"no such endpoint: {self.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, repo_type: str, org: str, name: str, rest: List[str], query) -> None:
        repo = self._repo(repo_type, org, name)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            commit = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            if commit:
                self._json(self._info(repo, commit))
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, rest[1])
            if commit:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                expand = query.get("expand", ["false"])[0].lower() == "true"
                entries = self._tree(repo, commit, "/".join(rest[2:]), recursive, expand)
                if entries is None:
                    self._error(404, "EntryNotFound", f"{'/'.join(rest[2:])} does not exist at {commit}")
                else:
                    self._json(entries)
        elif rest[0] == "paths-info" and len(rest) >= 2 and self.command == "POST":
            commit = self._commit(repo, rest[1])
            if commit:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                expand = form.get("expand", ["false"])[0].lower() == "true"
                self._json(self._paths_info(repo, commit, form.get("paths", []), expand))
        else:
            self._error(404, "EntryNotFound", f"no such endpoint: {self.path}")

    # ---------------------------------------------------------------- answers

    def _info(self, repo: Repo, commit: str) -> dict:
        files = repo.commits[commit]
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    @staticmethod
    def _file_entry(path: str, content: bytes, commit: str, expand: bool) -> dict:
        entry = {"type": "file", "oid": _git_blob_id(content), "size": len(content), "path": path}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        if expand:
            entry["lastCommit"] = {"id": commit, "title": "loopback commit", "date": "2026-01-01T00:00:00.000Z"}
        return entry

    @staticmethod
    def _folder_entry(path: str, commit: str, expand: bool) -> dict:
        entry = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {"id": commit, "title": "loopback commit", "date": "2026-01-01T00:00:00.000Z"}
        return entry

    def _tree(self, repo: Repo, commit: str, under: str, recursive: bool, expand: bool) -> Optional[list]:
        files = repo.commits[commit]
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            return None
        entries: Dict[str, dict] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            # the folders on the way, then the file (only the first level unless recursive)
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, self._folder_entry(folder, commit, expand))
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = self._file_entry(path, content, commit, expand)
        return list(entries.values())

    def _paths_info(self, repo: Repo, commit: str, paths: List[str], expand: bool) -> list:
        files = repo.commits[commit]
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._file_entry(path, files[path], commit, expand))
            elif any(p.startswith(path + "/") for p in files):
                out.append(self._folder_entry(path, commit, expand))
        return out

    def _resolve(self, repo_type: str, org: str, name: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, org, name)
        if repo is None:
            return
        commit = self._commit(repo, revision)
        if commit is None:
            return
        content = repo.commits[commit].get(path)
        if content is None:
            self._send(404, json.dumps({"error": "Entry not found"}).encode(),
                       {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit})
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        status, body = 200, content
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].split(",")[0].partition("-")
            if first == "":  # a suffix: the last N bytes
                start, end = max(len(content) - int(last), 0), len(content) - 1
            else:
                start, end = int(first), min(int(last) if last else len(content) - 1, len(content) - 1)
            if start >= len(content) and len(content) > 0:
                self._send(416, b"", {"Content-Range": f"bytes */{len(content)}"})
                return
            status, body = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, body, headers, content_type="application/octet-stream")


# ==================================================================== pointing the clients at it


def use_hub(monkeypatch, url: str, hf_home, offline: bool = False) -> None:
    """Point huggingface_hub and datasets, in this process and in any subprocess it starts, at the Hub
    at ``url`` with the cache under ``hf_home``.

    Both libraries read ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, when imported, into
    module constants; setting the environment is what a user does (and what a subprocess sees), and
    the constants are patched so that this already-importing process follows it too.
    """
    import os
    from pathlib import Path

    from huggingface_hub import constants

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    # The module-level client behind huggingface_hub's plain functions (`file_exists`, ... which peft
    # calls) took its endpoint when it was created.
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", url)
    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover - datasets is a dependency
        dconfig = None
    if dconfig is not None:
        monkeypatch.setattr(dconfig, "HF_ENDPOINT", url)
        monkeypatch.setattr(dconfig, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(dconfig, "HF_CACHE_HOME", str(hf_home))
        cache = hf_home / "datasets"
        monkeypatch.setattr(dconfig, "HF_DATASETS_CACHE", cache)
        monkeypatch.setattr(dconfig, "DOWNLOADED_DATASETS_PATH", cache / dconfig.DOWNLOADED_DATASETS_DIR)
        monkeypatch.setattr(dconfig, "EXTRACTED_DATASETS_PATH", cache / dconfig.DOWNLOADED_DATASETS_DIR /
                            dconfig.EXTRACTED_DATASETS_DIR)
        monkeypatch.setattr(dconfig, "HF_MODULES_CACHE", hf_home / "modules")
    set_offline(monkeypatch, offline)
    assert os.environ["HF_ENDPOINT"] == url


def set_offline(monkeypatch, offline: bool) -> None:
    """``HF_HUB_OFFLINE`` on or off, for this process's already-imported clients and for subprocesses."""
    from huggingface_hub import constants

    flag = "1" if offline else "0"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, flag)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover
        return
    monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(dconfig, "HF_DATASETS_OFFLINE", offline)
