"""Read safetensors shards straight into their destination tensors.

The header is parsed here (8-byte little-endian length, then JSON), so the loader knows every tensor's
byte range before torch or transformers are imported. Two readers fill pre-allocated destination tensors:

* :func:`read_direct` - host destinations: ``os.preadv`` straight into each tensor's memory (one copy,
  no mmap, no staging).
* :class:`RingUploader` - device destinations: each shard is read in large contiguous chunks by a few
  threads into a small ring of reusable (pinned) staging buffers, and every chunk is copied
  asynchronously into the device tensors it overlaps. It runs in the background, so the model
  skeleton can be built (and transformers imported) while the bytes travel.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from qconv.errors import QconvError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: safetensors dtype -> (bytes per element, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "U16": (2, "uint16"), "U32": (4, "uint32"), "U64": (8, "uint64"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "C64": (8, "complex64"),
}
MAX_HEADER_BYTES = 100 << 20
_MAX_PREAD = 1 << 30  # Linux caps one read at ~2 GiB; stay well below


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: its dtype, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, DTYPES[self.dtype][1])


@dataclass
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    path: Path
    data_start: int
    size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate the header of a safetensors file; :class:`QconvError` when it is malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise QconvError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise QconvError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError as exc:
        raise QconvError(f"{path}: shard file is missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise QconvError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        tensors[name] = _entry(path, name, info, data_start, size)
    return ShardHeader(path=path, data_start=data_start, size=size, tensors=tensors, metadata=metadata)


def _entry(path: Path, name: str, info: Any, data_start: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise QconvError(f"{path}: header entry {name!r} is malformed") from exc
    if dtype not in DTYPES:
        raise QconvError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    numel = 1
    for s in shape:
        if s < 0:
            raise QconvError(f"{path}: tensor {name!r} has a negative dimension")
        numel *= s
    if not (0 <= b <= e and data_start + e <= size and e - b == numel * DTYPES[dtype][0]):
        raise QconvError(f"{path}: tensor {name!r} has byte range [{b}, {e}) that does not fit its shape or the file")
    return TensorEntry(name, dtype, shape, data_start + b, data_start + e)


def as_typed(entry: TensorEntry, raw: "torch.Tensor") -> "torch.Tensor":
    """View a flat uint8 tensor holding ``entry``'s bytes as its dtype and shape (no copy)."""
    return raw.view(entry.torch_dtype()).view(entry.shape)


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done : done + _MAX_PREAD]], offset + done)
        if n <= 0:
            raise QconvError(f"{path}: unexpected end of file at byte {offset + done} (truncated shard?)")
        done += n


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def read_direct(path: Path, jobs: Iterable[tuple[TensorEntry, "torch.Tensor"]]) -> None:
    """Read each entry's bytes into its host destination (a flat uint8 CPU tensor of ``entry.nbytes``)."""
    fd = _open(path)
    try:
        for entry, dest in sorted(jobs, key=lambda j: j[0].begin):
            if entry.nbytes:
                _pread_into(fd, memoryview(dest.numpy()).cast("B"), entry.begin, path)
    finally:
        os.close(fd)


@dataclass
class _Chunk:
    path: Path
    begin: int
    end: int
    pieces: list[tuple["torch.Tensor", int, int, int]]  # (dest, dest offset, chunk offset, length)


def plan_chunks(
    path: Path, jobs: Iterable[tuple[TensorEntry, "torch.Tensor"]], chunk_bytes: int, max_gap: int = 1 << 20
) -> list[_Chunk]:
    """Cover the jobs' byte ranges with contiguous reads of at most ``chunk_bytes``.

    Neighbouring tensors share a read; a gap larger than ``max_gap`` (bytes nobody wants) starts a new one,
    and a tensor larger than a chunk is split across several.
    """
    chunks: list[_Chunk] = []
    cur: _Chunk | None = None
    for entry, dest in sorted(jobs, key=lambda j: j[0].begin):
        pos = entry.begin
        while pos < entry.end:
            if cur is None or pos - cur.end > max_gap or pos < cur.end or cur.end - cur.begin >= chunk_bytes:
                cur = _Chunk(path, pos, pos, [])
                chunks.append(cur)
            room = chunk_bytes - (pos - cur.begin)
            if room <= 0:
                cur = None
                continue
            length = min(entry.end - pos, room)
            cur.pieces.append((dest, pos - entry.begin, pos - cur.begin, length))
            pos += length
            cur.end = pos
    return chunks


class RingUploader:
    """Fill device (or host) destination tensors from shards in the background.

    ``jobs`` maps each shard path to ``[(entry, flat uint8 destination)]``. ``threads`` workers read chunks
    of ``chunk_bytes`` into a ring of ``buffers`` staging buffers (pinned when CUDA is used); a buffer is
    reused only after the asynchronous copies out of it have finished. Call :meth:`wait` to join and
    re-raise the first error.
    """

    def __init__(
        self,
        jobs: dict[Path, list[tuple[TensorEntry, "torch.Tensor"]]],
        *,
        threads: int = 8,
        buffers: int = 8,
        chunk_bytes: int = 32 << 20,
    ) -> None:
        import torch

        self._chunks = [c for path, js in jobs.items() for c in plan_chunks(path, js, chunk_bytes)]
        self._chunks.sort(key=lambda c: (str(c.path), c.begin))
        self._cuda = any(d.is_cuda for js in jobs.values() for _, d in js)
        n_buffers = max(1, min(buffers, len(self._chunks)))
        size = max((c.end - c.begin for c in self._chunks), default=0)
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self._cuda)
            self._free.put((buf, []))
        self._todo: queue.Queue = queue.Queue()
        for c in self._chunks:
            self._todo.put(c)
        self._fds = {path: _open(path) for path in jobs}
        self._errors: list[BaseException] = []
        self._cancel = threading.Event()
        self.bytes = sum(c.end - c.begin for c in self._chunks)
        self._threads = [
            threading.Thread(target=self._work, name=f"qconv-read-{i}", daemon=True)
            for i in range(max(1, min(threads, len(self._chunks))))
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        streams: dict = {}  # one side stream per destination device, per worker
        try:
            while not self._cancel.is_set():
                try:
                    chunk = self._todo.get_nowait()
                except queue.Empty:
                    return
                buf, events = self._free.get()
                try:
                    for event in events:
                        event.synchronize()  # the copies out of this buffer have finished
                    events = []
                    n = chunk.end - chunk.begin
                    _pread_into(self._fds[chunk.path], memoryview(buf.numpy()).cast("B")[:n], chunk.begin, chunk.path)
                    events = self._copy_out(chunk, buf, streams)
                finally:
                    self._free.put((buf, events))
        except BaseException as exc:  # re-raised by wait()
            self._errors.append(exc)
            self._cancel.set()
        finally:
            for stream in streams.values():
                stream.synchronize()

    @staticmethod
    def _copy_out(chunk: _Chunk, buf: "torch.Tensor", streams: dict) -> list:
        """Copy the chunk's pieces out of ``buf``; CUDA copies are asynchronous, one event per device used."""
        import torch

        used = {}
        for dest, d_off, c_off, length in chunk.pieces:
            src = buf[c_off : c_off + length]
            if not dest.is_cuda:
                dest[d_off : d_off + length].copy_(src)
                continue
            stream = streams.get(dest.device)
            if stream is None:
                stream = streams[dest.device] = torch.cuda.Stream(device=dest.device)
            with torch.cuda.stream(stream):
                dest[d_off : d_off + length].copy_(src, non_blocking=True)
            used[dest.device] = stream
        events = []
        for stream in used.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events

    def cancel(self) -> None:
        """Stop after the chunks in flight; :meth:`wait` then returns without raising for the cancel."""
        self._cancel.set()
        self.wait(raise_errors=False)

    def wait(self, raise_errors: bool = True) -> None:
        """Join the workers, wait for the copies, close the files; re-raise the first worker error."""
        for t in self._threads:
            t.join()
        while not self._free.empty():
            _, events = self._free.get()
            for event in events:
                event.synchronize()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if raise_errors and self._errors:
            raise self._errors[0]
