"""``qconv verify --source``: compare a converted checkpoint with the checkpoint it came from.

Each quantized weight is dequantized (:func:`dequantize_reference`, bitsandbytes' layout) and its relative error
``||W - dequant(Q(W))|| / ||W||`` must stay below :data:`THRESHOLDS`; every kept tensor must equal the
source tensor cast to its stored dtype, except embedding rows the tokenizer fixes changed or added
(recorded in the manifest). Source tensors are read with safetensors, one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from qconv import format as fmt
from qconv import safetensors_header as sth
from qconv.errors import QconvError

log = logging.getLogger(__name__)

#: Largest relative error accepted per quant type. Measured with bitsandbytes 0.50.2 on the CPU (2026-11-22)
#: for N(0, 0.05) weights of shapes 64x100, 512x512 and 48x37, with and without double quant:
#: nf4 0.085-0.089 (blocksize 32), 0.092 (64), 0.095 (128), 0.097-0.100 (256);
#: fp4 0.114 (32), 0.118-0.122 (64), 0.125-0.132 (128), 0.133-0.139 (256);
#: one 100-sigma outlier in a 512x512 matrix changes nothing (blockwise absmax).
#: The limits are 1.5x the worst measured value: room for real weights with heavier tails, while a wrong
#: source (independent weights: ~1.41), a zeroed or garbled tensor (>= 1) or a wrong scale still fails.
THRESHOLDS = {"nf4": 0.15, "fp4": 0.20}
#: Buffers some older checkpoints store and the converter rightly drops.
_DROPPABLE_SUFFIXES = (".inv_freq", ".masked_bias", ".attn.bias")


def resolve_source_dir(source: str | Path) -> Path:
    """A local folder, or a Hub repo id fetched (configs and safetensors only) through :mod:`qconv.hub`."""
    path = Path(source)
    if path.is_dir():
        return path
    from qconv.hub import download_snapshot, looks_like_repo_id

    if not looks_like_repo_id(str(source)):
        raise QconvError(f"--source {source}: not a directory or a Hub repo id")
    folder, _ = download_snapshot(str(source), allow_patterns=["*.json", "*.safetensors"])
    return Path(folder)


def changed_rows(manifest: fmt.Manifest | None) -> tuple[dict[str, set[int]], set[str]]:
    """From the manifest's tokenizer fixes: rows each tensor had replaced, and tensors allowed to grow."""
    rows: dict[str, set[int]] = defaultdict(set)
    grown: set[str] = set()
    for fix in (manifest.tokenizer_fixes if manifest else []):
        before, after = fix.get("before"), fix.get("after")
        if not fix.get("applied"):
            continue
        if fix.get("kind") == "untrained_rows" and isinstance(before, dict):
            rows[before.get("tensor", "")].update(int(i) for i in before.get("ids", []))
        if isinstance(after, dict) and after.get("tensors"):
            grown.update(after["tensors"])
            if fix.get("kind") == "pad_token" and after.get("added"):
                for name in after["tensors"]:
                    rows[name].add(int(after["id"]))
    return rows, grown


def _source_names(src_dir: Path) -> dict[str, Path]:
    files = sth.weight_files(src_dir)
    if not files:
        raise QconvError(f"--source {src_dir}: no safetensors weights there (only safetensors sources can be compared)")
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update((k, path) for k in f.keys())
    return names


def _match(name: str, source: dict[str, Path]) -> str | None:
    """The source name of an output tensor (a base-model checkpoint may lack the ``model.`` prefix)."""
    if name in source:
        return name
    short = name.split(".", 1)[1] if "." in name else name
    return short if short in source else None


def compare_with_source(report, headers: dict[str, sth.TensorEntry], quantized: dict[str, dict], config: dict[str, Any],
                        manifest: fmt.Manifest | None, source: str | Path, *, progress: bool = False) -> None:
    """Fill ``report.tensor_errors`` and add a problem per tensor that does not match the source."""
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    src_dir = resolve_source_dir(source)
    src_files = _source_names(src_dir)
    rows, grown = changed_rows(manifest)
    qc = config.get("quantization_config") or {}
    compute = getattr(torch, str(qc.get("bnb_4bit_compute_dtype") or "bfloat16").removeprefix("torch."), torch.bfloat16)
    report.thresholds = {k: v for k, v in THRESHOLDS.items() if k in {s.get("quant_type") for s in quantized.values()}}
    kept = [n for n in headers if n not in quantized and not fmt.is_state_tensor(n)]
    used: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def load(path: Path, name: str) -> "torch.Tensor":
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        for name in tqdm(sorted(quantized) + sorted(kept), desc="compare", unit="tensor", disable=not progress):
            src_name = _match(name, src_files)
            if src_name is None:
                report.problems.append(f"{name}: not in the source {src_dir.name}")
                continue
            used.add(src_name)
            src = load(src_files[src_name], src_name)
            if name in quantized:
                _compare_quantized(report, name, quantized[name], headers, load, src)
            else:
                _compare_kept(report, name, load(headers[name].file, name), src, compute, rows.get(name, set()), name in grown)
    tied = bool(config.get("tie_word_embeddings", False))
    for src_name in sorted(set(src_files) - used):
        if src_name.endswith(_DROPPABLE_SUFFIXES) or (tied and src_name in ("lm_head.weight", "embed_out.weight")):
            continue
        report.problems.append(f"{src_name}: in the source but not in the checkpoint")
    report.counts["compared"] = len(used)


def dequantize_reference(packed, quant_state):
    """float32 dequantization of a bnb 4-bit weight, written out in torch (CPU, any shape or blocksize).

    Not ``bitsandbytes.functional.dequantize_4bit``: its native CPU kernel (0.50.2) is wrong whenever the
    last dimension is not a multiple of the blocksize (it restarts blocks at each row), e.g. a 100x64
    weight at blocksize 128. This follows bitsandbytes' layout: high nibble first, per-block absmax over the
    flattened weight, double-quantized absmax = nested code[absmax] * nested absmax + offset.
    """
    import torch

    n = math.prod(quant_state.shape)
    data = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = quant_state.absmax
    if quant_state.nested:
        nested = quant_state.state2
        scaled = nested.code.float()[absmax.long()]
        block = torch.arange(scaled.numel()) // nested.blocksize
        absmax = scaled * nested.absmax.float()[block] + float(quant_state.offset)
    scale = absmax.float().repeat_interleave(quant_state.blocksize)[:n]
    return (quant_state.code.float()[codes] * scale).reshape(tuple(quant_state.shape))


def _compare_quantized(report, weight: str, state: dict, headers, load, src) -> None:
    names = [weight] + fmt.state_tensor_names(weight, state["quant_type"], "nested_blocksize" in state)
    tensors = {n: load(headers[n].file, n) for n in names}
    deq = dequantize_reference(tensors[weight], fmt.unpack_quant_state(weight, tensors))
    ref = src.float()
    if tuple(deq.shape) != tuple(ref.shape):
        report.problems.append(f"{weight}: shape {list(deq.shape)}, the source has {list(ref.shape)}")
        return
    norm = float(ref.norm())
    diff = float((ref - deq).norm())
    err = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    report.tensor_errors[weight] = err
    limit = THRESHOLDS.get(state["quant_type"], THRESHOLDS["fp4"])
    if not err <= limit:  # NaN fails too
        report.problems.append(f"{weight}: relative error {err:.4f} vs the source exceeds {limit} ({state['quant_type']})")


def _compare_kept(report, name: str, out, src, compute, replaced: set[int], may_grow: bool) -> None:
    import torch

    if out.is_floating_point() and out.dtype not in (compute, torch.float32, src.dtype):
        report.problems.append(f"{name}: stored as {out.dtype}, expected {compute} (or the source's {src.dtype})")
        return
    expected = src.to(out.dtype)
    same_tail = tuple(out.shape[1:]) == tuple(src.shape[1:])
    if tuple(out.shape) != tuple(src.shape) and not (may_grow and same_tail and out.shape[0] > src.shape[0]):
        report.problems.append(f"{name}: shape {list(out.shape)}, the source has {list(src.shape)}")
        return
    keep = [i for i in range(src.shape[0]) if i not in replaced] if (replaced or out.shape != src.shape) else None
    equal = torch.equal(out, expected) if keep is None else torch.equal(out[keep], expected[keep])
    if not equal:
        report.problems.append(f"{name}: differs from the source (kept tensors must equal it cast to {out.dtype})")
