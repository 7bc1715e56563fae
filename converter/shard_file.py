"""Write one safetensors file straight from tensor memory, computing its sha256 while it is written.

The layout is the one ``safetensors.torch.save_file`` produces (8-byte little-endian header length, compact
JSON header with ``__metadata__`` first, padded with spaces to a multiple of 8, then the data of each
tensor, largest element size first and by name within a size, so every tensor's data is aligned to its
element size). The bytes are written with ``os.write`` from the tensors' own memory (no serialized copy of
the shard) while a second thread hashes the same memory, so the sha256 needs no read-back of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Mapping

import torch

_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _attr, _name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):
        _ST_NAMES[getattr(torch, _attr)] = _name
# Within one element size, safetensors orders dtypes by its Dtype enum, descending.
_TIE_ORDER = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
              "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]

WRITE_CHUNK = 64 << 20
_write = os.write  # module-level so a test can simulate a full disk


def header_and_order(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                     ) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) and the order in which the tensors' data follows it."""
    def key(name: str) -> tuple[int, int, str]:
        t = tensors[name]
        return (-t.element_size(), _TIE_ORDER.index(_ST_NAMES[t.dtype]), name)

    order = sorted(tensors, key=key)
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                      hash_pool: Executor) -> str:
    """Write ``tensors`` (contiguous CPU tensors) to ``path`` and return the file's hex sha256."""
    header, order = header_and_order(tensors, metadata)
    views = [header] + [_bytes_of(tensors[name]) for name in order]
    digest = hash_pool.submit(_sha256_of, views)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for view in views:
                view = memoryview(view)
                for start in range(0, len(view), WRITE_CHUNK):
                    part = view[start:start + WRITE_CHUNK]
                    while part:
                        part = part[_write(fd, part):]
        finally:
            os.close(fd)
    finally:
        result = digest.result()  # the memory must outlive the hashing thread's use of it
    return result


def _sha256_of(views: list) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return h.hexdigest()
