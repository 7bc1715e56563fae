"""The loopback Hub server speaks what the real huggingface_hub client expects (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from hub_server import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN, git_blob_sha1

REPO = "alice/files"


@pytest.fixture
def api(hub_server):
    from huggingface_hub import HfApi

    return HfApi(token=WRITE_TOKEN)


@pytest.fixture
def repo(api, tmp_path):
    """A repo with a text file, an LFS weight, a binary blob and a nested folder; returns local contents."""
    files = {"a.txt": b"hello\n", "w.safetensors": bytes(range(256)) * 40, "blob.dat": b"\0\1\2binary",
             "sub/deep/c.json": b"{}", "sub/d.md": b"# d\n"}
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "src", commit_message="add files")
    return files


def http(method, url, token=WRITE_TOKEN, **kw):
    from huggingface_hub.utils import get_session

    headers = kw.pop("headers", {})
    if token:
        headers["authorization"] = f"Bearer {token}"
    return get_session().request(method, url, headers=headers, **kw)


def test_whoami_and_auth_errors(hub_server, api):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    me = api.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["qconv-org"]
    assert HfApi(token=READ_TOKEN).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_unknown").whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=OTHER_TOKEN).create_repo("alice/not-bobs")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=READ_TOKEN).create_repo("alice/read-only")
    assert err.value.response.status_code == 403
    assert api.create_repo("qconv-org/team-repo").repo_id == "qconv-org/team-repo"  # org member


def test_upload_modes_and_listing(hub_server, api, repo):
    head = hub_server.repos[REPO].head["files"]
    assert head["w.safetensors"]["lfs"] and head["blob.dat"]["lfs"]  # by suffix, by binary content
    assert head["a.txt"]["lfs"] is None and head["sub/deep/c.json"]["lfs"] is None
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *repo])
    top = {(e.path, type(e).__name__) for e in api.list_repo_tree(REPO)}
    assert ("sub", "RepoFolder") in top and ("a.txt", "RepoFile") in top and len(top) == 5
    deep = {e.path for e in api.list_repo_tree(REPO, "sub", recursive=True)}
    assert deep == {"sub/deep", "sub/deep/c.json", "sub/d.md"}
    hub_server.page_size = 2  # the client follows Link: rel="next"
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *repo])
    info = api.model_info(REPO, files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    weights = repo["w.safetensors"]
    assert sib["w.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert sib["w.safetensors"].size == len(weights) and sib["a.txt"].blob_id == git_blob_sha1(b"hello\n")
    assert len(info.sha) == 40 and info.sha == hub_server.repos[REPO].head["oid"]


def test_resolve_headers_range_and_old_revisions(hub_server, api, repo):
    from huggingface_hub import hf_hub_download

    sha = api.model_info(REPO).sha
    head = http("HEAD", f"{hub_server.url}/{REPO}/resolve/main/w.safetensors")
    weights = repo["w.safetensors"]
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert int(head.headers["X-Linked-Size"]) == len(weights) and head.content == b""
    part = http("GET", f"{hub_server.url}/{REPO}/resolve/{sha}/w.safetensors", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == weights[100:200]
    text = http("HEAD", f"{hub_server.url}/{REPO}/resolve/main/a.txt")
    assert text.headers["ETag"] == f'"{git_blob_sha1(b"hello" + bytes([10]))}"'
    missing = http("HEAD", f"{hub_server.url}/{REPO}/resolve/main/nope.txt")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"

    api.upload_file(path_or_fileobj=b"changed\n", path_in_repo="a.txt", repo_id=REPO)
    assert open(hf_hub_download(REPO, "a.txt", revision=sha), "rb").read() == b"hello\n"
    assert open(hf_hub_download(REPO, "a.txt"), "rb").read() == b"changed\n"


def test_private_repos_are_hidden(hub_server, api):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api.create_repo("alice/secret", private=True)
    assert api.model_info("alice/secret").private
    for token in (OTHER_TOKEN, False):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info("alice/secret")


def test_commit_rules(hub_server, api, repo):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    url = f"{hub_server.url}/api/models/{REPO}/commit/main"
    payload = [{"key": "header", "value": {"summary": "x"}},
               {"key": "lfsFile", "value": {"path": "ghost.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}}]
    answer = http("POST", url, content="\n".join(map(json.dumps, payload)).encode())
    assert answer.status_code == 422 and "never uploaded" in answer.json()["error"]
    old = api.model_info(REPO).sha
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as err:  # someone committed since `old`
        api.create_commit(REPO, [CommitOperationAdd("y.txt", b"y")], commit_message="y", parent_commit=old)
    assert err.value.response.status_code == 412
    assert http("POST", url, token=OTHER_TOKEN, content=b"").status_code == 403


def test_injected_failures_and_request_log(hub_server, api):
    from huggingface_hub.errors import HfHubHTTPError

    api.create_repo(REPO)
    hub_server.fail_on("repo_info", nth=2, status=503, times=6)  # more than the client's retries
    api.model_info(REPO)
    with pytest.raises(HfHubHTTPError):
        api.model_info(REPO)
    assert http("GET", f"{hub_server.url}/api/no/such/thing").status_code == 404
    assert ("GET", "/api/no/such/thing", 404) in hub_server.requests
    assert hub_server.count("repo_info") == 2
