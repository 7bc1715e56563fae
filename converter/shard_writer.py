"""Write output tensors into safetensors shards as they fill, on a background thread, then name and index them.

Tensors arrive in groups (a quantized weight and its quant-state tensors stay together in one shard).
When the next group would push the open shard past ``max_shard_bytes`` (or the shard reached its share of
the expected total, so that shards come out about equal) the shard is handed to one of ``WRITERS`` writer
threads (:func:`~qconv.converter.shard_file.write_safetensors`: ``os.write`` from the tensors' memory while
another thread computes the file's sha256 from the same memory, no read-back) and a new one starts. sha256
runs at ~1 GB/s on one core, slower than the rest of a GPU conversion produces output, so several shards are
written and hashed at once; host memory holds at most ``WRITERS + 1`` shards. Tensors that arrive on
a GPU are copied (asynchronously) into reused pinned host blocks of the shard that takes them, so
device-to-host copies neither allocate nor fault in fresh memory. Shards get temporary names while the total
is unknown; :meth:`ShardWriter.finish` renames them to ``model-0000i-of-0000n.safetensors`` (or
``model.safetensors``) and writes the index.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconv.converter.shard_file import write_safetensors
from qconv.errors import QconvError
from qconv.format import INDEX_NAME, SAFETENSORS_METADATA, sha256_file, shard_name

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (KB/MB/GB decimal, KiB/MiB/GiB binary, plain integers are bytes)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise QconvError(f"--max-shard-size: cannot parse {size!r} (examples: 5GB, 500MB, 2GiB)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise QconvError(f"--max-shard-size: must be positive, got {size!r}")
    return value


#: Soft upper bound on shard size whatever ``--max-shard-size`` says (a hard bound only when smaller).
PIPELINE_SHARD_BYTES = 300 * 10**6
#: Shards written (and hashed) at the same time.
WRITERS = 3
#: Size of the reused pinned host blocks that device tensors are copied into.
HOST_BLOCK_BYTES = 64 << 20
_ALIGN = 64


@dataclass
class WrittenShards:
    """What :meth:`ShardWriter.finish` produced."""

    files: dict[str, str]  # file name -> sha256 (shards and index)
    weight_map: dict[str, str]  # tensor name -> shard file name
    total_size: int  # bytes of tensor data
    shard_count: int


class _HostBlocks:
    """A free list of pinned ``HOST_BLOCK_BYTES`` buffers, shared by the shards (filling and being written)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.alloc_s = 0.0  # time spent allocating pinned memory (a diagnostic for the run's stats)

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._pinned(HOST_BLOCK_BYTES)

    def dedicated(self, nbytes: int) -> torch.Tensor:
        """Pinned memory for one tensor larger than a block (not kept for reuse)."""
        return self._pinned(nbytes)

    def _pinned(self, nbytes: int) -> torch.Tensor:
        t0 = time.perf_counter()
        block = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.alloc_s += time.perf_counter() - t0
        return block

    def give(self, blocks: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(b for b in blocks if b.numel() == HOST_BLOCK_BYTES)


@dataclass
class _Shard:
    number: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    blocks: list[torch.Tensor] = field(default_factory=list)  # pinned memory holding device tensors' copies
    used: int = HOST_BLOCK_BYTES  # bytes used in the last block (full: the next copy takes a new block)
    copied: "torch.cuda.Event | None" = None  # recorded after the last device-to-host copy

    def host_copy(self, tensor: torch.Tensor, blocks: _HostBlocks) -> torch.Tensor:
        """An asynchronous copy of a device tensor into this shard's pinned blocks."""
        n = tensor.numel() * tensor.element_size()
        if n > HOST_BLOCK_BYTES:  # rare: a dedicated pinned buffer, freed with the shard
            self.blocks.append(blocks.dedicated(n))
            self.used = HOST_BLOCK_BYTES
            dst = self.blocks[-1]
        elif n == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        else:
            start = -(-self.used // _ALIGN) * _ALIGN
            if start + n > HOST_BLOCK_BYTES:
                self.blocks.append(blocks.take())
                start = 0
            self.used = start + n
            dst = self.blocks[-1][start:start + n]
        out = dst.view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor, non_blocking=True)
        return out

    @property
    def temp_name(self) -> str:
        return f"shard-{self.number:05d}.safetensors.partial"


class ShardWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` and writes them in the background."""

    def __init__(self, directory: Path, max_shard_bytes: int, expected_total: int | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        # Balance the shards when the total is known: 5.3 GB under a 5 GB limit becomes 2 x 2.65 GB, so the
        # first shard is written while the second fills instead of both being written at the very end.
        # Shards are also kept under PIPELINE_SHARD_BYTES: the last shard's write + sha256 is the part of the
        # run nothing overlaps (measured on an H100 for an 8B model: 12.0 s with 2 x 2.85 GB shards, 8.5 s
        # with 7 x 0.81 GB), and WRITERS + 1 shards are what host memory holds.
        limit = min(max_shard_bytes, PIPELINE_SHARD_BYTES)
        shards = -(-expected_total // limit) if expected_total else 1
        self.target_bytes = min(limit, -(-expected_total // shards)) if expected_total else limit
        self._open = _Shard(1)
        self._written: list[_Shard] = []
        self._weight_map: dict[str, int] = {}
        self._total = 0
        self._queue: queue.Queue = queue.Queue()
        self._in_flight = threading.Semaphore(WRITERS)  # shards being written while the next one fills
        self._error: BaseException | None = None
        self._hash_pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="qconv-sha256")
        self._hashes: dict[int, str] = {}
        self._blocks = _HostBlocks()
        self._threads = [threading.Thread(target=self._run, name=f"qconv-writer-{i}", daemon=True)
                         for i in range(WRITERS)]
        for thread in self._threads:
            thread.start()

    # -- producer side -------------------------------------------------------------------------------
    def add(self, group: dict[str, torch.Tensor]) -> None:
        """Add tensors that belong together (kept in one shard); may hand the open shard to the writer."""
        self._raise_if_failed()
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self._open.tensors and (self._open.nbytes + size > self.max_shard_bytes
                                   or self._open.nbytes >= self.target_bytes):
            self._flush()
        on_device = False
        for name, tensor in group.items():
            if name in self._weight_map:
                raise QconvError(f"internal error: tensor {name!r} written twice")
            if tensor.device.type != "cpu":
                tensor, on_device = self._open.host_copy(tensor.contiguous(), self._blocks), True
            self._open.tensors[name] = tensor if tensor.is_contiguous() else tensor.contiguous()
            self._weight_map[name] = self._open.number
        if on_device:
            self._open.copied = torch.cuda.Event()
            self._open.copied.record()
        self._open.nbytes += size
        self._total += size

    def _flush(self) -> None:
        shard, self._open = self._open, _Shard(self._open.number + 1)
        self._written.append(shard)
        while not self._in_flight.acquire(timeout=0.5):  # notice a failed writer instead of blocking forever
            self._raise_if_failed()
        self._raise_if_failed()
        self._queue.put(shard)

    @property
    def pinned_alloc_s(self) -> float:
        """Seconds spent allocating pinned host blocks so far."""
        return self._blocks.alloc_s

    def finish(self, total_parameters: int | None = None) -> WrittenShards:
        """Write the last shard, wait for all writes and hashes, name the files, and write the index."""
        if self._open.tensors or not self._written:
            self._flush()
        self._stop_threads()
        self._raise_if_failed()
        total = len(self._written)
        files: dict[str, str] = {}
        for shard in self._written:
            digest = self._hashes[shard.number]
            final = shard_name(shard.number, total)
            (self.directory / shard.temp_name).rename(self.directory / final)
            files[final] = digest
        self._hash_pool.shutdown(wait=True)
        weight_map = {k: shard_name(n, total) for k, n in sorted(self._weight_map.items())}
        if total > 1:
            metadata = {"total_size": self._total}
            if total_parameters is not None:
                metadata["total_parameters"] = total_parameters
            index = {"metadata": metadata, "weight_map": weight_map}
            path = self.directory / INDEX_NAME
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files[INDEX_NAME] = sha256_file(path)
        return WrittenShards(files=files, weight_map=weight_map, total_size=self._total, shard_count=total)

    def abort(self) -> None:
        """Stop the writer thread (after an error elsewhere); files left behind belong to the temp dir."""
        self._error = self._error or QconvError("aborted")
        self._stop_threads(timeout=60)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)

    def _stop_threads(self, timeout: float | None = None) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, QconvError):
                raise self._error
            raise QconvError(f"{self.directory}: writing a shard failed ({self._error})") from self._error

    # -- writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            shard = self._queue.get()
            if shard is None or self._error is not None:
                return
            path = self.directory / shard.temp_name
            try:
                if shard.copied is not None:
                    shard.copied.synchronize()
                self._hashes[shard.number] = write_safetensors(path, shard.tensors, SAFETENSORS_METADATA,
                                                               self._hash_pool)
                logger.debug("wrote %s (%d tensors, %.1f MB)", path.name, len(shard.tensors), shard.nbytes / 1e6)
                shard.tensors = {}  # free the memory now
                self._blocks.give(shard.blocks)
                shard.blocks = []
            except BaseException as exc:  # reported to the producer on its next call
                self._error = exc
                return
            finally:
                self._in_flight.release()
