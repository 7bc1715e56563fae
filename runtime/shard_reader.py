"""Read safetensors shards straight into their destination tensors.

Headers are parsed by :mod:`qconv.safetensors_header` (no torch), so the loader knows every tensor's
byte range before torch or transformers are imported. Two readers fill pre-allocated destination tensors:

* :func:`read_direct` - host destinations: ``os.preadv`` straight into each tensor's memory (one copy,
  no mmap, no staging).
* :class:`RingUploader` - device destinations: each shard is read in large contiguous chunks by a few
  threads into a small ring of reusable (pinned) staging buffers, and every chunk is copied
  asynchronously into the device tensors it overlaps. It runs in the background, so the model
  skeleton can be built (and transformers imported) while the bytes travel. The ring is one anonymous
  mapping of its own, unmapped as soon as the reading is done (no pinned memory left behind).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from qconv.errors import QconvError
from qconv.safetensors_header import TensorEntry

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

_MAX_PREAD = 1 << 30  # Linux caps one read at ~2 GiB; stay well below


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
        for entry, dest in sorted(jobs, key=lambda j: j[0].start):
            if entry.nbytes:
                _pread_into(fd, memoryview(dest.numpy()).cast("B"), entry.start, path)
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
    for entry, dest in sorted(jobs, key=lambda j: j[0].start):
        pos = entry.start
        while pos < entry.end:
            if cur is None or pos - cur.end > max_gap or pos < cur.end or cur.end - cur.begin >= chunk_bytes:
                cur = _Chunk(path, pos, pos, [])
                chunks.append(cur)
            room = chunk_bytes - (pos - cur.begin)
            if room <= 0:
                cur = None
                continue
            length = min(entry.end - pos, room)
            cur.pieces.append((dest, pos - entry.start, pos - cur.begin, length))
            pos += length
            cur.end = pos
    return chunks


class RingUploader:
    """Fill device (or host) destination tensors from shards in the background.

    ``jobs`` maps each shard path to ``[(entry, flat uint8 destination)]``. ``threads`` workers read chunks
    of ``chunk_bytes`` into a ring of ``buffers`` staging buffers (pinned when CUDA is used); a buffer is
    reused only after the asynchronous copies out of it have finished. Call :meth:`wait` to join and
    re-raise the first error. ``own_ring=False`` takes the buffers from torch's pinned allocator instead
    of a mapping of our own (kept for A/B timing; that memory stays cached in torch after the read).
    """

    def __init__(
        self,
        jobs: dict[Path, list[tuple[TensorEntry, "torch.Tensor"]]],
        *,
        threads: int = 8,
        buffers: int = 8,
        chunk_bytes: int = 32 << 20,
        own_ring: bool = True,
    ) -> None:
        import torch

        self._chunks = [c for path, js in jobs.items() for c in plan_chunks(path, js, chunk_bytes)]
        self._chunks.sort(key=lambda c: (str(c.path), c.begin))
        self._cuda = any(d.is_cuda for js in jobs.values() for _, d in js)
        n_buffers = max(1, min(buffers, len(self._chunks)))
        size = max((c.end - c.begin for c in self._chunks), default=0)
        self._ring = _HostRing(n_buffers, size, pin=self._cuda, own_mapping=own_ring)
        self._free: queue.Queue = queue.Queue()
        for buf in self._ring.buffers:
            self._free.put((buf, []))
        self._todo: queue.Queue = queue.Queue()
        for c in self._chunks:
            self._todo.put(c)
        self._fds = {path: _open(path) for path in jobs}
        self._errors: list[BaseException] = []
        self._cancel = threading.Event()
        self.bytes = sum(c.end - c.begin for c in self._chunks)
        self.finished_at = 0.0  # perf_counter when the last worker's copies were done
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
            self.finished_at = max(self.finished_at, time.perf_counter())

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
            for event in self._free.get()[1]:
                event.synchronize()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._ring.release()
        if raise_errors and self._errors:
            raise self._errors[0]


class _HostRing:
    """``count`` staging buffers of ``size`` bytes in one anonymous mapping, page-locked for CUDA when ``pin``.

    The mapping is this object's own (not torch's caching host allocator, which keeps freed pinned blocks
    for the life of the process), so :meth:`release` gives the memory back to the OS as soon as the
    reading is done. Pinning registers the mapping with ``cudaHostRegister``; if that fails the buffers
    come from torch's pinned allocator instead.
    """

    def __init__(self, count: int, size: int, *, pin: bool, own_mapping: bool = True) -> None:
        import torch

        self._map: mmap.mmap | None = None
        self._registered = False
        if not own_mapping:
            self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
            return
        stride = -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, stride * count, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        if pin:
            try:
                # 1 = cudaHostRegisterPortable: pinned for every device's context (multi-GPU device maps)
                err = torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), stride * count, 1)
                self._registered = int(err) == 0
            except Exception as exc:  # pragma: no cover - a torch without the cudart bindings
                err = exc
            if not self._registered:  # pragma: no cover - depends on the driver
                logger.debug("cudaHostRegister failed (%s): torch's pinned allocator instead", err)
                del whole
                self._close()
                self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
                return
        self.buffers = [whole[i * stride : i * stride + size] for i in range(count)]
        self._base = whole.data_ptr()

    def _close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def release(self) -> None:
        """Unpin and unmap (call only after every copy out of the buffers has finished)."""
        self.buffers = []
        if self._registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._base)
            self._registered = False
        try:
            self._close()
        except BufferError:  # a view of a buffer is still alive somewhere: the GC unmaps it later
            logger.debug("staging ring still referenced; not unmapped now")
