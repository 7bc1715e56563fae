"""Streaming reader for a source checkpoint: one tensor at a time, never the whole model in memory.

safetensors files are validated with ``safetensors.safe_open`` (header, offsets, file size) and then read
with plain positioned reads into reusable buffers, not through a memory map: mapped pages of a large shard
would stay resident (and count in RSS) until the file is closed. ``.bin`` files are read with
``torch.load(weights_only=True, mmap=True)``, one file at a time. Index files (``*.index.json``) are
validated by :func:`qconv.safetensors_header.read_index` (every shard path through ``safe_join``).

Large tensors are read by a few threads at once, in ``READ_CHUNK`` pieces (page cache -> memory runs at
~4 GB/s per thread). The source content hash is computed apart (:mod:`qconv.converter.source_hash`).
"""

from __future__ import annotations

import math
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from qconv.errors import QconvError
from qconv.safetensors_header import read_header, read_index

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None  # None for in-memory tensors (GGUF)
    offset: int = 0  # absolute byte offset of the data in ``file`` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class FileLayout:
    """Where a safetensors file's header ends and each of its tensors lies (absolute ``[start, end)``)."""

    header_bytes: int  # 8 + the JSON header length
    spans: tuple[tuple[int, int], ...]  # every tensor in the header, in offset order


class Checkpoint:
    """The tensors of a checkpoint: ``infos`` (name -> TensorInfo, in efficient read order) and ``read``."""

    def __init__(self, infos: dict[str, TensorInfo], kind: str, files: list[Path],
                 memory: Mapping[str, torch.Tensor] | None = None):
        self.infos = infos
        self.kind = kind  # "safetensors" | "bin" | "memory"
        self.files = files
        self._memory = memory
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self.layouts: dict[Path, FileLayout] = {}

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Return tensor ``name`` on the CPU. ``buffer`` (uint8, large enough) is reused for safetensors data."""
        info = self.infos.get(name)
        if info is None:
            raise QconvError(f"tensor {name!r} is not in the checkpoint")
        if self.kind == "memory":
            return self._memory[name]
        if self.kind == "bin":
            return self._read_bin(info)
        return _read_safetensors(info, buffer)

    def _read_bin(self, info: TensorInfo) -> torch.Tensor:
        with self._lock:
            if self._bin_cache is None or self._bin_cache[0] != info.file:
                self._bin_cache = None  # drop the previous file's mapping first
                self._bin_cache = (info.file, _load_bin(info.file))
            return self._bin_cache[1][info.name]

    def close(self) -> None:
        self._bin_cache = None
        self._memory = None


def open_checkpoint(directory: Path) -> Checkpoint:
    """Find and validate the weights in ``directory`` (safetensors preferred, then ``.bin``)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        return _open_safetensors(directory, _index_files(directory, SAFETENSORS_INDEX))
    if (directory / SAFETENSORS_SINGLE).is_file():
        return _open_safetensors(directory, {directory / SAFETENSORS_SINGLE: None})
    if (directory / BIN_INDEX).is_file():
        return _open_bin(_index_files(directory, BIN_INDEX))
    if (directory / BIN_SINGLE).is_file():
        return _open_bin({directory / BIN_SINGLE: None})
    raise QconvError(
        f"{directory}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE})"
    )


def memory_checkpoint(tensors: Mapping[str, torch.Tensor]) -> Checkpoint:
    """A checkpoint over tensors already in memory (the GGUF path)."""
    infos = {k: TensorInfo(k, v.dtype, tuple(v.shape), None) for k, v in tensors.items()}
    return Checkpoint(infos, "memory", [], memory=dict(tensors))


def _index_files(directory: Path, index_name: str) -> dict[Path, set[str]]:
    """Shard path -> names the index puts there; every path checked to exist inside ``directory``."""
    files: dict[Path, set[str]] = {}
    for name, path in read_index(directory, index_name).items():
        files.setdefault(path, set()).add(name)
    return files


def _open_safetensors(directory: Path, files: dict[Path, set[str] | None]) -> Checkpoint:
    infos: dict[str, TensorInfo] = {}
    layouts: dict[Path, FileLayout] = {}
    for path, expected in files.items():
        try:
            header = read_header(path)
        except QconvError as exc:
            raise QconvError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
        entries = header.tensors
        layouts[path] = FileLayout(header.data_start, tuple(sorted((e.start, e.end) for e in entries.values())))
        if expected is not None and (missing := sorted(expected - entries.keys())):
            raise QconvError(f"{path}: the index lists tensors this shard lacks: {', '.join(missing[:5])}")
        wanted = entries.keys() if expected is None else expected
        for entry in sorted((entries[k] for k in wanted), key=lambda e: e.start):
            if entry.name in infos:
                raise QconvError(f"{path}: tensor {entry.name!r} appears in more than one shard")
            try:
                dtype = entry.torch_dtype()
            except QconvError as exc:
                raise QconvError(f"{path}: tensor {entry.name!r}: {exc}") from exc
            infos[entry.name] = TensorInfo(entry.name, dtype, entry.shape, path, entry.start)
    checkpoint = Checkpoint(infos, "safetensors", list(files))
    checkpoint.layouts = layouts
    return checkpoint


def _read_safetensors(info: TensorInfo, buffer: torch.Tensor | None) -> torch.Tensor:
    nbytes = info.nbytes
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = buffer[:nbytes]
    if nbytes:
        mv = memoryview(view.numpy())
        try:
            with open(info.file, "rb", buffering=0) as f:
                chunks = [(start, min(nbytes, start + READ_CHUNK)) for start in range(0, nbytes, READ_CHUNK)]
                if len(chunks) == 1:
                    _pread_exact(f.fileno(), mv, info.offset, 0, nbytes, info)
                else:  # big tensors: a few threads read chunks at once (page cache -> memory is not one core's job)
                    pool = _read_pool()
                    futures = [pool.submit(_pread_exact, f.fileno(), mv, info.offset, a, b, info)
                               for a, b in chunks]
                    for fut in futures:
                        fut.result()
        except OSError as exc:
            raise QconvError(f"{info.file}: cannot read tensor {info.name!r} ({exc})") from exc
    return view.view(info.dtype).reshape(info.shape)


READ_CHUNK = 16 << 20
READ_THREADS = 8
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="qconv-read")
        return _POOL


#: Seconds the read threads spent in preadv, summed over threads (a diagnostic for the run's stats).
READ_TIMES = {"pread_s": 0.0}


def _pread_exact(fd: int, mv: memoryview, base: int, start: int, end: int, info: TensorInfo) -> None:
    """Fill ``mv[start:end]`` from ``fd`` at ``base + start`` (preadv may return short counts)."""
    t0 = time.perf_counter()
    pos = start
    while pos < end:
        n = os.preadv(fd, [mv[pos:end]], base + pos)
        if n <= 0:
            raise QconvError(f"{info.file}: unexpected end of file reading {info.name!r}")
        pos += n
    READ_TIMES["pread_s"] += time.perf_counter() - t0  # races between threads only blur a diagnostic figure


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise QconvError(f"{path}: not a loadable PyTorch weights file ({_one_line(exc)})") from exc
    if not isinstance(state, dict):
        raise QconvError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _open_bin(files: dict[Path, set[str] | None]) -> Checkpoint:
    infos: dict[str, TensorInfo] = {}
    for path, expected in files.items():
        state = _load_bin(path)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if expected is not None and (missing := sorted(expected - tensors.keys())):
            raise QconvError(f"{path}: the index lists tensors this file lacks: {', '.join(missing[:5])}")
        for name in (tensors if expected is None else sorted(expected)):
            t = tensors[name]
            infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), path)
        del state, tensors
    return Checkpoint(infos, "bin", list(files))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Prefetching: a reader thread stays one or two tensors ahead of the quantize step
# --------------------------------------------------------------------------------------------------
class _Slot:
    def __init__(self, pin: bool):
        self.pin = pin
        self.buffer: torch.Tensor | None = None

    def ensure(self, nbytes: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer


def prefetch(checkpoint: Checkpoint, names: list[str], *, depth: int = 2, pin_memory: bool = False,
             own_memory: Callable[[str], bool] = lambda name: False,
             ) -> Iterator[tuple[str, torch.Tensor, Callable[[], None]]]:
    """Yield ``(name, tensor, release)`` in order while a thread reads ahead into ``depth + 1`` reused buffers.

    The tensor may live in a reused buffer: call ``release()`` once nothing refers to it any more. Tensors
    for which ``own_memory(name)`` is true are read into fresh memory instead (the caller may keep them).
    An exception in the reader thread is re-raised here.
    """
    free: queue.Queue[_Slot] = queue.Queue()
    for _ in range(depth + 1):
        free.put(_Slot(pin_memory))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            for name in names:
                slot = free.get()
                if stop.is_set():
                    return
                info = checkpoint.infos[name]
                reuse = checkpoint.kind == "safetensors" and not own_memory(name)
                buffer = slot.ensure(info.nbytes) if reuse else None
                ready.put((name, checkpoint.read(name, buffer), slot))
        except BaseException as exc:  # handed to the consumer
            ready.put(exc)

    thread = threading.Thread(target=reader, name="qconv-reader", daemon=True)
    thread.start()
    try:
        for _ in names:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            name, tensor, slot = item
            yield name, tensor, (lambda s=slot: free.put(s))
    finally:
        stop.set()
        for _ in range(depth + 1):
            free.put(_Slot(False))  # unblock the reader if it waits for a slot
        thread.join(timeout=60)
