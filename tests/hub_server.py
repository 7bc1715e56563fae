"""A small Hugging Face Hub-compatible HTTP server for tests (127.0.0.1, stdlib only).

It implements exactly the endpoints ``huggingface_hub`` 2.x calls for whoami, ``create_repo``, repo info,
``preupload``, the LFS batch API (basic and multipart transfers, verify), ``create_commit`` (ndjson),
tree listing and ``resolve`` downloads (GET/HEAD with ETag / X-Repo-Commit / X-Linked-* headers and Range).
Model repos only. Xet is never advertised; clients must run with ``HF_HUB_DISABLE_XET`` (see the
``hub_server`` fixture in ``conftest.py`` and ``docs/hub.md``).

Storage lives under ``root``: per repo a ``repo.json`` (commits, files), ``blobs/<git sha1>`` for regular
files and ``lfs/<sha256>`` for LFS objects. Commit ids are 40-hex sha1s over (parent, tree, message, time).
Tests can inject failures (:meth:`HubServer.fail_on`) and count requests and stored LFS objects.
"""

from __future__ import annotations

import base64
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
from urllib.parse import parse_qs, quote, unquote, urlsplit

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
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
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


# -------------------------------------------------------------------------------------------------- routes
_REPO = r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + r"$"), name)
    for m, p, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
        ("PUT", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/part/(?P<part>\d+)", "lfs_part"),
        ("POST", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/complete", "lfs_complete"),
        ("POST", rf"/_lfs/{_REPO}/verify", "lfs_verify"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]
_STREAMED = {"lfs_upload", "lfs_part"}  # bodies written to disk while read, never held in memory


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "qconv-test-hub"

    def log_message(self, format: str, *args) -> None:  # quiet: tests read hub.requests instead
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

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
            if name not in _STREAMED:
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

    def _route(self, path: str) -> tuple[str, dict[str, str]]:
        for method, pattern, name in _ROUTES:
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

    # ---------------------------------------------------------------- endpoints
    def _h_whoami(self):
        who = self._who()
        if who is None:
            raise HubError(401, "Unauthorized")
        role = "write" if who.write else "read"
        self._send_json(200, {
            "type": "user", "name": who.user, "fullname": who.user.title(),
            "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in who.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
        })

    def _h_validate_yaml(self):
        import yaml

        content = self._json_body().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            self._send_json(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
            return
        if meta is not None and not isinstance(meta, dict):
            self._send_json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    def _h_create_repo(self):
        who = self._who()
        if who is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or who.user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if not (who.write and namespace in (who.user, *who.orgs)):
                raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private)
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _h_repo_info(self, repo: str, rev: str = "main"):
        r = self.hub.check_read(repo, self._who())
        commit = self._commit(r, rev)
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry["size"], blobId=entry["blob"])
                if entry.get("lfs"):
                    sib["lfs"] = {"sha256": entry["lfs"], "size": entry["size"],
                                  "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
            siblings.append(sib)
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit["date"]))
        self._send_json(200, {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": commit["oid"], "lastModified": date, "createdAt": date,
            "private": r.private, "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
            "siblings": siblings,
        })

    def _h_tree(self, repo: str, rev: str, path: str = ""):
        r = self.hub.check_read(repo, self._who())
        commit = self._commit(r, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit["files"]):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        items: dict[str, dict[str, Any]] = {}
        for fpath, entry in sorted(commit["files"].items()):
            if not fpath.startswith(prefix):
                continue
            rest = fpath[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # folders on the way
                if depth > 1 and not recursive:
                    break
                folder = prefix + "/".join(rest[:depth])
                items.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                          "oid": hashlib.sha1(folder.encode() + commit["oid"].encode()).hexdigest()})
            if len(rest) == 1 or recursive:
                item = {"type": "file", "path": fpath, "size": entry["size"], "oid": entry["blob"]}
                if entry.get("lfs"):
                    item["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                                   "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
                items[fpath] = item
        listing = [items[k] for k in sorted(items)]
        start = int(self.query.get("cursor", ["0"])[0])
        page = listing[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            nxt = f"{self.hub.url}{urlsplit(self.path).path}?recursive={str(recursive).lower()}&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(200, page, headers)

    def _h_preupload(self, repo: str, rev: str):
        r = self.hub.check_write(repo, self._who())
        commit = self._commit(r, rev)
        out = []
        for f in self._json_body().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f.get("size", 0) >= LFS_MIN_SIZE or b"\0" in sample
            existing = commit["files"].get(f["path"])
            oid = (existing.get("lfs") or existing["blob"]) if existing else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": out, "commitOid": commit["oid"]})

    def _h_lfs_batch(self, repo: str):
        r = self.hub.check_write(repo, self._who())
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "this test server only accepts LFS uploads")
        transfers = payload.get("transfers") or ["basic"]
        base = f"{self.hub.url}/_lfs/{repo}"
        objects, used = [], "basic"
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if self.hub.has_lfs(r, oid):
                objects.append({"oid": oid, "size": size})  # present: no actions -> the client skips it
                continue
            upload: dict[str, Any] = {"href": f"{base}/{oid}"}
            threshold = self.hub.multipart_threshold
            if threshold is not None and size >= threshold and "multipart" in transfers:
                used = "multipart"
                upload_id = hashlib.sha1(f"{oid}{time.time_ns()}".encode()).hexdigest()
                chunk = self.hub.multipart_chunk
                n_parts = max(1, -(-size // chunk))
                upload = {"href": f"{base}/{oid}/complete?upload={upload_id}",
                          "header": {"chunk_size": str(chunk),
                                     **{str(i): f"{base}/{oid}/part/{i}?upload={upload_id}" for i in range(1, n_parts + 1)}}}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": {"href": f"{base}/verify"}}})
        self._send(200, json.dumps({"transfer": used, "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _h_lfs_upload(self, repo: str, oid: str):
        r = self._lfs_repo(repo)
        tmp = self._receive(r)
        with self.hub.lock:
            self.hub.store_lfs_file(r, oid, tmp)
        self._send(200, b"", content_type="text/plain")

    def _h_lfs_part(self, repo: str, oid: str, part: str):
        r = self._lfs_repo(repo)
        upload_id = self.query.get("upload", [""])[0]
        tmp = self._receive(r)
        folder = r.dir / "tmp" / f"parts-{upload_id}"
        folder.mkdir(exist_ok=True)
        tmp.replace(folder / f"{int(part):05d}")
        etag = '"' + sha256_path(folder / f"{int(part):05d}")[:32] + '"'
        self._send(200, b"", {"ETag": etag}, content_type="text/plain")

    def _h_lfs_complete(self, repo: str, oid: str):
        r = self._lfs_repo(repo)
        upload_id = self.query.get("upload", [""])[0]
        parts = self._json_body().get("parts", [])
        folder = r.dir / "tmp" / f"parts-{upload_id}"
        if not parts or not folder.is_dir():
            raise HubError(400, "unknown multipart upload or no parts")
        tmp = r.dir / "tmp" / f"assembled-{upload_id}"
        with open(tmp, "wb") as out:
            for p in sorted(parts, key=lambda p: p["partNumber"]):
                part_file = folder / f"{int(p['partNumber']):05d}"
                if not part_file.is_file():
                    raise HubError(400, f"part {p['partNumber']} was never uploaded")
                out.write(part_file.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        with self.hub.lock:
            self.hub.store_lfs_file(r, oid, tmp)
        self._send_json(200, {"oid": oid})

    def _h_lfs_verify(self, repo: str):
        r = self._lfs_repo(repo)
        body = self._json_body()
        path = r.dir / "lfs" / body.get("oid", "")
        if not path.is_file() or path.stat().st_size != int(body.get("size", -1)):
            raise HubError(404, f"object {body.get('oid')} not found or size differs")
        self._send_json(200, {"success": True})

    def _lfs_repo(self, repo: str) -> Repo:
        r = self.hub.repos.get(repo)
        if r is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return r  # like S3 presigned URLs: the href itself is the credential

    def _receive(self, repo: Repo) -> Path:
        fd, name = tempfile.mkstemp(dir=repo.dir / "tmp")
        with open(fd, "wb") as f:
            for block in self._chunks():
                f.write(block)
                with self.hub.lock:
                    self.hub.lfs_bytes_received += len(block)
        return Path(name)

    def _h_commit(self, repo: str, rev: str):
        r = self.hub.check_write(repo, self._who())
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            commit = self._commit(r, rev)
            if rev not in ("main", commit["oid"]) or commit is not r.head:
                raise HubError(400, "commits are only accepted on main")
            parent = header.get("parentCommit")
            if parent and parent != r.head["oid"]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(r.head["files"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"invalid path {path!r}")
                if key == "file":
                    files[path] = self.hub.store_blob(r, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if not self.hub.has_lfs(r, oid):
                        raise HubError(422, f"LFS pointer for {path} points to {oid}, which was never uploaded")
                    size = (r.dir / "lfs" / oid).stat().st_size
                    files[path] = {"blob": git_blob_sha1(lfs_pointer(oid, size)), "size": size, "lfs": oid}
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            message = header.get("summary", "") + ("\n\n" + header["description"] if header.get("description") else "")
            oid = self.hub.new_commit(r, files, message, r.head["oid"])
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}",
                              "commitMessage": header.get("summary", ""), "pullRequestUrl": None})

    def _h_resolve(self, repo: str, rev: str, path: str):
        r = self.hub.check_read(repo, self._who())
        commit = self._commit(r, rev)
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit["oid"]})
        file = self.hub.entry_path(r, entry)
        size = entry["size"]
        headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{entry.get("lfs") or entry["blob"]}"',
                   "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{quote(path.split("/")[-1])}"'}
        if entry.get("lfs"):
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
            if start >= size:
                raise HubError(416, "range not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            with open(file, "rb") as f:
                f.seek(start)
                while length > 0 and (block := f.read(min(length, 1 << 20))):
                    self.wfile.write(block)
                    length -= len(block)
        return status


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
