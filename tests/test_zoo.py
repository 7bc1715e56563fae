"""The zoo rebuild end to end against the loopback Hub: two tiny source repos, real convert/verify/push."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from qconv.errors import QconvError
from qconv.format import MANIFEST_NAME, QuantSettings, cache_key

ROOT = Path(__file__).resolve().parents[1]
ZOO_TOKEN = "hf_test_zoo_bot_0123456789"
SOURCES = {"tiny-llama": ("llama", "test-org/tiny-llama"), "tiny-qwen2": ("qwen2", "test-org/tiny-qwen2")}


def load_script():
    spec = importlib.util.spec_from_file_location("rebuild_zoo", ROOT / "scripts" / "rebuild_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def zoo(hub_server, tiny_checkpoint_factory, tmp_path, monkeypatch):
    """Two source repos on the server, a zoo file pointing at them, HF_TOKEN set; returns the zoo path."""
    from huggingface_hub import HfApi

    hub_server.add_token(ZOO_TOKEN, "zoo-bot", orgs=("test-org", "qconv-zoo"))
    monkeypatch.setenv("HF_TOKEN", ZOO_TOKEN)
    api = HfApi(token=ZOO_TOKEN)
    models = []
    for name, (arch, repo) in SOURCES.items():
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=tiny_checkpoint_factory(arch), commit_message="tiny model")
        models.append({"name": name, "source": repo, "target": f"qconv-zoo/{name}-bnb-4bit",
                       "settings": {"blocksize": 64}})
    models.append({"name": "broken", "source": "test-org/does-not-exist", "target": "qconv-zoo/broken"})
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def run(zoo_path, *args) -> int:
    return load_script().main(["--zoo", str(zoo_path), *args])


def commits(hub, repo):
    return [c["oid"] for c in hub.repos[repo].commits] if repo in hub.repos else []


def remote_manifest(hub, repo) -> dict:
    return json.loads(hub.files(repo)[MANIFEST_NAME])


def test_rebuild_converts_then_skips_then_rebuilds_only_what_changed(hub_server, zoo, capsys):
    from huggingface_hub import HfApi

    targets = {name: f"qconv-zoo/{name}-bnb-4bit" for name in SOURCES}
    assert run(zoo) == 1  # "broken" fails, the two others still convert
    table = capsys.readouterr().out
    assert "2 converted, 0 skipped, 1 failed" in table and "broken" in table
    api = HfApi(token=ZOO_TOKEN)
    for name, (_, source) in SOURCES.items():
        manifest = remote_manifest(hub_server, targets[name])
        sha = api.model_info(source).sha
        assert manifest["source"]["revision"] == sha and manifest["source"]["id"] == source
        assert cache_key(sha, QuantSettings.from_dict(manifest["settings"])) == cache_key(sha, QuantSettings())
    first = {t: commits(hub_server, t) for t in targets.values()}
    uploads = sum(hub_server.lfs_stored.values())

    assert run(zoo, "--only", "tiny-llama,tiny-qwen2") == 0
    assert "0 converted, 2 skipped, 0 failed" in capsys.readouterr().out
    assert {t: commits(hub_server, t) for t in targets.values()} == first
    assert sum(hub_server.lfs_stored.values()) == uploads

    api.upload_file(path_or_fileobj=b"# tiny qwen2\n", path_in_repo="README.md", repo_id=SOURCES["tiny-qwen2"][1])
    assert run(zoo, "--only", "tiny-llama", "--only", "tiny-qwen2") == 0
    out = capsys.readouterr().out
    assert "1 converted, 1 skipped, 0 failed" in out
    assert commits(hub_server, targets["tiny-llama"]) == first[targets["tiny-llama"]]
    assert len(commits(hub_server, targets["tiny-qwen2"])) == len(first[targets["tiny-qwen2"]]) + 1
    new_sha = api.model_info(SOURCES["tiny-qwen2"][1]).sha
    assert remote_manifest(hub_server, targets["tiny-qwen2"])["source"]["revision"] == new_sha


def test_dry_run_writes_nothing(hub_server, zoo, capsys):
    assert run(zoo, "--dry-run") == 1  # "broken" cannot be resolved
    out = capsys.readouterr().out
    assert out.count("would convert") == 2 and "1 failed" in out
    assert not [r for r in hub_server.repos if r.startswith("qconv-zoo/")]
    # the fixture's two source repos and uploads, nothing more
    assert hub_server.count("create_repo") == 2 and hub_server.count("commit") == 2


def test_bad_only_and_bad_zoo_file(hub_server, zoo, tmp_path, capsys):
    assert run(zoo, "--only", "nope") == 2
    assert "no zoo entry named nope" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "x", "source": "a/b", "target": "c/d",
                                               "settings": {"blocksize": 7}}]}))
    assert run(bad) == 2
    assert "--blocksize" in capsys.readouterr().err


def test_zoo_file_and_workflow_are_consistent():
    from huggingface_hub.utils import validate_repo_id

    from qconv.converter.zoo import load_zoo

    entries = load_zoo(ROOT / "scripts" / "zoo.yaml")
    assert len({e.name for e in entries}) == len(entries) >= 2
    for e in entries:
        validate_repo_id(e.source)
        validate_repo_id(e.target)
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "zoo.yml").read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    job = flow["jobs"]["rebuild"]
    assert "gpu" in job["runs-on"] and job["strategy"]["matrix"]["name"] == "${{ fromJSON(needs.plan.outputs.names) }}"
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    steps = "\n".join(s.get("run", "") for s in job["steps"])
    assert steps.index("install torch") < steps.index("install -e .")
    assert "python scripts/rebuild_zoo.py --only ${{ matrix.name }}" in steps


def test_load_zoo_rejects_mistakes(tmp_path):
    from qconv.converter.zoo import load_zoo

    cases = {
        "models: []": "non-empty list",
        "models: [{name: a, source: x/y}]": "missing keys ['target']",
        "models: [{name: a, source: x/y, target: z/w, color: red}]": "unknown keys ['color']",
        "models: [{name: a, source: x/y, target: z/w}, {name: a, source: x/y, target: z/v}]": "duplicate name",
        "models: [{name: a, source: x/y, target: z/w, settings: {bits: 3}}]": "unknown keys ['bits']",
    }
    for text, message in cases.items():
        (tmp_path / "z.yaml").write_text(text)
        with pytest.raises(QconvError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_zoo(tmp_path / "z.yaml")


def test_a_failed_verification_fails_the_entry_and_pushes_nothing(hub_server, zoo, monkeypatch, capsys):
    import qconv.converter.verify as verify

    real = verify.verify_checkpoint

    def broken(directory, source=None, **kw):
        report = real(directory, source=source, **kw)
        assert report.ok and report.tensor_errors  # the real check ran against the source and passed
        report.problems.append("simulated: dequantized error too large")
        return report

    monkeypatch.setattr(verify, "verify_checkpoint", broken)
    assert run(zoo, "--only", "tiny-llama") == 1
    out = capsys.readouterr().out
    assert "verify failed: simulated" in out and "1 failed" in out
    assert "qconv-zoo/tiny-llama-bnb-4bit" not in hub_server.repos
