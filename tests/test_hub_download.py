"""qconv.hub download side, without a server: repo-id detection, the offline cache path, error mapping."""

from __future__ import annotations

import pytest

from qconv.errors import QconvError
from qconv.hub import download_snapshot, looks_like_repo_id

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An HF cache holding one snapshot of ``acme/tiny`` (main -> SHA), offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


@pytest.mark.parametrize(
    "text,expected",
    [
        ("acme/tiny", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("gpt2", False),  # bare names need a namespace
        ("./acme/tiny", False),
        ("/abs/path", False),
        ("model.gguf", False),
        ("a/b/c", False),
        ("acme/../etc", False),
        ("acme/tiny.gguf", False),
    ],
)
def test_looks_like_repo_id(text, expected):
    assert looks_like_repo_id(text) is expected


def test_existing_local_path_is_not_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert looks_like_repo_id("acme/tiny") is False


def test_offline_cache_hit_returns_folder_and_commit(fake_cache):
    folder, commit = download_snapshot("acme/tiny")
    assert folder == fake_cache.resolve() or folder.resolve() == fake_cache.resolve()
    assert commit == SHA
    assert (folder / "config.json").is_file()


def test_offline_cache_hit_by_commit(fake_cache):
    folder, commit = download_snapshot("acme/tiny", revision=SHA)
    assert commit == SHA and (folder / "config.json").is_file()


def test_offline_cache_miss_is_a_one_line_qconv_error(fake_cache):
    with pytest.raises(QconvError) as info:
        download_snapshot("acme/other", token="hf_secret_token_value")
    msg = str(info.value)
    assert "acme/other" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    assert "hf_secret_token_value" not in msg


def test_offline_unknown_revision(fake_cache):
    with pytest.raises(QconvError, match="acme/tiny@v9"):
        download_snapshot("acme/tiny", revision="v9")


def test_unreachable_endpoint_is_a_qconv_error(tmp_path, monkeypatch):
    """Online mode against a closed local port: a connection failure, not a traceback."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # find a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(QconvError, match="acme/tiny"):
        download_snapshot("acme/tiny")
