"""Content hash of a local source directory, computed from the bytes the conversion reads anyway.

Weight files of a safetensors checkpoint get the tree digest of ``qconv.format.safetensors_tree_sha256``:
the reader shows every piece it reads to :class:`TreeHasher` (hashed on the reading thread, so pieces of
one tensor are hashed in parallel); pieces the conversion never reads (dropped tensors, tensors the index
does not list) are read and hashed at the end. Every other top-level file gets its plain sha256 on a
background thread. The directory's hash combines them (docs/format.md §6.1).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qconv.converter.checkpoint import FileLayout
from qconv.format import SOURCE_TREE_PIECE, sha256_file, tree_digest


class TreeHasher:
    """Collects the sha256 of each read piece of the given safetensors files; completes them on demand."""

    def __init__(self, layouts: dict[Path, FileLayout]):
        self._layouts = dict(layouts)
        self._pieces: dict[Path, dict[int, bytes]] = {path: {} for path in layouts}
        self._lock = threading.Lock()

    def piece(self, file: Path, offset: int, data: memoryview) -> None:
        pieces = self._pieces.get(file)
        if pieces is None or offset in pieces:
            return
        digest = hashlib.sha256(data).digest()  # releases the GIL for large buffers
        with self._lock:
            pieces[offset] = digest

    def file_digest(self, path: Path) -> str:
        """The tree digest of ``path``, reading only the header and any pieces not seen yet."""
        layout = self._layouts[path]
        seen = self._pieces[path]
        digests: list[bytes] = []
        fd = os.open(path, os.O_RDONLY)
        try:
            header = os.pread(fd, layout.header_bytes, 0)
            for start, end in layout.spans:
                for a in range(start, end, SOURCE_TREE_PIECE):
                    d = seen.get(a)
                    if d is None:
                        size = min(end, a + SOURCE_TREE_PIECE) - a
                        data = os.pread(fd, size, a)
                        if len(data) != size:
                            raise OSError(f"{path}: file shrank while it was hashed")
                        d = hashlib.sha256(data).digest()
                    digests.append(d)
        finally:
            os.close(fd)
        return tree_digest(hashlib.sha256(header).digest(), digests)


def start_content_hash(directory: Path, tree: TreeHasher | None, tree_files: list[Path],
                       ) -> tuple[ThreadPoolExecutor, Future]:
    """Plain sha256 of the directory's other top-level files on background threads; the result future
    yields ``(combined sha256, {name: digest}, [names with a tree digest])`` once the tree digests are asked
    for (after the conversion read the weights)."""
    tree_names = {p.name: p for p in tree_files} if tree is not None else {}
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, len(files))), thread_name_prefix="qconv-hash")
    plain = {p.name: pool.submit(sha256_file, p) for p in files if p.name not in tree_names}
    result: Future = _LazyResult(lambda: _combine(plain, tree, tree_names, pool))
    return pool, result


class _LazyResult(Future):
    """A future whose value is computed by the first ``result()`` call (after the weights were read)."""

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


def _combine(plain: dict[str, Future], tree: TreeHasher | None, tree_names: dict[str, Path],
             pool: ThreadPoolExecutor) -> tuple[str, dict[str, str], list[str]]:
    tree_futures = {name: pool.submit(tree.file_digest, path) for name, path in tree_names.items()} if tree else {}
    digests = {name: fut.result() for name, fut in {**plain, **tree_futures}.items()}
    blob = "".join(f"{digests[n]}  {n}\n" for n in sorted(digests))
    return hashlib.sha256(blob.encode()).hexdigest(), digests, sorted(tree_futures)
