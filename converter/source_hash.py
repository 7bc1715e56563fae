"""Content hash of a local source directory, computed on background threads while the conversion runs.

Weight files of a safetensors checkpoint get the tree digest of ``qconv.format.safetensors_tree_sha256``:
each ``SOURCE_TREE_PIECE`` piece of tensor data is an independent job, so a pool of threads hashes one
file in parallel (sha256 runs at ~1 GB/s per core; one thread would take 16 s for an 8B model). Every
other top-level file gets its plain sha256. The directory's hash combines them (docs/format.md §6.1).

The hashing threads read the files themselves instead of hashing the conversion's read buffers: reading
from the page cache is cheap (tens of GB/s over a few threads), hashing is not, and a reader that waits
for hashes slows the whole conversion down to the hash rate (measured on an H100 machine: 3.8 GB/s).
The hasher starts before the conversion plan is built, so most of its work is done by the time the
tensors are. On a cold page cache both read the same files, and whichever comes second hits the cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qconv.converter.checkpoint import FileLayout
from qconv.format import SOURCE_TREE_PIECE, sha256_file, tree_digest

#: Bytes read per step by a hashing thread (each thread reuses one buffer of this size).
HASH_READ_CHUNK = 4 << 20


def hash_threads() -> int:
    """Threads for the source hash: half the cores (at most 8: 16 GB in ~2.2 s, inside the tensor loop of
    an 8B GPU conversion), the rest left for reading, quantizing and the output shards' own sha256."""
    return max(2, min(8, (os.cpu_count() or 4) // 2))


class _Piece:
    """sha256 of ``size`` bytes at ``offset`` of an open file, read in ``HASH_READ_CHUNK`` steps."""

    _local = threading.local()

    @classmethod
    def digest(cls, fd: int, offset: int, size: int, path: Path) -> bytes:
        buffer = getattr(cls._local, "buffer", None)
        if buffer is None:
            buffer = cls._local.buffer = bytearray(HASH_READ_CHUNK)
        view = memoryview(buffer)
        h = hashlib.sha256()
        pos, end = offset, offset + size
        while pos < end:
            n = os.preadv(fd, [view[: min(HASH_READ_CHUNK, end - pos)]], pos)
            if n <= 0:
                raise OSError(f"{path}: file shrank while it was hashed")
            h.update(view[:n])  # releases the GIL for large buffers
            pos += n
        return h.digest()


class TreeHasher:
    """Starts hashing every piece of the given safetensors files at once; :meth:`file_digest` collects."""

    def __init__(self, layouts: dict[Path, FileLayout], pool: ThreadPoolExecutor):
        self._fds: dict[Path, int] = {}
        self._jobs: dict[Path, tuple[Future, list[Future]]] = {}
        try:
            for path, layout in layouts.items():
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                header = pool.submit(_Piece.digest, fd, 0, layout.header_bytes, path)
                pieces = [pool.submit(_Piece.digest, fd, a, min(end, a + SOURCE_TREE_PIECE) - a, path)
                          for start, end in layout.spans for a in range(start, end, SOURCE_TREE_PIECE)]
                self._jobs[path] = (header, pieces)
        except BaseException:
            self.close()
            raise

    def file_digest(self, path: Path) -> str:
        """The tree digest of ``path`` (waits for its pieces)."""
        header, pieces = self._jobs[path]
        return tree_digest(header.result(), (p.result() for p in pieces))

    def close(self) -> None:
        """Close the files (call once no job runs any more: after the pool shut down)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def start_content_hash(directory: Path, layouts: dict[Path, FileLayout]) -> tuple["ContentHash", Future]:
    """Start hashing ``directory``'s top-level files (``layouts``: the safetensors weight files directly in
    ``directory``, matched by name, that get a tree digest). The future yields ``(combined sha256, {name: digest}, [names with a tree digest])``."""
    job = ContentHash(directory, layouts)
    return job, job.result


class ContentHash:
    """The running content hash of a directory; :meth:`shutdown` stops it (after an error) and frees files."""

    def __init__(self, directory: Path, layouts: dict[Path, FileLayout]):
        self._pool = ThreadPoolExecutor(max_workers=hash_threads(), thread_name_prefix="qconv-hash")
        self._tree: TreeHasher | None = None
        try:
            files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
            by_name = {p.name: p for p in layouts}
            tree_names = {p.name: by_name[p.name] for p in files if p.name in by_name}
            self._tree = TreeHasher({p: layouts[p] for p in tree_names.values()}, self._pool) if tree_names else None
            plain = {p.name: self._pool.submit(sha256_file, p) for p in files if p.name not in tree_names}
        except BaseException:
            self.shutdown()
            raise
        self.result: Future = _LazyResult(lambda: self._combine(plain, tree_names))

    def _combine(self, plain: dict[str, Future], tree_names: dict[str, Path]) -> tuple[str, dict[str, str], list[str]]:
        digests = {name: fut.result() for name, fut in plain.items()}
        for name, path in tree_names.items():
            digests[name] = self._tree.file_digest(path)
        blob = "".join(f"{digests[n]}  {n}\n" for n in sorted(digests))
        return hashlib.sha256(blob.encode()).hexdigest(), digests, sorted(tree_names)

    def shutdown(self, wait: bool = True, cancel_futures: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if self._tree is not None and wait:
            self._tree.close()


class _LazyResult(Future):
    """A future whose value is computed by the first ``result()`` call (it waits for the hashing jobs)."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute
        self._once = threading.Lock()

    def result(self, timeout=None):
        with self._once:
            if not self.done():
                try:
                    self.set_result(self._compute())
                except BaseException as exc:
                    self.set_exception(exc)
        return super().result(timeout)
