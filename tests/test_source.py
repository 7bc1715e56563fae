"""Source resolution (local dir, Hub cache, GGUF path) and the streaming checkpoint reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconv.converter.checkpoint import open_checkpoint, prefetch
from qconv.converter.shard_writer import parse_size
from qconv.converter.source import resolve_source
from qconv.errors import QconvError

SHA = "89abcdef0123456789abcdef0123456789abcdef"


def test_reader_matches_safetensors_for_every_dtype_and_shape(tmp_path):
    tensors = {
        "f32": torch.randn(7, 13),
        "f16": torch.randn(3, 5, 2).half(),
        "bf16": torch.randn(129).bfloat16(),
        "i64": torch.arange(10),
        "u8": torch.randint(0, 255, (17,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(5_000_003, dtype=torch.float64),  # 40 MB: read in parallel 32 MiB chunks
    }
    save_file(dict(list(tensors.items())[:4]), tmp_path / "a.safetensors")
    save_file(dict(list(tensors.items())[4:]), tmp_path / "b.safetensors")
    weight_map = {k: ("a" if i < 4 else "b") + ".safetensors" for i, k in enumerate(tensors)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.infos) == set(tensors)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = {}
    for name, tensor, release in prefetch(ckpt, list(ckpt.infos), depth=1):
        seen[name] = tensor.clone()  # the buffer is reused after release
        release()
    for name, ref in tensors.items():
        assert seen[name].dtype == ref.dtype and seen[name].shape == ref.shape, name
        assert torch.equal(seen[name], ref), name


def test_prefetch_reports_reader_errors(tmp_path):
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # vanishes after validation
    with pytest.raises(QconvError, match="model.safetensors"):
        for _name, _tensor, release in prefetch(ckpt, ["a", "b"]):
            release()


def test_bin_reader(tmp_path):
    state = {"w": torch.randn(4, 4), "b": torch.arange(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.kind == "bin"
    for name, ref in state.items():
        assert torch.equal(ckpt.read(name), ref)


def test_bin_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(QconvError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path)


def test_local_directory_source(tiny_checkpoint_factory):
    src_dir = tiny_checkpoint_factory("llama")
    with resolve_source(src_dir) as src:
        ident = src.identity()
        assert src.kind == "dir" and src.config["model_type"] == "llama"
        assert ident["kind"] == "dir" and ident["revision"] is None and len(ident["sha256"]) == 64
        assert set(ident["files"]) == {p.name for p in src_dir.iterdir() if p.is_file()}


def test_gguf_path_must_exist(tmp_path):
    with pytest.raises(QconvError, match="GGUF file not found"):
        resolve_source(tmp_path / "x.gguf")


def test_plain_file_is_not_a_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(QconvError, match="not a checkpoint directory"):
        resolve_source(tmp_path / "notes.txt")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_checkpoint_factory):
    """An offline HF cache holding the tiny llama checkpoint as ``acme/tiny-llama`` at commit SHA."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / SHA
    shutil.copytree(tiny_checkpoint_factory("llama"), snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return snap


def test_hub_source_from_cache(hub_cache):
    with resolve_source("acme/tiny-llama") as src:
        assert src.kind == "hub" and src.id == "acme/tiny-llama" and src.revision == SHA
        assert src.identity() == {"kind": "hub", "id": "acme/tiny-llama", "revision": SHA, "sha256": None}


def test_hub_source_converts_and_records_the_commit(hub_cache, tmp_path):
    from qconv.converter import convert

    result = convert("acme/tiny-llama", tmp_path / "out", device="cpu", progress=False)
    assert result.manifest.source == {"kind": "hub", "id": "acme/tiny-llama", "revision": SHA, "sha256": None}


def test_unknown_repo_offline_is_a_clear_error(hub_cache):
    with pytest.raises(QconvError, match="acme/missing.*HF_HUB_OFFLINE"):
        resolve_source("acme/missing")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5 kb", 1500), ("1024", 1024), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "five", "-1GB", "0", "3XB"])
def test_parse_size_rejects(text):
    with pytest.raises(QconvError, match="--max-shard-size"):
        parse_size(text)


def test_source_is_never_modified(tiny_checkpoint_factory, tmp_path):
    from qconv.converter import convert
    from qconv.format import sha256_file

    src = Path(shutil.copytree(tiny_checkpoint_factory("gemma2"), tmp_path / "src"))
    before = {p.name: sha256_file(p) for p in src.iterdir()}
    convert(src, tmp_path / "out", device="cpu", progress=False)
    assert {p.name: sha256_file(p) for p in src.iterdir()} == before
    assert load_file(src / "model.safetensors")  # still readable


def test_content_hash_is_hashed_in_pieces_in_the_background_and_equals_the_reference(tmp_path, monkeypatch):
    """Weight files get the tree digest, each piece a job of the background hasher (multi-piece tensors and
    tensors the index does not list included), without the conversion reading anything; other files get
    their plain sha256."""
    import hashlib

    from qconv.converter import source_hash
    from qconv.format import SOURCE_TREE_PIECE, safetensors_tree_sha256, sha256_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    big = torch.randn(SOURCE_TREE_PIECE // 4 + 1000)  # two pieces
    save_file({"big": big, "small": torch.randn(3, 5), "extra": torch.ones(4)}, tmp_path / "a.safetensors")
    save_file({"c": torch.randn(6).bfloat16(), "empty": torch.zeros(0)}, tmp_path / "b.safetensors")
    index = {"weight_map": {"big": "a.safetensors", "small": "a.safetensors", "c": "b.safetensors",
                            "empty": "b.safetensors"}}  # "extra" is in the file but not in the index
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    pieces: list[int] = []
    real_digest = source_hash._Piece.digest
    monkeypatch.setattr(source_hash._Piece, "digest",
                        classmethod(lambda cls, fd, off, size, path: (pieces.append(size), real_digest(fd, off, size, path))[1]))
    with resolve_source(tmp_path) as src:
        ident = src.identity()  # nothing was read by the conversion
    # a.safetensors: header, big (2 pieces), small, extra; b.safetensors: header, c (the empty tensor has none)
    assert sorted(pieces).count(SOURCE_TREE_PIECE) == 1 and (big.nbytes - SOURCE_TREE_PIECE) in pieces
    assert len(pieces) == 7
    expected = {p.name: safetensors_tree_sha256(p) if p.suffix == ".safetensors" else sha256_file(p)
                for p in tmp_path.iterdir()}
    assert ident["files"] == expected
    assert ident["tree_hash"]["files"] == ["a.safetensors", "b.safetensors"]
    blob = "".join(f"{expected[n]}  {n}\n" for n in sorted(expected))
    assert ident["sha256"] == hashlib.sha256(blob.encode()).hexdigest()
    # the digest depends on every byte: change one byte of the unread tensor
    raw = bytearray((tmp_path / "a.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "a.safetensors").write_bytes(bytes(raw))
    assert safetensors_tree_sha256(tmp_path / "a.safetensors") != expected["a.safetensors"]
