"""The endpoints of the loopback Hub server (tests/hub_server.py): one method per Hub API call.

Each ``_h_<kind>`` answers one route of :data:`ROUTES`; shapes follow what huggingface_hub 2.x parses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from hub_server import (
    LFS_MIN_SIZE,
    LFS_SUFFIXES,
    HubError,
    HubRequestHandler,
    Repo,
    git_blob_sha1,
    lfs_pointer,
    sha256_path,
)

# -------------------------------------------------------------------------------------------------- routes
REPO_RE = r"(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)"
ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + r"$"), name)
    for m, p, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO_RE}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{REPO_RE}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{REPO_RE}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO_RE}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{REPO_RE}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", rf"/_lfs/{REPO_RE}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
        ("PUT", rf"/_lfs/{REPO_RE}/(?P<oid>[0-9a-f]{{64}})/part/(?P<part>\d+)", "lfs_part"),
        ("POST", rf"/_lfs/{REPO_RE}/(?P<oid>[0-9a-f]{{64}})/complete", "lfs_complete"),
        ("POST", rf"/_lfs/{REPO_RE}/verify", "lfs_verify"),
        ("GET", rf"/{REPO_RE}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO_RE}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]
STREAMED = frozenset({"lfs_upload", "lfs_part"})  # bodies written to disk while read, never held in memory


class Handler(HubRequestHandler):
    routes = ROUTES
    streamed = STREAMED

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
