"""Convert speed and memory against plain IO, on a Llama-3.1-8B-shaped checkpoint of random bf16 weights.

    python scripts/bench_convert.py [--small] [--workdir DIR] [--no-transformers] [--json PATH]

Steps: write the checkpoint (32 layers, hidden 4096, intermediate 14336, 32/8 heads, vocab 128256; random
data made on the GPU when there is one; ~5 GB safetensors shards), then, each in its own subprocess
(so peak RSS is that of one measurement: the child's ``VmHWM``, see ``_maxrss_mib``):
  io          read every source byte (64 MiB reads) + write as many bytes as qconv's output has,
  qconv       ``qconv.converter.convert`` (device auto, default ``--max-shard-size``), twice (the best counts),
  transformers ``from_pretrained(quantization_config=BitsAndBytesConfig(...), dtype=bf16)`` + ``save_pretrained``,
and finally checks that qconv's and transformers' outputs hold the same tensors byte for byte (same kind of
device). Prints a final table (seconds, x IO, imports, peak RSS, GPU peak, byte identity); the ratio
convert/IO is the goal metric (<= 1.3). Imports (the same modules for both converters, see ``_preimport``)
are timed separately.
``--small`` makes a tiny model so the whole script runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
SMALL = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)


def _maxrss_mib() -> float:
    """Peak RSS of this process. Linux ``getrusage`` keeps the parent's peak across fork+exec, so on Linux
    the per-address-space ``VmHWM`` is read instead (a fresh exec starts it from zero)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(limit_s: float = 45.0) -> float:
    """Flush dirty pages (so one measurement's writeback does not slow the next), waiting at most ``limit_s``."""
    import threading

    if not hasattr(os, "sync"):
        return 0.0
    t = time.perf_counter()
    thread = threading.Thread(target=os.sync, daemon=True)
    thread.start()
    thread.join(limit_s)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------- children
def child_io(src: str, out: str, out_bytes: int) -> dict:
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    read = 0
    for f in sorted(Path(src).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                read += n
    t1 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    remaining, i = out_bytes, 0
    while remaining > 0:
        size = min(remaining, 5 * 10**9)
        with open(Path(out) / f"io-{i}.bin", "wb", buffering=0) as fh:
            left = size
            while left > 0:
                left -= fh.write(view[: min(left, len(buf))])
        remaining -= size
        i += 1
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "read_s": t1 - t0, "write_s": t2 - t1, "read_bytes": read, "written_bytes": out_bytes}


def _preimport() -> None:
    """What both converters import before they touch data (timed apart, as ``import s``): torch,
    bitsandbytes, transformers' auto classes, the Llama modeling module and the bnb quantizer."""
    import bitsandbytes  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401
    from transformers.quantizers.auto import AutoHfQuantizer  # noqa: F401


def child_qconv(src: str, out: str, max_shard_size: str) -> dict:
    t0 = time.perf_counter()
    _preimport()
    import torch

    from qconv.converter import convert

    t1 = time.perf_counter()
    result = convert(src, out, max_shard_size=max_shard_size, progress=False, fix_tokenizer=False)
    t2 = time.perf_counter()
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"seconds": t2 - t1, "import_s": t1 - t0, "stats": result.stats, "gpu_peak_gib": gpu}


def child_transformers(src: str, out: str) -> dict:
    t0 = time.perf_counter()
    _preimport()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t1 = time.perf_counter()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map=device_map)
    t2 = time.perf_counter()
    model.save_pretrained(out)
    t3 = time.perf_counter()
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"seconds": t3 - t1, "load_s": t2 - t1, "save_s": t3 - t2, "import_s": t1 - t0, "gpu_peak_gib": gpu}


def run_child(kind: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_child", kind, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- parent
def make_checkpoint(directory: Path, dims: dict, shard_bytes: int) -> int:
    """Random bf16 weights (std 0.02) for every parameter of the config, in ~shard_bytes safetensors shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**dims)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    groups, group, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if group and size + nbytes > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((name, shape))
        size += nbytes
    groups.append(group)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        tensors = {}
        for name, shape in group:
            t = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            if "norm" in name:
                t = t.add_(1.0)
            tensors[name] = t.cpu()
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def same_tensors(a: Path, b: Path) -> tuple[bool, int, str]:
    """Whether two checkpoints hold the same key set and bytes; returns (equal, tensors compared, first diff)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        found = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                found.update(dict.fromkeys(h.keys(), f))
        return found

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False, 0, f"key sets differ: {sorted(set(ia) ^ set(ib))[:3]}"
    for n, key in enumerate(sorted(ia), 1):
        with safe_open(str(ia[key]), framework="pt") as fa, safe_open(str(ib[key]), framework="pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
        if ta.dtype != tb.dtype or ta.shape != tb.shape or not ta.view(-1).view(dtype=_u8()).equal(tb.view(-1).view(dtype=_u8())):
            return False, n, key
    return True, len(ia), ""


def _u8():
    import torch

    return torch.uint8


def versions() -> dict:
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # pragma: no cover
        bnb = "missing"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bnb, "gpu": gpu, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model (CPU check of the script)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qconv-bench-convert")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers quantize-on-load run")
    ap.add_argument("--shard-sizes", default="5GB,5GB",
                    help="qconv --max-shard-size of each qconv run (comma-separated; default: two runs at 5GB)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (updated as it goes)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip optional runs once this much time has passed")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    def over_budget(reserve_s: float) -> bool:
        return time.perf_counter() - started > args.budget_s - reserve_s

    dims = SMALL if args.small else LLAMA_8B
    source_shard = 20 * 10**6 if args.small else 5 * 10**9
    shard_sizes = ["2MB", "2MB"] if args.small and args.shard_sizes == "5GB,5GB" else args.shard_sizes.split(",")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    src = work / "source"
    t = time.perf_counter()
    src_bytes = make_checkpoint(src, dims, source_shard)
    made_s = time.perf_counter() - t
    print(f"source: {src_bytes / 2**30:.2f} GiB in {made_s:.1f} s (+ sync {_sync():.1f} s) -> {src}", flush=True)
    info = versions()
    print(json.dumps(info), flush=True)

    rows: list[dict] = []
    io_runs: list[dict] = []
    qconv_out = None
    for i, shard in enumerate(shard_sizes):
        if i and over_budget(120):
            print(f"skipping qconv {shard}: time budget", flush=True)
            continue
        out = work / f"qconv-{i}"
        r = run_child("qconv", str(src), str(out), shard)
        rows.append({"what": f"qconv convert, run {i + 1} (--max-shard-size {shard}: {r['stats']['shards']} shards, "
                             f"{r['stats']['device']})", **r})
        print(f"qconv {shard}: {r['seconds']:.2f} s, rss {r['maxrss_mib']:.0f} MiB, "
              f"loop timings {r['stats'].get('timings')}", flush=True)
        if qconv_out is None:
            qconv_out = out
        else:
            shutil.rmtree(out)
        _sync(15)
        io = run_child("io", str(src), str(work / "io"), str(r["stats"]["output_bytes"]))
        shutil.rmtree(work / "io")
        _sync(15)
        io_runs.append(io)
        print(f"io: {io['seconds']:.2f} s (read {io['read_s']:.2f}, write {io['write_s']:.2f})", flush=True)
        _dump(args.json, info, src_bytes, rows + [{"what": "io", **r} for r in io_runs], None)
    io_best = min(io_runs, key=lambda r: r["seconds"])
    rows.insert(0, {"what": f"IO only: read source (1 thread) + write as many bytes (best of {len(io_runs)})",
                    **io_best})

    equal = None
    if not args.no_transformers and over_budget(100):
        print("skipping transformers: time budget", flush=True)
    elif not args.no_transformers:
        ref = work / "transformers"
        r = run_child("transformers", str(src), str(ref))
        rows.append({"what": "transformers quantize-on-load + save_pretrained", **r})
        print(f"transformers: {r['seconds']:.2f} s", flush=True)
        equal = same_tensors(qconv_out, ref)
        print(f"qconv output == transformers output: {equal}", flush=True)

    io_s = io_best["seconds"]
    q_rows = [r for r in rows if r["what"].startswith("qconv")]
    best = min(q_rows, key=lambda r: r["seconds"])
    ident = "-" if equal is None else (f"yes ({equal[1]} tensors)" if equal[0] else f"NO ({equal[2]})")
    print(f"\nLlama-3.1-8B shape{' (SMALL)' if args.small else ''}: source {src_bytes / 1e9:.2f} GB bf16, "
          f"output {best['stats']['output_bytes'] / 1e9:.2f} GB; {info['gpu']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, bitsandbytes {info['bitsandbytes']}, {info['date']}")
    print("| run | seconds | x IO | import s | peak RSS GiB | GPU peak GiB | tensors == transformers |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        same = ident if r is rows[1] else "-"
        print(f"| {r['what']} | {r['seconds']:.2f} | {r['seconds'] / io_s:.2f} | {r.get('import_s', 0):.1f} | "
              f"{r['maxrss_mib'] / 1024:.2f} | {r.get('gpu_peak_gib', 0):.2f} | {same} |")
    verdict = "met" if best["seconds"] / io_s <= 1.3 else "NOT met"
    print(f"goal convert <= 1.3x IO: {verdict} (best qconv {best['seconds']:.2f} s = {best['seconds'] / io_s:.2f}x IO "
          f"{io_s:.2f} s); qconv vs transformers tensors byte-identical: {ident}")
    _dump(args.json, info, src_bytes, rows, equal)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _dump(path: Path | None, info: dict, src_bytes: int, rows: list[dict], equal) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"versions": info, "source_bytes": src_bytes, "rows": rows,
                                    "byte_identical": equal}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        kind, rest = sys.argv[2], sys.argv[3:]
        fn = {"io": lambda s, o, b: child_io(s, o, int(b)), "qconv": child_qconv, "transformers": child_transformers}[kind]
        result = fn(*rest)
        result["maxrss_mib"] = _maxrss_mib()
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
