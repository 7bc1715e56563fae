"""The shard reader: header parsing, chunk planning, and both readers byte-for-byte against safetensors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconv.errors import QconvError
from qconv.runtime.shard_reader import RingUploader, as_typed, plan_chunks, read_direct
from qconv.safetensors_header import read_header


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 7, dtype=torch.bfloat16),
        "b.weight": torch.randint(0, 255, (1000, 1), dtype=torch.uint8),
        "c.bias": torch.randn(5, dtype=torch.float32),
        "d.scalar": torch.tensor(3.5, dtype=torch.float32),
        "e.big": torch.randn(70_000, dtype=torch.float16),
        "f.empty": torch.empty(0, 4, dtype=torch.float32),
        "g.ids": torch.arange(17, dtype=torch.int64),
    }
    path = tmp_path_factory.mktemp("shard") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _dests(header):
    return {n: torch.empty(e.nbytes, dtype=torch.uint8) for n, e in header.tensors.items()}


def test_header_matches_safetensors(shard):
    header = read_header(shard)
    ref = load_file(str(shard))
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(ref)
    for name, entry in header.tensors.items():
        assert entry.shape == tuple(ref[name].shape)
        assert entry.torch_dtype() == ref[name].dtype
        assert entry.nbytes == ref[name].numel() * ref[name].element_size()


def test_read_direct_is_byte_exact(shard):
    header = read_header(shard)
    dests = _dests(header)
    read_direct(shard, [(header.tensors[n], d) for n, d in dests.items()])
    ref = load_file(str(shard))
    for name, raw in dests.items():
        assert torch.equal(as_typed(header.tensors[name], raw), ref[name]), name


@pytest.mark.parametrize("chunk_bytes,own_ring", [(64, True), (1000, True), (1 << 20, True), (1000, False)])
def test_ring_uploader_is_byte_exact(shard, chunk_bytes, own_ring):
    """Small chunks split tensors across reads and buffers; the result must still be exact (either ring)."""
    header = read_header(shard)
    dests = _dests(header)
    jobs = {shard: [(header.tensors[n], d) for n, d in dests.items() if n != "b.weight"]}  # leave a gap
    RingUploader(jobs, threads=3, buffers=2, chunk_bytes=chunk_bytes, own_ring=own_ring).wait()
    ref = load_file(str(shard))
    for name, raw in dests.items():
        if name != "b.weight":
            assert torch.equal(as_typed(header.tensors[name], raw), ref[name]), name


def test_ring_is_unmapped_after_wait_and_after_errors(shard, tmp_path):
    """The staging ring is the uploader's own mapping: gone once wait() returns, also when a read failed."""
    header = read_header(shard)
    dests = _dests(header)
    uploader = RingUploader({shard: [(header.tensors[n], d) for n, d in dests.items()]}, threads=2, buffers=2, chunk_bytes=4096)
    assert uploader._ring._map is not None and len(uploader._ring.buffers) == 2
    uploader.wait()
    assert uploader._ring._map is None and uploader._ring.buffers == []
    assert torch.equal(as_typed(header.tensors["e.big"], dests["e.big"]), load_file(str(shard))["e.big"])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[: header.tensors["e.big"].start + 10])
    failing = RingUploader({cut: [(header.tensors["e.big"], torch.empty(header.tensors["e.big"].nbytes, dtype=torch.uint8))]},
                           chunk_bytes=1 << 16)
    with pytest.raises(QconvError, match="end of file"):
        failing.wait()
    assert failing._ring._map is None


def test_plan_chunks_cover_each_byte_once(shard):
    header = read_header(shard)
    jobs = [(e, torch.empty(e.nbytes, dtype=torch.uint8)) for e in header.tensors.values()]
    chunks = plan_chunks(shard, jobs, chunk_bytes=4096, max_gap=0)
    covered = sum(length for c in chunks for *_, length in c.pieces)
    assert covered == sum(e.nbytes for e in header.tensors.values())
    assert all(c.end - c.begin <= 4096 for c in chunks)
    assert len(chunks) >= sum(e.nbytes for e in header.tensors.values()) // 4096


def _write_raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "does not fit"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "does not fit"),
        ({"x": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype"),
        ({"x": {"shape": [4]}}, b"", "malformed"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_bad_headers_raise_qconv_error(tmp_path, header, data, match):
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(QconvError, match=match):
        read_header(path)


def test_truncated_and_missing_files(tmp_path, shard):
    with pytest.raises(QconvError, match="missing"):
        read_header(tmp_path / "nope.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(QconvError, match="too short"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(QconvError, match="corrupt"):
        read_header(tmp_path / "huge.safetensors")
    # the header is intact but the data was cut after parsing: the reader notices the short read
    header = read_header(shard)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes())
    entry = header.tensors["e.big"]
    with open(cut, "r+b") as f:
        f.truncate(entry.start + 10)
    with pytest.raises(QconvError, match="end of file"):
        read_direct(cut, [(entry, torch.empty(entry.nbytes, dtype=torch.uint8))])
    with pytest.raises(QconvError, match="end of file"):
        RingUploader({cut: [(entry, torch.empty(entry.nbytes, dtype=torch.uint8))]}, chunk_bytes=1 << 16).wait()
