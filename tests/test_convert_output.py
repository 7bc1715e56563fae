"""The output directory: files, manifest, atomic install, --overwrite, interrupted runs, the CLI summary."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qconv.converter.cli import main
from qconv.converter.conversion import convert
from qconv.errors import QconvError
from qconv.format import (MANIFEST_NAME, SOURCE_TREE_HASH, QuantSettings, quantization_config, read_manifest,
                          safetensors_tree_sha256, sha256_file)


@pytest.fixture(scope="module")
def src(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory("qwen2", max_shard_size="100KB")  # a sharded source with an index


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out"
    return convert(src, out, device="cpu", progress=False, max_shard_size="50KB")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".qconv-" in p.name)


def test_output_files(converted, src):
    out = converted.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", MANIFEST_NAME,
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(n.startswith("model-00001-of-") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(QuantSettings())
    assert config["dtype"] == "bfloat16"
    assert not _leftovers(out.parent)


def test_manifest(converted, src):
    out = converted.out_dir
    manifest = read_manifest(out)
    assert manifest is not None and manifest.schema_version == 1 and manifest.qconv_version
    assert manifest.settings == QuantSettings().to_dict()
    # every written file but the manifest itself, with its real sha256
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(out / name) == digest, name
    # local source: id + content hash over its files (sha256sum style)
    source = manifest.source
    assert source["kind"] == "dir" and source["id"] == str(src.resolve()) and source["revision"] is None
    weights = {p.name for p in src.glob("*.safetensors")}
    files = {p.name: safetensors_tree_sha256(p) if p.name in weights else sha256_file(p)
             for p in src.iterdir() if p.is_file()}
    assert weights and source["files"] == files
    assert source["tree_hash"] == {"scheme": SOURCE_TREE_HASH, "files": sorted(weights)}
    blob = "".join(f"{files[n]}  {n}\n" for n in sorted(files))
    assert source["sha256"] == hashlib.sha256(blob.encode()).hexdigest()
    stats = manifest.stats
    assert stats == converted.stats
    assert stats["quantized_tensors"] == 14 and stats["kept_tensors"] > 0 and stats["params"] > 0
    assert stats["shards"] > 1 and 4 < stats["bits_per_param"] < 16
    assert isinstance(manifest.tokenizer_fixes, list)


def test_bin_source_gives_identical_tensors(converted, src, tmp_path):
    """A ``pytorch_model.bin`` source (weights_only load) converts to the same bytes as safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    bin_src = tmp_path / "bin-src"
    bin_src.mkdir()
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, bin_src / "pytorch_model.bin")
    for f in src.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            shutil.copy(f, bin_src / f.name)
    out = convert(bin_src, tmp_path / "bin-out", device="cpu", progress=False).out_dir

    def tensors(d):
        found = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                found.update({k: h.get_tensor(k) for k in h.keys()})
        return found

    a, b = tensors(out), tensors(converted.out_dir)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


class _Boom(RuntimeError):
    pass


def _fail_after(monkeypatch, n: int, exc: BaseException) -> None:
    from qconv.converter import quantize

    original = quantize.Quantizer.quantize
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(quantize.Quantizer, "quantize", failing)


@pytest.mark.parametrize("exc", [_Boom("injected"), KeyboardInterrupt()])
def test_interrupted_run_leaves_nothing(src, tmp_path, monkeypatch, exc):
    _fail_after(monkeypatch, 5, exc)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        convert(src, out, device="cpu", progress=False, max_shard_size="20KB")  # some shards already written
    assert not out.exists()
    assert not _leftovers(tmp_path)


def test_failed_overwrite_keeps_the_old_output(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    _fail_after(monkeypatch, 3, _Boom("injected"))
    with pytest.raises(_Boom):
        convert(src, out, device="cpu", progress=False, overwrite=True)
    assert (out / "old.txt").read_text() == "previous result"
    assert not _leftovers(tmp_path)


def test_overwrite_replaces(converted, src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    result = convert(src, out, device="cpu", progress=False, overwrite=True, max_shard_size="50KB")
    assert not (out / "old.txt").exists()
    def deterministic(files):  # the same bytes as the first conversion (the card may differ)
        return {k: v for k, v in files.items() if k != "README.md"}

    assert deterministic(read_manifest(out).files) == deterministic(converted.manifest.files)
    assert result.out_dir == out and not _leftovers(tmp_path)


def test_writer_failure_is_reported(src, tmp_path, monkeypatch):
    from qconv.converter import shard_file

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_file, "_write", disk_full)
    with pytest.raises(QconvError, match="No space left"):
        convert(src, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_cli_converts_and_prints_the_summary(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(src), "--no-progress", "--device", "cpu", "--fp4",
                                       "--no-double-quant", "--blocksize", "128", "--no-fix-tokenizer"])
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{src.name}-bnb-4bit"  # the default --out
    manifest = read_manifest(out)
    assert manifest.quant_settings == QuantSettings(quant_type="fp4", blocksize=128, double_quant=False)
    assert all(not f["applied"] for f in manifest.tokenizer_fixes)
    line = result.stdout.strip().splitlines()[-1]
    for fragment in ("params", "->", "bits/param", " s on cpu", str(out)):
        assert fragment in line, line


def test_output_size_estimate_and_balanced_shards(src, tmp_path):
    """The planned size is close to the real one, and shards come out about equal (not 5 GB + a remainder)."""
    from qconv.converter.plan import build_plan
    from qconv.converter.pipeline import estimate_output_bytes
    from qconv.converter.source import resolve_source

    settings = QuantSettings()
    with resolve_source(src, hash_content=False) as source:
        plan = build_plan(source.config, source.checkpoint.infos, settings)
        expected = sum(estimate_output_bytes(t.action, source.checkpoint.infos[t.source_name].numel, t.dtype,
                                             settings) for t in plan.tensors if t.action != "drop")
    result = convert(src, tmp_path / "out", device="cpu", progress=False, max_shard_size=int(expected * 0.6))
    actual = result.stats["output_bytes"]
    assert abs(actual - expected) < 64 * result.stats["quantized_tensors"], (actual, expected)
    sizes = [p.stat().st_size for p in sorted((tmp_path / "out").glob("model-*.safetensors"))]
    assert 2 <= len(sizes) <= 3 and max(sizes) <= int(expected * 0.6) + 1024, sizes


def test_shard_writer_balances_and_hashes(tmp_path):
    from safetensors.torch import load_file

    from qconv.converter.shard_writer import ShardWriter

    mb = 10**6
    writer = ShardWriter(tmp_path, max_shard_bytes=7 * mb, expected_total=10 * mb)
    groups = [{f"t{i}": torch.full((mb // 4,), float(i))} for i in range(10)]  # 1 MB each
    for group in groups:
        writer.add(group)
    written = writer.finish(total_parameters=10 * mb // 4)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert written.shard_count == 2 and sorted(written.files) == sorted(names + ["model.safetensors.index.json"])
    assert [len(load_file(tmp_path / n)) for n in names] == [5, 5]  # 5 + 5, not 7 + 3
    for name, digest in written.files.items():
        assert sha256_file(tmp_path / name) == digest
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 10 * mb, "total_parameters": 10 * mb // 4}
    assert index["weight_map"]["t9"] == names[1] and not list(tmp_path.glob("*.partial"))


def test_package_exports_the_function_lazily():
    """``qconv.converter.convert`` is the function (a plain module ``__getattr__``), imported on first use."""
    import subprocess
    import sys

    code = (
        "import sys, types\n"
        "import qconv.converter as c\n"
        "assert 'qconv.converter.conversion' not in sys.modules and 'torch' not in sys.modules\n"
        "f = c.convert\n"
        "import qconv.converter.conversion as m\n"
        "assert f is m.convert and c.ConvertResult is m.ConvertResult and type(m) is types.ModuleType\n"
        "from qconv.converter import convert\n"
        "assert convert is m.convert and not callable(m)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_host_blocks_hold_device_tensor_copies(monkeypatch):
    """The GPU path's copies land in aligned slices of reused 64 MiB blocks (allocators unpinned here: no CUDA)."""
    from qconv.converter import shard_writer as sw

    monkeypatch.setattr(sw._HostBlocks, "take", lambda self: self._free.pop() if self._free
                        else torch.empty(sw.HOST_BLOCK_BYTES, dtype=torch.uint8))
    monkeypatch.setattr(sw._HostBlocks, "dedicated", lambda self, n: torch.empty(n, dtype=torch.uint8))
    blocks, shard = sw._HostBlocks(), sw._Shard(1)
    tensors = [torch.randint(0, 255, (1001, 1), dtype=torch.uint8), torch.randn(16), torch.randn(3, 5).bfloat16(),
               torch.zeros(0), torch.randn(sw.HOST_BLOCK_BYTES // 4 + 1), torch.randn(5),
               torch.randn(sw.HOST_BLOCK_BYTES // 8), torch.randn(sw.HOST_BLOCK_BYTES // 8)]
    copies = [shard.host_copy(t, blocks) for t in tensors]
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        assert c.numel() == 0 or c.data_ptr() % 64 == 0
    assert [b.numel() for b in shard.blocks] == [sw.HOST_BLOCK_BYTES, sw.HOST_BLOCK_BYTES + 4,
                                                 sw.HOST_BLOCK_BYTES, sw.HOST_BLOCK_BYTES]
    blocks.give(shard.blocks)
    assert len(blocks._free) == 3  # the dedicated buffer is not kept
    assert blocks.take() is shard.blocks[-1]


def test_large_kept_tensors_are_spread_over_the_run_first_at_the_start():
    from qconv.converter.pipeline import spread_large_kept

    order = spread_large_kept(list("EabcdefghL"), lambda t: t in "EL")
    assert order == list("EabcdLefgh")  # lm_head (last in the file) no longer ends the run
    assert spread_large_kept(list("abc"), lambda t: False) == list("abc")
    assert sorted(spread_large_kept(list("ELM"), lambda t: True)) == list("ELM")  # nothing lost or doubled
