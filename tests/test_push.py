"""push_output against the loopback Hub server, with the real huggingface_hub client.

The pushed directory is a real bnb 4-bit output: transformers quantize-on-load + save_pretrained
(three shards) + format.write_manifest, built once per session.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest

from hub_server import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN
from qconv import __version__
from qconv.errors import QconvError
from qconv.format import MANIFEST_NAME, Manifest, QuantSettings, read_manifest, sha256_file, write_manifest

SOURCE_ID = "test-org/tiny-llama"
SOURCE_REV = "0123456789abcdef0123456789abcdef01234567"
REPO = "alice/tiny-llama-bnb-4bit"


def build_output(src: Path, out: Path, source_id: str = SOURCE_ID, revision: str = SOURCE_REV) -> Path:
    """A bnb 4-bit output of ``src`` made by transformers, plus card and manifest (what convert writes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qconv.converter.card import write_card

    settings = QuantSettings()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=settings.bnb_config(), device_map="cpu",
                                                 dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, out / name)
    manifest = Manifest(source={"id": source_id, "revision": revision, "kind": "hub", "sha256": None},
                        settings=settings.to_dict())
    write_card(out, manifest, model.config.to_dict(), None)
    manifest.files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.name != MANIFEST_NAME}
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="session")
def pristine_output(tiny_checkpoint_factory, tmp_path_factory) -> Path:
    return build_output(tiny_checkpoint_factory("llama"), tmp_path_factory.mktemp("push") / "tiny-llama-bnb-4bit")


@pytest.fixture
def output(pristine_output, tmp_path) -> Path:
    """A private copy of the output that a test may change."""
    return Path(shutil.copytree(pristine_output, tmp_path / "out"))


def push(out: Path, **kw) -> str:
    from qconv.converter.push import push_output

    kw.setdefault("token", WRITE_TOKEN)
    return push_output(out, **kw)


def snapshot(repo: str, token: str = WRITE_TOKEN) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, token=token))


def assert_same_files(local: Path, remote: Path) -> None:
    local_files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    remote_files = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()} - {".gitattributes"}
    assert local_files == remote_files
    for rel in local_files:
        assert (remote / rel).read_bytes() == (local / rel).read_bytes(), rel


def test_push_then_snapshot_download_is_byte_identical(hub_server, output):
    assert push(output) == REPO
    assert_same_files(output, snapshot(REPO))
    repo = hub_server.repos[REPO]
    head = repo.head
    assert SOURCE_ID in head["message"] and SOURCE_REV in head["message"] and __version__ in head["message"]
    assert len(repo.commits) == 2  # the Hub's initial commit, then ours: one commit for all files
    shards = [p for p in head["files"] if p.endswith(".safetensors")]
    assert len(shards) == 3 and all(head["files"][p]["lfs"] for p in shards)
    assert head["files"]["config.json"]["lfs"] is None
    assert not repo.private


def test_namespace_and_private(hub_server, output):
    assert push(output, namespace="qconv-org", private=True) == "qconv-org/tiny-llama-bnb-4bit"
    assert hub_server.repos["qconv-org/tiny-llama-bnb-4bit"].private
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):  # bob may not see it
        snapshot("qconv-org/tiny-llama-bnb-4bit", token=OTHER_TOKEN)


def test_token_from_env_never_leaks(hub_server, output, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    caplog.set_level(logging.DEBUG)
    assert push(output, token=None) == REPO
    with pytest.raises(QconvError) as bad:
        push(output, token="hf_not_a_valid_token_42", repo_id="alice/other")
    out, err = capsys.readouterr()
    texts = [caplog.text, out, err, str(bad.value), hub_server.repos[REPO].head["message"]]
    texts += [p.read_text(errors="replace") for p in output.rglob("*") if p.is_file()]
    texts += [p.read_text(errors="replace") for p in snapshot(REPO).rglob("*") if p.is_file()]
    assert caplog.text  # the push did log
    for text in texts:
        assert WRITE_TOKEN not in text and "hf_not_a_valid_token_42" not in text


def test_no_token_is_a_clear_error(hub_server, output):
    with pytest.raises(QconvError, match="no Hugging Face token"):
        push(output, token=None)
    assert hub_server.count("create_repo") == 0


def test_invalid_token(hub_server, output):
    with pytest.raises(QconvError, match="rejected the token.*401"):
        push(output, token="hf_wrong")


@pytest.mark.parametrize("token, repo_id", [(READ_TOKEN, None), (OTHER_TOKEN, REPO)])
def test_no_write_access(hub_server, output, token, repo_id):
    with pytest.raises(QconvError, match=f"push to {REPO}: no write access.*403"):
        push(output, token=token, repo_id=repo_id)
    assert REPO not in hub_server.repos


def test_no_write_access_to_an_existing_repo_of_someone_else(hub_server, output):
    push(output)
    with pytest.raises(QconvError, match="no write access.*403"):
        push(output, token=OTHER_TOKEN, repo_id=REPO, overwrite=True)


def test_existing_repo_with_other_content_is_refused_unless_overwrite(hub_server, output):
    from huggingface_hub import HfApi

    api = HfApi(token=WRITE_TOKEN)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"someone else's model", path_in_repo="weights.bin", repo_id=REPO)
    with pytest.raises(QconvError, match="already exists.*different content.*no qconv_manifest.json.*--overwrite"):
        push(output)
    assert set(hub_server.files(REPO)) == {".gitattributes", "weights.bin"}
    push(output, overwrite=True)
    assert "weights.bin" not in hub_server.files(REPO)  # replaced in the same commit
    assert_same_files(output, snapshot(REPO))


def test_other_qconv_output_is_refused_identical_is_accepted(hub_server, output, tmp_path):
    push(output)
    commits, stored = len(hub_server.repos[REPO].commits), dict(hub_server.lfs_stored)
    assert push(output) == REPO  # identical content: fine, and nothing is sent again
    assert dict(hub_server.lfs_stored) == stored
    assert len(hub_server.repos[REPO].commits) == commits

    changed = Path(shutil.copytree(output, tmp_path / "changed"))
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    manifest = read_manifest(changed)
    manifest.files["config.json"] = sha256_file(changed / "config.json")
    write_manifest(changed, manifest)
    with pytest.raises(QconvError, match=r"different content \(1 file\(s\) differ, e.g. config.json\)"):
        push(changed)
    push(changed, overwrite=True)
    assert hub_server.files(REPO)["config.json"] == (changed / "config.json").read_bytes()


def test_hub_side_rejection_is_a_clear_error(hub_server, output):
    card = output / "README.md"
    card.write_text("---\nlicense: [unclosed\n---\n# card\n")
    manifest = read_manifest(output)
    manifest.files["README.md"] = sha256_file(card)
    write_manifest(output, manifest)
    with pytest.raises(QconvError, match=f"push to {REPO} failed .*Invalid metadata in README.md"):
        push(output)


def test_private_is_not_applied_to_an_existing_public_repo(hub_server, output, caplog):
    push(output)
    push(output, private=True)
    assert not hub_server.repos[REPO].private and "--private does not change an existing repo" in caplog.text


def test_modified_output_is_refused(hub_server, output):
    shard = output / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(QconvError, match="model-00002-of-00003.safetensors: sha256 differs"):
        push(output)
    assert hub_server.count("create_repo") == 0


def test_not_a_qconv_output(hub_server, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QconvError, match="no qconv_manifest.json"):
        push(tmp_path)


def test_network_down(hub_server, output, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    for kw in ({}, {"repo_id": REPO}):
        with pytest.raises(QconvError, match="cannot reach the Hub at " + closed):
            push(output, **kw)


def test_dry_run_lists_files_and_writes_nothing(hub_server, output, caplog):
    caplog.set_level(logging.INFO, logger="qconv")
    assert push(output, dry_run=True) == REPO
    assert REPO not in hub_server.repos
    assert {m for m, _, _ in hub_server.requests} <= {"GET", "HEAD"}
    text = caplog.text
    assert f"{hub_server.url}/{REPO}" in text and "new repo" in text
    for p in output.iterdir():
        assert p.name in text
    assert "KiB" in text  # sizes are shown


def test_dry_run_without_token_needs_a_namespace(hub_server, output, caplog):
    caplog.set_level(logging.INFO, logger="qconv")
    assert push(output, token=None, dry_run=True, namespace="alice") == REPO
    with pytest.raises(QconvError, match="--repo-id or --namespace"):
        push(output, token=None, dry_run=True)


def test_dry_run_reports_a_conflict(hub_server, output, tmp_path):
    push(output)
    other = Path(shutil.copytree(output, tmp_path / "other"))
    manifest = read_manifest(other)
    manifest.files["config.json"] = "0" * 64
    (other / "config.json").unlink()
    manifest.files.pop("config.json")
    write_manifest(other, manifest)
    with pytest.raises(QconvError, match="different content"):
        push(other, dry_run=True)


@pytest.mark.parametrize("kind, multipart", [("lfs_upload", None), ("lfs_part", 40_000)])
def test_interrupted_push_resumes_without_resending(hub_server, output, kind, multipart):
    if multipart:
        hub_server.multipart_threshold, hub_server.multipart_chunk = multipart, 16_384
    hub_server.fail_on(kind, nth=2, status=400)  # the 2nd upload request breaks once
    with pytest.raises(QconvError, match="re-run the same command to resume"):
        push(output)
    arrived = {oid for oid, n in hub_server.lfs_stored.items() if n}
    assert arrived, "nothing arrived before the failure: the test would prove nothing"
    assert not hub_server.repos[REPO].head["files"].keys() - {".gitattributes"}  # no partial commit

    assert push(output) == REPO
    assert (hub_server.count("lfs_part") > 0) == bool(multipart)
    manifest = read_manifest(output)
    shards = {manifest.files[p] for p in manifest.files if p.endswith(".safetensors")}
    assert set(hub_server.lfs_stored) == shards
    assert all(n == 1 for n in hub_server.lfs_stored.values()), hub_server.lfs_stored  # nothing sent twice
    assert_same_files(output, snapshot(REPO))


def test_default_repo_name():
    from qconv.converter.push import default_repo_name

    def name(source_id):
        return default_repo_name(Manifest(source={"id": source_id}, settings={}))

    assert name("meta-llama/Llama-3.1-8B") == "Llama-3.1-8B-bnb-4bit"
    assert name("/data/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1-bnb-4bit"
    assert name("C:\\models\\my model (v2)/") == "my-model-v2-bnb-4bit"
    assert name("") == "model-bnb-4bit"



def test_commit_message_names_source_revision_and_version_without_local_paths():
    from qconv.converter.push import describe_source

    def describe(**source):
        return describe_source(Manifest(source=source, settings={}))

    assert describe(kind="hub", id="org/model", revision="a" * 40) == ("org/model", "a" * 40)
    assert describe(kind="dir", id="/home/me/secret/llama", revision=None, sha256="f" * 64) == ("llama", "sha256:ffffffffffff")
    assert describe(kind="gguf", id="SmolLM2.Q4_1.gguf", revision=None) == ("SmolLM2.Q4_1.gguf", "local gguf")


def test_cli_convert_push_then_snapshot_download_is_byte_identical(hub_server, tiny_checkpoint_factory, tmp_path,
                                                                   monkeypatch):
    from click.testing import CliRunner

    from qconv.converter.cli import main

    out = tmp_path / "tiny-bnb-4bit"
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    args = ["convert", str(tiny_checkpoint_factory("llama")), "--out", str(out), "--no-progress",
            "--push", "--repo-id", "alice/tiny-bnb-4bit"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pushed to alice/tiny-bnb-4bit" in result.output and WRITE_TOKEN not in result.output
    assert_same_files(out, snapshot("alice/tiny-bnb-4bit"))
    assert 'from_pretrained("alice/tiny-bnb-4bit")' in (out / "README.md").read_text()  # the card names the repo
    message = hub_server.repos["alice/tiny-bnb-4bit"].head["message"]
    assert "Convert src-llama" in message and "sha256:" in message and __version__ in message
    assert str(tmp_path) not in message and "/" not in message.split(" to ")[0]

    result = CliRunner().invoke(main, [*args[:2], "--out", str(tmp_path / "again"), "--no-progress", "--push",
                                       "--repo-id", "alice/tiny-bnb-4bit", "--token", "hf_bad"])
    assert result.exit_code == 1 and "rejected the token" in result.output and "hf_bad" not in result.output


def test_cli_push_dry_run_uploads_nothing(hub_server, tiny_checkpoint_factory, tmp_path, caplog):
    from click.testing import CliRunner

    from qconv.converter.cli import main

    caplog.set_level(logging.INFO, logger="qconv")
    args = ["convert", str(tiny_checkpoint_factory("llama")), "--out", str(tmp_path / "o"), "--no-progress",
            "--push", "--dry-run", "--namespace", "qconv-org", "--token", WRITE_TOKEN]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "would push to qconv-org/src-llama" in result.output
    assert "model.safetensors" in caplog.text and "new repo" in caplog.text
    assert not hub_server.repos and hub_server.count("commit") == 0


def test_cli_push_without_token_fails_before_converting(hub_server, tiny_checkpoint_factory, tmp_path, monkeypatch):
    """No --repo-id/--namespace and no token: the default repo id needs the user name, so the command stops before
    spending time on a conversion, and writes nothing."""
    from click.testing import CliRunner

    from qconv.converter.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("qconv.converter.push.resolve_token", lambda token=None: token)
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["convert", str(tiny_checkpoint_factory("llama")), "--out", str(out),
                                       "--no-progress", "--push"])
    assert result.exit_code == 1 and "no token" in result.output
    assert not [p.name for p in tmp_path.iterdir() if "never" in p.name]  # no output, no temporary directory


def test_cli_push_default_repo_id_from_token_user(hub_server, tiny_checkpoint_factory, tmp_path):
    from click.testing import CliRunner

    from qconv.converter.cli import main

    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["convert", str(tiny_checkpoint_factory("llama")), "--out", str(out),
                                       "--no-progress", "--push", "--token", WRITE_TOKEN], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    src_name = tiny_checkpoint_factory("llama").name  # e.g. src-llama0
    assert f"pushed to alice/{src_name}-bnb-4bit" in result.output
    assert f'from_pretrained("alice/{src_name}-bnb-4bit")' in (out / "README.md").read_text()
