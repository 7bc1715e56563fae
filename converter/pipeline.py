"""The streaming tensor loop: read (prefetch thread) -> transform -> cast / quantize -> shard writer (thread).

Only a few tensors are alive at a time: the ones the reader has prefetched (``depth + 1`` reused buffers),
the one being quantized, and the output shards (one filling, one being written).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from qconv.converter.checkpoint import READ_TIMES, Checkpoint, prefetch
from qconv.converter.plan import DROP, QUANTIZE, Plan
from qconv.converter.quantize import Quantizer
from qconv.converter.shard_writer import ShardWriter
from qconv.format import QuantSettings

logger = logging.getLogger(__name__)


def write_tensors(
    checkpoint: Checkpoint,
    plan: Plan,
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    settings: QuantSettings,
    device: torch.device,
    out_dir: Path,
    max_shard_bytes: int,
    *,
    progress: bool = True,
    prefetch_depth: int = 2,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write every planned tensor into shards in ``out_dir``; return (stats, {file name: sha256})."""
    from tqdm.auto import tqdm

    if device.type == "cpu":
        limit_heap_fragmentation()
    todo = [t for t in plan.tensors if t.action != DROP]
    by_name = {t.source_name: t for t in todo}
    source_bytes = sum(checkpoint.infos[t.source_name].nbytes for t in todo)
    quantizer = Quantizer(settings, device)
    out_bytes = {t.source_name: estimate_output_bytes(t.action, checkpoint.infos[t.source_name].numel, t.dtype, settings)
                 for t in todo}
    writer = ShardWriter(out_dir, max_shard_bytes, expected_total=sum(out_bytes.values()))
    todo = spread_large_kept(todo, lambda t: t.action != QUANTIZE and out_bytes[t.source_name] >= writer.target_bytes)
    read_times = dict(READ_TIMES)
    params = quantized = kept = 0
    bar = tqdm(total=source_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="qconv convert",
               disable=not progress, leave=False)
    # Kept tensors are never quantized: read them into their own memory (no pinned slot, no extra copy).
    kept_names = {t.source_name for t in todo if t.action != QUANTIZE}
    reads = prefetch(checkpoint, [t.source_name for t in todo], depth=prefetch_depth,
                     pin_memory=device.type == "cuda", own_memory=kept_names.__contains__)
    fresh_reads = checkpoint.kind in ("safetensors", "memory")  # kept tensors there are not in reused memory
    # On a GPU nothing waits for the quantized results (the shard writer copies them back asynchronously), so a
    # read buffer goes back to the reader only once its upload is done: one tensor later, after an event.
    pending: tuple[Any, Callable[[], None]] | None = None
    # Where the loop's time goes (seconds): waiting for the reader, quantizing / casting, waiting for uploads to
    # finish, handing groups to the writer (blocks while it is behind), and the writer's final flush.
    waits = {"read_wait_s": 0.0, "quantize_s": 0.0, "upload_wait_s": 0.0, "writer_add_s": 0.0, "finish_s": 0.0}
    loop_start = time.perf_counter()
    try:
        iterator = iter(reads)
        while True:
            t0 = time.perf_counter()
            item = next(iterator, None)
            waits["read_wait_s"] += time.perf_counter() - t0
            if item is None:
                break
            name, tensor, release = item
            t0 = time.perf_counter()
            step = by_name[name]
            transform = transforms.get(name) or transforms.get(step.out_name)
            if transform is not None:
                tensor = transform(tensor)
            params += tensor.numel()
            uploaded = None
            if step.action == QUANTIZE:
                weight = quantizer.to_device(tensor, step.dtype)
                if device.type == "cuda":
                    uploaded = torch.cuda.Event()
                    uploaded.record()
                group = quantizer.quantize(step.out_name, weight)
                del weight
                quantized += 1
            else:  # .bin tensors are views of a memory-mapped file: copy those
                group = {step.out_name: tensor.to(step.dtype, copy=not fresh_reads)}
                kept += 1
            del tensor
            t1 = time.perf_counter()
            waits["quantize_s"] += t1 - t0
            if pending is not None:
                pending[0].synchronize()
                pending[1]()
                pending = None
            if uploaded is None:
                release()
            else:
                pending = (uploaded, release)
            t2 = time.perf_counter()
            waits["upload_wait_s"] += t2 - t1
            writer.add(group)
            del group
            waits["writer_add_s"] += time.perf_counter() - t2
            bar.update(checkpoint.infos[name].nbytes)
            bar.set_postfix_str(f"{quantized + kept}/{len(todo)} tensors", refresh=False)
        if pending is not None:
            pending[0].synchronize()
            pending[1]()
            pending = None
        t0 = time.perf_counter()
        written = writer.finish(total_parameters=params)
        waits["finish_s"] = time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    finally:
        reads.close()
        bar.close()
    stats = {
        "params": params,
        "source_bytes": source_bytes,
        "output_bytes": written.total_size,
        "bits_per_param": round(8 * written.total_size / max(params, 1), 4),
        "quantized_tensors": quantized,
        "kept_tensors": kept,
        "dropped_tensors": len(plan.tensors) - len(todo),
        "shards": written.shard_count,
        "device": str(device),
        "model_class": plan.model_class,
        "timings": {"loop_s": round(time.perf_counter() - loop_start, 3), **{k: round(v, 3) for k, v in waits.items()},
                    **{f"reader_{k}": round(v - read_times[k], 3) for k, v in READ_TIMES.items()},
                    "writer_pinned_alloc_s": round(writer.pinned_alloc_s, 3)},
    }
    return stats, dict(written.files)


def spread_large_kept(todo: list, is_large: Callable[[Any], bool]) -> list:
    """Reorder so that tensors filling a shard on their own (embeddings, lm_head) are spread evenly over the
    run, the first at its start: a shard's sha256 takes ~1 s per GB on one core and the last shard's is
    the part of the run nothing else overlaps (lm_head comes last in most checkpoints), while two such
    tensors in flight at once would add their size to peak host memory. The rest keeps its order."""
    large = [t for t in todo if is_large(t)]
    if not large:
        return todo
    rest = [t for t in todo if not is_large(t)]
    slots: dict[int, list] = {}
    for k, t in enumerate(large):
        slots.setdefault(round(k * len(rest) / len(large)), []).append(t)
    out: list = []
    for i in range(len(rest) + 1):
        out.extend(slots.get(i, ()))
        if i < len(rest):
            out.append(rest[i])
    return out


def estimate_output_bytes(action: str, numel: int, dtype: torch.dtype | None, settings: QuantSettings) -> int:
    """Bytes one planned tensor will take in the output (exact for kept tensors, within ~200 B when quantized)."""
    if action != QUANTIZE:
        return numel * (dtype.itemsize if dtype is not None else 0)
    blocks = -(-numel // settings.blocksize)
    packed = -(-numel // 2)
    if settings.double_quant:
        state = blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16
    else:
        state = 4 * blocks + 4 * 16
    return packed + state + 200  # + the packed JSON


_HEAP_LIMITED = False


def limit_heap_fragmentation() -> None:
    """On glibc, serve every allocation of 1 MiB or more with its own mmap (a fixed ``M_MMAP_THRESHOLD``).

    Quantizing on the CPU allocates large temporaries between the small long-lived output tensors; with
    glibc's default dynamic threshold those temporaries come from the heap, which then cannot shrink, and
    peak RSS grows with the model (measured: +740 MiB instead of +90 MiB for a 390 MB model held in one
    shard). This setting is process-wide and stays after the conversion; it is a no-op off glibc.
    """
    global _HEAP_LIMITED
    if _HEAP_LIMITED or not sys.platform.startswith("linux"):
        return
    _HEAP_LIMITED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):  # musl or another libc: nothing to do
        logger.debug("mallopt unavailable; heap fragmentation not limited")
