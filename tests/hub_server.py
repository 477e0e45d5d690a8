"""A Hub-compatible HTTP server for offline tests.

The machines that test hf-graft cannot reach huggingface.co, yet ``push_to_hub``,
``from_pretrained("org/name")``, ``hf_hub_download``, ``snapshot_download``, ``upload_folder``,
``create_repo`` and ``ModelCard.load`` must be exercised with the real ``huggingface_hub`` client.
:class:`HubServer` serves, from memory and on 127.0.0.1 only, the part of the Hub API those calls
use; point ``HF_ENDPOINT`` at :attr:`HubServer.endpoint` before ``huggingface_hub`` is imported.

How each endpoint mirrors the Hub:

* ``POST /api/repos/create``: a new repo starts with one commit holding ``.gitattributes``; an
  existing one answers 409, which ``create_repo(exist_ok=True)`` accepts. A name without an
  organization goes to the namespace of :data:`USERNAME`.
* ``POST /api/{type}s/{ns}/{name}/preupload/{rev}``: every file is ``regular`` (never LFS or Xet),
  so contents travel base64-encoded inside the commit. The blob id of a file already in the repo is
  returned, which lets the client skip unchanged files.
* ``POST /api/{type}s/{ns}/{name}/commit/{branch}``: NDJSON header plus ``file``, ``deletedFile``
  and ``deletedFolder`` operations. Each commit keeps a full snapshot, so every past commit stays
  readable by its sha.
* ``GET /api/{type}s/{ns}/{name}[/revision/{rev}]`` (``sha``, ``siblings``),
  ``GET .../tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``.
* ``HEAD``/``GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the
  git blob id) and ``Content-Length``. Errors carry ``X-Error-Code`` (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``), which the client turns into its exception types.
* ``POST /api/validate-yaml`` accepts every card; ``GET /api/whoami-v2`` names :data:`USERNAME`.

LFS uploads, pull requests and branches other than ``main`` are answered with an explicit error
rather than approximated. Tokens are accepted without being checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "USERNAME"]

logger = logging.getLogger(__name__)

USERNAME = "hf-test-user"
"""The user every token belongs to."""

MAX_BODY_BYTES = 512 * 1024 * 1024
"""Largest request body accepted: contents are held in memory and arrive base64-encoded."""

CONNECTION_TIMEOUT_S = 60
"""Seconds an idle client connection is kept open before its handler thread ends."""

DEFAULT_BRANCH = "main"

_REPO_TYPES = ("model", "dataset", "space")

_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob: the Hub's ETag and ``oid`` for a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """The current UTC time in the Hub's format, e.g. ``2024-01-31T12:00:00.000Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _url_prefix(repo_type: str) -> str:
    """The URL path prefix of a repo type: none for models, ``datasets/`` or ``spaces/`` otherwise."""
    return "" if repo_type == "model" else f"{repo_type}s/"


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    """A boolean query parameter, as sent by either requests (``True``) or httpx (``true``)."""
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _checked_path(path: Any) -> str:
    """``path`` if it is a valid relative POSIX path inside a repo, else a 400 error."""
    if not isinstance(path, str) or path.startswith("/") or any(
        part in ("", ".", "..") for part in path.split("/")
    ):
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class _Response:
    """What the handler writes back: status, body and headers beyond the content headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(payload).encode(), headers=dict(headers or {}))


class _HubError(Exception):
    """An error answered as the Hub does: a JSON ``error`` body plus ``X-Error-*`` headers."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> _Response:
        # Header values must be latin-1; paths in messages may not be.
        readable = self.message.encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": readable, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Response.json({"error": self.message}, status=self.status, headers=headers)


@dataclass(frozen=True)
class _Commit:
    """One commit, holding a full snapshot of the repo's files."""

    oid: str
    date: str
    files: Mapping[str, bytes]

    def file_entry(self, path: str) -> dict[str, Any]:
        """A file as ``/tree`` and ``/paths-info`` describe it."""
        data = self.files[path]
        return {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": path}

    def folder_entry(self, path: str) -> dict[str, Any]:
        """A folder as ``/tree`` and ``/paths-info`` describe it; its oid covers its contents."""
        listing = "".join(
            f"{_git_blob_id(data)} {name}\n"
            for name, data in sorted(self.files.items())
            if name.startswith(f"{path}/")
        )
        oid = hashlib.sha1(f"tree {listing}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def path_info(self, path: str) -> dict[str, Any] | None:
        """The entry of the file or folder at ``path``, or ``None`` when there is none."""
        if path in self.files:
            return self.file_entry(path)
        if any(name.startswith(f"{path}/") for name in self.files):
            return self.folder_entry(path)
        return None

    def tree(self, folder: str, recursive: bool) -> list[dict[str, Any]]:
        """The entries under ``folder`` ("" for the root): its children, or all descendants."""
        prefix = f"{folder}/" if folder else ""
        files = [path for path in self.files if path.startswith(prefix)]
        if folder and not files:
            raise _HubError(404, f"{folder} does not exist at {self.oid}", "EntryNotFound")
        folders: set[str] = set()
        for path in files:
            parent = posixpath.dirname(path)
            while len(parent) > len(folder):
                folders.add(parent)
                parent = posixpath.dirname(parent)
        entries = [self.file_entry(path) for path in files] + [self.folder_entry(path) for path in folders]
        if not recursive:
            entries = [entry for entry in entries if "/" not in entry["path"][len(prefix) :]]
        return sorted(entries, key=lambda entry: entry["path"])


@dataclass
class _Repo:
    """A repo: its commits by sha and the sha each branch points to."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit:
        """The commit a branch name or a commit sha designates."""
        commit = self.commits.get(self.branches.get(revision, revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def commit(self, branch: str, summary: str, description: str, files: dict[str, bytes]) -> _Commit:
        """Record ``files`` as the new snapshot of ``branch``.

        The sha covers the repo, the parent, the time, the message and every file's blob id.
        """
        date = _now()
        tree = "".join(f"{_git_blob_id(data)} {path}\n" for path, data in sorted(files.items()))
        text = (
            f"repo {self.repo_type}:{self.repo_id}\nparent {self.branches.get(branch)}\ndate {date}\n\n"
            f"{summary}\n\n{description}\n\n{tree}"
        )
        commit = _Commit(hashlib.sha1(text.encode()).hexdigest(), date, MappingProxyType(dict(files)))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def info(self, revision: str) -> dict[str, Any]:
        """The ``/api/{type}s/{repo_id}`` JSON at a revision, with sized ``siblings``."""
        commit = self.resolve(revision)
        return {
            "_id": hashlib.sha1(f"{self.repo_type}:{self.repo_id}".encode()).hexdigest()[:24],
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": self.created_at,
            "private": self.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": _git_blob_id(data)}
                for path, data in sorted(commit.files.items())
            ],
        }


class _Hub:
    """The Hub's state and API, independent of HTTP: requests in, :class:`_Response` out."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, query: Mapping[str, list[str]], body: bytes) -> _Response:
        """Answer one request; ``path`` is still percent-encoded so that revisions may hold ``/``."""
        segments = [unquote(segment) for segment in path.strip("/").split("/")]
        with self._lock:
            return self._route(method, segments, query, body)

    def files(self, repo_type: str, repo_id: str, revision: str) -> dict[str, bytes]:
        """The files of a repo at a revision."""
        with self._lock:
            return dict(self._repo(repo_type, repo_id).resolve(revision).files)

    def _route(
        self, method: str, segments: list[str], query: Mapping[str, list[str]], body: bytes
    ) -> _Response:
        match method, segments:
            case "GET", ["api", "whoami-v2"]:
                return _Response.json(
                    {
                        "type": "user",
                        "name": USERNAME,
                        "fullname": "HF Test User",
                        "orgs": [],
                        "auth": {
                            "type": "access_token",
                            "accessToken": {"displayName": "test", "role": "write"},
                        },
                    }
                )
            case "POST", ["api", "validate-yaml"]:
                return _Response.json({"errors": [], "warnings": []})
            case "POST", ["api", "repos", "create"]:
                return self._create_repo(_json_body(body))
            case _, ["api", "models" | "datasets" | "spaces" as kind, namespace, name, *rest]:
                repo = self._repo(kind.removesuffix("s"), f"{namespace}/{name}")
                return self._repo_api(method, repo, rest, query, body)
            case "GET" | "HEAD", ["datasets" | "spaces" as kind, namespace, name, "resolve", revision, *path]:
                repo = self._repo(kind.removesuffix("s"), f"{namespace}/{name}")
                return self._resolve(repo, revision, "/".join(path))
            case "GET" | "HEAD", [namespace, name, "resolve", revision, *path]:
                return self._resolve(self._repo("model", f"{namespace}/{name}"), revision, "/".join(path))
        raise _HubError(404, f"The test Hub does not serve {method} /{'/'.join(segments)}")

    def _repo_api(
        self, method: str, repo: _Repo, rest: list[str], query: Mapping[str, list[str]], body: bytes
    ) -> _Response:
        match method, rest:
            case "GET", []:
                return _Response.json(repo.info(DEFAULT_BRANCH))
            case "GET", ["revision", revision]:
                return _Response.json(repo.info(revision))
            case "GET", ["tree", revision, *path]:
                return _Response.json(repo.resolve(revision).tree("/".join(path), _flag(query, "recursive")))
            case "POST", ["paths-info", revision]:
                commit = repo.resolve(revision)
                paths = parse_qs(body.decode()).get("paths", [])
                return _Response.json([info for info in map(commit.path_info, paths) if info is not None])
            case "POST", ["preupload", revision]:
                return self._preupload(repo, revision, _json_body(body))
            case "POST", ["commit", revision]:
                if _flag(query, "create_pr"):
                    raise _HubError(400, "The test Hub does not support pull requests")
                return self._commit(repo, revision, body)
        raise _HubError(404, f"The test Hub does not serve {method} {'/'.join(rest)} on {repo.repo_id}")

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_url_prefix(repo.repo_type)}{repo.repo_id}"

    def _create_repo(self, payload: dict[str, Any]) -> _Response:
        repo_type = payload.get("type") or "model"
        name = payload.get("name")
        if repo_type not in _REPO_TYPES or not isinstance(name, str) or "/" in name or not name:
            raise _HubError(400, f"Invalid repo type or name: {repo_type!r} {name!r}")
        repo_id = f"{payload.get('organization') or USERNAME}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            return _Response.json(
                {"error": "You already created this repo", "url": self._repo_url(existing)}, status=409
            )
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo = _Repo(repo_type, repo_id, private, created_at=_now())
        repo.commit(DEFAULT_BRANCH, "initial commit", "", {".gitattributes": _GITATTRIBUTES})
        self._repos[(repo_type, repo_id)] = repo
        return _Response.json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> _Response:
        commit = repo.resolve(revision)
        answers = []
        for file in payload.get("files", []):
            path = _checked_path(file.get("path"))
            answer = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in commit.files:
                answer["oid"] = _git_blob_id(commit.files[path])
            answers.append(answer)
        return _Response.json({"files": answers, "commitOid": commit.oid})

    def _commit(self, repo: _Repo, branch: str, body: bytes) -> _Response:
        if branch not in repo.branches:
            raise _HubError(404, f"Branch not found: {branch}", "RevisionNotFound")
        files = dict(repo.resolve(branch).files)
        header = None
        try:
            for line in filter(None, body.splitlines()):
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file" and value.get("encoding") == "base64":
                    files[_checked_path(value["path"])] = base64.b64decode(value["content"], validate=True)
                elif key == "deletedFile":
                    path = _checked_path(value["path"])
                    if files.pop(path, None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = _checked_path(value["path"].rstrip("/")) + "/"
                    doomed = [path for path in files if path.startswith(prefix)]
                    if not doomed:
                        message = f"A folder with this name doesn't exist: {prefix}"
                        raise _HubError(404, message, "EntryNotFound")
                    for path in doomed:
                        del files[path]
                else:
                    raise _HubError(400, f"The test Hub takes regular base64 files, not {key!r} operations")
            summary, description = header["summary"], header.get("description", "")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise _HubError(400, f"Malformed commit payload: {error!r}") from error
        commit = repo.commit(branch, summary, description, files)
        return _Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo: _Repo, revision: str, path: str) -> _Response:
        commit = repo.resolve(revision)
        data = commit.files.get(path)
        if data is None:
            # The commit sha lets the client cache that the file does not exist at this commit.
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        return _Response(
            200,
            data,
            content_type="application/octet-stream",
            headers={"X-Repo-Commit": commit.oid, "ETag": f'"{_git_blob_id(data)}"'},
        )


def _json_body(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, else a 400 error."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError as error:
        raise _HubError(400, f"Body is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise _HubError(400, "Body must be a JSON object")
    return payload


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that carries the :class:`_Hub` its handlers answer from."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        host, bound_port = self.server_address[:2]
        self.hub = _Hub(f"http://{host}:{bound_port}")


class _Handler(BaseHTTPRequestHandler):
    """Reads a request fully, asks the hub, and writes the answer (headers only for ``HEAD``)."""

    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT_S
    # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every request.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            response = self.server.hub.handle(self.command, url.path, parse_qs(url.query), body)
        except _HubError as error:
            response = error.response()
        except Exception as error:
            logger.exception("test Hub failed on %s %s", self.command, self.path)
            response = _HubError(500, f"Test Hub error: {error!r}").response()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HubError(411, "The test Hub needs a Content-Length, not a chunked body")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _HubError(400, "Invalid Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise _HubError(413, f"Request bodies are limited to {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class HubServer:
    """A Hub-compatible server on 127.0.0.1, for the real ``huggingface_hub`` client.

    The port is bound on construction, so :attr:`endpoint` can be exported as ``HF_ENDPOINT``
    before the server starts or ``huggingface_hub`` is imported. Use it as a context manager, or
    call :meth:`start` and :meth:`stop`::

        with HubServer() as hub:
            os.environ["HF_ENDPOINT"] = hub.endpoint
            ...

    Args:
        port: The port to bind; 0 (the default) picks a free one.
    """

    def __init__(self, port: int = 0) -> None:
        self._server = _Server(port)
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``, to use as ``HF_ENDPOINT``."""
        return self._server.hub.endpoint

    def start(self) -> HubServer:
        """Serve requests from a daemon thread until :meth:`stop`; returns the server."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="test-hub",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; a stopped server cannot be started again."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def files(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The files of a repo at a branch or commit sha, to check what a push stored."""
        return self._server.hub.files(repo_type, repo_id, revision)
