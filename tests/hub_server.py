"""A small Hugging Face Hub-compatible HTTP server for tests (127.0.0.1, stdlib only).

It implements exactly the endpoints ``huggingface_hub`` 2.x calls for whoami, ``create_repo``, repo info,
``preupload``, the LFS batch API (basic and multipart transfers, verify), ``create_commit`` (ndjson),
tree listing and ``resolve`` downloads (GET/HEAD with ETag / X-Repo-Commit / X-Linked-* headers and Range).
Model repos only. Xet is never advertised; clients must run with ``HF_HUB_DISABLE_XET`` (see the
``hub_server`` fixture in ``conftest.py`` and ``docs/hub.md``).

Storage lives under ``root``: per repo a ``repo.json`` (commits, files), ``blobs/<git sha1>`` for regular
files and ``lfs/<sha256>`` for LFS objects. Commit ids are 40-hex sha1s over (parent, tree, message, time).
Tests can inject failures (:meth:`HubServer.fail_on`) and count requests and stored LFS objects.
This module holds the state, storage and HTTP plumbing; the endpoints are in ``hub_server_api.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".model",
                ".zip", ".tar", ".gz", ".npy", ".npz", ".pkl", ".parquet", ".arrow")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files this large as LFS whatever their name
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
PAGE_SIZE = 1000

#: Tokens every server accepts unless built with ``default_tokens=False``.
WRITE_TOKEN = "hf_test_alice_write_0123456789"  # user "alice", member of org "qconv-org"
READ_TOKEN = "hf_test_alice_read_0123456789"  # user "alice", read-only
OTHER_TOKEN = "hf_test_bob_write_0123456789"  # user "bob"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class TokenInfo:
    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True


@dataclass
class Repo:
    repo_id: str
    private: bool
    dir: Path
    commits: list[dict[str, Any]] = field(default_factory=list)  # oldest first: {oid, parent, message, files}

    @property
    def head(self) -> dict[str, Any]:
        return self.commits[-1]

    def commit_at(self, revision: str) -> dict[str, Any] | None:
        if revision in ("main", "refs/heads/main"):
            return self.head
        return next((c for c in self.commits if c["oid"] == revision), None)

    def save(self) -> None:
        state = {"repo_id": self.repo_id, "private": self.private, "commits": self.commits}
        (self.dir / "repo.json").write_text(json.dumps(state, indent=1))


@dataclass
class _FailRule:
    kind: str
    nth: int
    times: int
    status: int


class HubError(Exception):
    """An HTTP error answer: status, Hub error code (X-Error-Code) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubServer:
    """The server state plus a running ThreadingHTTPServer. Use as a context manager or call close()."""

    def __init__(self, root: str | Path | None = None, *, multipart_threshold: int | None = None,
                 multipart_chunk: int = 5 * 1024 * 1024, page_size: int = PAGE_SIZE, default_tokens: bool = True):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="hub-server-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.page_size = page_size
        self.tokens: dict[str, TokenInfo] = {}
        if default_tokens:
            self.add_token(WRITE_TOKEN, "alice", orgs=("qconv-org",))
            self.add_token(READ_TOKEN, "alice", write=False)
            self.add_token(OTHER_TOKEN, "bob")
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.kind_counts: Counter[str] = Counter()
        self.lfs_stored: Counter[str] = Counter()  # oid -> times an upload of it completed
        self.lfs_bytes_received = 0
        self._fail_rules: list[_FailRule] = []
        self._uploads: dict[str, Path] = {}  # multipart upload id -> parts folder
        self.lock = threading.RLock()
        from hub_server_api import Handler

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- test helpers
    def add_token(self, token: str, user: str, orgs: tuple[str, ...] = (), write: bool = True) -> str:
        self.tokens[token] = TokenInfo(user, tuple(orgs), write)
        return token

    def fail_on(self, kind: str, nth: int = 1, times: int = 1, status: int = 400) -> None:
        """Answer the ``nth`` request of ``kind`` (and the ``times - 1`` after it) with ``status``.

        Kinds: whoami, create_repo, repo_info, tree, preupload, lfs_batch, lfs_upload, lfs_part,
        lfs_complete, lfs_verify, commit, resolve. Counting starts at the call.
        """
        with self.lock:
            self._fail_rules.append(_FailRule(kind, self.kind_counts[kind] + nth, times, status))

    def count(self, kind: str) -> int:
        return self.kind_counts[kind]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repo at a revision (for assertions)."""
        repo = self.repos[repo_id]
        commit = repo.commit_at(revision)
        return {path: self._read_entry(repo, entry) for path, entry in commit["files"].items()}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- auth
    def token_info(self, headers) -> TokenInfo | None:
        auth = headers.get("authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        info = self.tokens.get(token)
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info

    def check_read(self, repo_id: str, who: TokenInfo | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._is_member(repo_id, who)):
            raise HubError(404 if who else 401, "Repository not found", "RepoNotFound")
        return repo

    def check_write(self, repo_id: str, who: TokenInfo | None) -> Repo:
        if who is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        repo = self.check_read(repo_id, who)
        if not (who.write and self._is_member(repo_id, who)):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _is_member(repo_id: str, who: TokenInfo | None) -> bool:
        return who is not None and repo_id.split("/")[0] in (who.user, *who.orgs)

    # ---------------------------------------------------------------- storage
    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def _read_entry(self, repo: Repo, entry: dict[str, Any]) -> bytes:
        if entry.get("lfs"):
            return (repo.dir / "lfs" / entry["lfs"]).read_bytes()
        return (repo.dir / "blobs" / entry["blob"]).read_bytes()

    def entry_path(self, repo: Repo, entry: dict[str, Any]) -> Path:
        return repo.dir / ("lfs" if entry.get("lfs") else "blobs") / (entry.get("lfs") or entry["blob"])

    def has_lfs(self, repo: Repo, oid: str) -> bool:
        return (repo.dir / "lfs" / oid).is_file()

    def store_blob(self, repo: Repo, data: bytes) -> dict[str, Any]:
        sha1 = git_blob_sha1(data)
        path = repo.dir / "blobs" / sha1
        if not path.exists():
            path.write_bytes(data)
        return {"blob": sha1, "size": len(data), "lfs": None}

    def store_lfs_file(self, repo: Repo, oid: str, tmp: Path) -> None:
        """Move a received object into the LFS store after checking its sha256."""
        if sha256_path(tmp) != oid:
            tmp.unlink()
            raise HubError(400, f"uploaded content does not match oid {oid}")
        tmp.replace(repo.dir / "lfs" / oid)
        self.lfs_stored[oid] += 1

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private, self._repo_dir(repo_id))
        for sub in ("blobs", "lfs", "tmp"):
            (repo.dir / sub).mkdir(parents=True, exist_ok=True)
        self.repos[repo_id] = repo
        self.new_commit(repo, {".gitattributes": self.store_blob(repo, GITATTRIBUTES)}, "initial commit", None)
        return repo

    def new_commit(self, repo: Repo, files: dict[str, dict], message: str, parent: str | None) -> str:
        tree = json.dumps(sorted((p, e.get("lfs") or e["blob"]) for p, e in files.items()))
        blob = f"tree {tree}\nparent {parent}\ntime {time.time_ns()}\n\n{message}".encode()
        oid = hashlib.sha1(blob).hexdigest()
        repo.commits.append({"oid": oid, "parent": parent, "message": message, "files": files, "date": time.time()})
        repo.save()
        return oid


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- HTTP plumbing
class HubRequestHandler(BaseHTTPRequestHandler):
    """HTTP plumbing: routing, bodies (Content-Length or chunked), JSON answers, errors, fault injection."""

    routes: list[tuple[str, re.Pattern, str]] = []  # (method, path pattern, kind): set by the API subclass
    streamed: frozenset[str] = frozenset()  # kinds whose bodies are read by the endpoint itself

    protocol_version = "HTTP/1.1"
    server_version = "qconv-test-hub"

    def log_message(self, format: str, *args) -> None:  # quiet: tests read hub.requests instead
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- plumbing
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path, self.query = unquote(split.path), parse_qs(split.query)
        self._body_read = False
        status = 500
        try:
            name, params = self._route(path)
            with self.hub.lock:
                self.hub.kind_counts[name] += 1
                count = self.hub.kind_counts[name]
                rule = next((r for r in self.hub._fail_rules if r.kind == name and r.nth <= count and r.times), None)
                if rule:
                    rule.times -= 1
            if rule:
                self._drain()
                raise HubError(rule.status, f"injected failure ({name} #{count})")
            if name not in self.streamed:
                self.body = self._read_body()
            status = getattr(self, "_h_" + name)(**params) or 200
        except HubError as err:
            status = err.status
            self._drain()
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._send_json(err.status, {"error": err.message, **err.extra}, headers)
        except Exception as err:  # a server bug: report it loudly to the client
            status = 500
            self._drain()
            self._send_json(500, {"error": f"test server error: {type(err).__name__}: {err}"})
        finally:
            with self.hub.lock:
                self.hub.requests.append((self.command, path, status))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _route(self, path: str) -> tuple[str, dict[str, str]]:
        for method, pattern, name in self.routes:
            if method == self.command and (m := pattern.match(path)):
                return name, {k: v for k, v in m.groupdict().items() if v is not None}
        raise HubError(404, f"no such endpoint: {self.command} {path}")

    def _chunks(self):
        """Yield the request body (Content-Length or chunked) in pieces."""
        self._body_read = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            block = self.rfile.read(min(remaining, 1 << 20))
            if not block:
                return
            remaining -= len(block)
            yield block

    def _read_body(self) -> bytes:
        return b"".join(self._chunks())

    def _drain(self) -> None:
        if not self._body_read:
            for _ in self._chunks():
                pass

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from exc

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _who(self) -> TokenInfo | None:
        return self.hub.token_info(self.headers)

    def _commit(self, repo: Repo, rev: str) -> dict[str, Any]:
        commit = repo.commit_at(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

# -------------------------------------------------------------------------------------------------- client setup
def point_client_at(monkeypatch, url: str, home: Path) -> None:
    """Point the real huggingface_hub client (already imported or not) at ``url`` for one test.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_CACHE`` and
    ``HF_TOKEN_PATH`` into ``huggingface_hub.constants`` when it is first imported, so setting the environment
    alone is not enough once it has been imported: patch both the environment (for code that reads it at
    call time, e.g. ``qconv.hub``, and for subprocesses) and the constants.
    """
    from huggingface_hub import constants

    cache, token_path = home / "hub-cache", home / "token"
    env = {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(cache),
           "HF_TOKEN_PATH": str(token_path), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # uploads use Xet whenever hf_xet is installed
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_path))
