"""Load benchmark: qconv runtime vs transformers on the same pre-quantized NF4 checkpoint, side by side.

    python scripts/bench_load.py [--small] [--skip-bf16] [--dir DIR] [--out DIR] [--repeats N]

Generates (once, cached in --dir) a checkpoint of random weights with the Llama-3.1-8B shape quantized to
NF4 with double quant on the GPU (``--small``: a tiny Llama on the CPU), plus its bf16 source unless
``--skip-bf16``. Then each method runs in its own subprocess, one after the other:

* ``qconv``            cold start: ``from qconv.runtime import from_pretrained`` then the call (patch=True, model
                       + tokenizer); transformers and bitsandbytes are imported inside, overlapped with reading
* ``qconv-warm``       the same call after pre-importing torch, the Llama modeling file, bitsandbytes, tokenizers
* ``hf-prequant-bf16`` (pre-imported) ``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`` + AutoTokenizer
* ``hf-prequant``      the same without ``dtype`` (transformers' default)
* ``hf-quantize``      (pre-imported) quantize-on-load from the bf16 source (BitsAndBytesConfig NF4, double quant)
* ``floor``            (pre-imported) nothing but the CUDA context: the host RSS every method starts from

Reported per run: import seconds (the pre-imports), load seconds (the call), their total (process start to
model ready), the load's peak host RSS (the child's VmHWM right after the load, before the logits check runs a
forward pass), the whole child's peak host RSS (``os.wait4``, forward pass included), peak GPU memory
(allocated, reserved), and the seconds the cyclic garbage collector ran during the load. Pre-importing
methods run ``gc.collect()`` at the end of their import phase: a full collection over the freshly imported
torch/transformers objects takes ~0.25 s on the H100 machine and otherwise lands in whichever load happens
to allocate next (both qconv and transformers rows were hit at random before). qconv's logits for a short
prompt (patches undone) must equal transformers' (pre-quantized, bf16) exactly. Results: a table on stdout, JSON and
Markdown under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T_START = time.perf_counter()

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
METHODS = ("qconv", "qconv-warm", "hf-prequant-bf16", "hf-prequant", "hf-quantize", "floor")
REPEATED = ("qconv", "qconv-warm", "hf-prequant-bf16")


# ----------------------------------------------------------------------------------------------------------
# checkpoint generation (own subprocess)
# ----------------------------------------------------------------------------------------------------------
def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h)})
    return out


class _ShardWriter:
    """Accumulate tensors and write ``model-XXXXX.safetensors`` shards of about ``limit`` bytes, then an index."""

    def __init__(self, directory: Path, limit: int):
        self.dir, self.limit, self.pending, self.size, self.shards = directory, limit, {}, 0, []

    def add(self, tensors: dict) -> None:
        for k, v in tensors.items():
            self.pending[k] = v
            self.size += v.numel() * v.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            path = self.dir / f"shard-{len(self.shards):05d}.safetensors"
            save_file(self.pending, str(path), metadata={"format": "pt"})
            self.shards.append((path, list(self.pending)))
            self.pending, self.size = {}, 0

    def finish(self) -> None:
        from qconv import format as fmt

        self.flush()
        weight_map, total = {}, len(self.shards)
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.dir / fmt.shard_name(i, total)
            path.rename(final)
            weight_map.update(dict.fromkeys(names, final.name))
        if total > 1:
            (self.dir / fmt.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def generate(base: Path, small: bool, bf16: bool) -> None:
    """Write ``base/nf4`` (and ``base/bf16``): random weights, quantized with bitsandbytes where they run."""
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import LlamaConfig

    from qconv import format as fmt

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tokenizer

    device = "cpu" if small else "cuda"
    cfg = dict(TINY if small else LLAMA_8B)
    limit = (64 << 20) if small else (4 << 30)
    nf4_dir, bf16_dir = base / "nf4.tmp", base / "bf16.tmp"
    for d in (nf4_dir, bf16_dir):
        d.mkdir(parents=True, exist_ok=True)
    nf4, src = _ShardWriter(nf4_dir, limit), (_ShardWriter(bf16_dir, limit) if bf16 else None)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in _shapes(cfg).items():
        if len(shape) == 1:
            w = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
        else:
            w = 0.02 * torch.randn(shape, generator=gen, device=device)
        w = w.to(torch.bfloat16)
        if src is not None:
            src.add({name: w.cpu()})
        if any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            nf4.add({k: v.cpu() for k, v in fmt.pack_quant_state(name, packed, state).items()})
        else:
            nf4.add({name: w.cpu()})
    config = LlamaConfig(**cfg, bos_token_id=1, eos_token_id=2)
    tokenizer = make_tokenizer(384)
    for writer, directory, quantized in ((nf4, nf4_dir, True), (src, bf16_dir, False)):
        if writer is None:
            continue
        writer.finish()
        config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if quantized:
            data = json.loads((directory / "config.json").read_text())
            data["quantization_config"] = fmt.quantization_config(fmt.QuantSettings())
            (directory / "config.json").write_text(json.dumps(data, indent=2))
        directory.rename(base / directory.name.removesuffix(".tmp"))


# ----------------------------------------------------------------------------------------------------------
# one measured load (own subprocess)
# ----------------------------------------------------------------------------------------------------------
def _preimport() -> None:
    """What every transformers-based load needs imported: torch, the Llama modeling file, bitsandbytes, tokenizers."""
    import bitsandbytes  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.integrations import bitsandbytes as _  # noqa: F401


def _vm_hwm_gib() -> float | None:
    """This process's peak resident set so far (VmHWM), Linux only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return None


def child(method: str, base: Path, small: bool, result: Path) -> None:
    """One load. ``qconv`` starts cold (import qconv.runtime only); every other method pre-imports the stack
    (counted as import_s) so that load_s compares the loads themselves."""
    import gc

    t0 = time.perf_counter()
    if method != "qconv":
        _preimport()
    if method.startswith("qconv"):
        from qconv.runtime import from_pretrained
    if method != "qconv":
        gc.collect()  # the imports' garbage-collector debt is paid here, not by whichever load allocates next
    gc_s = [0.0, 0.0]  # time in the cyclic garbage collector during the load (diagnostic)

    def _gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    t1 = time.perf_counter()
    gc.callbacks.append(_gc_timer)
    import torch

    device = "cpu" if small else "cuda:0"
    if method.startswith("qconv"):
        model, tok = from_pretrained(base / "nf4", device_map=device, dtype=torch.bfloat16)
    elif method == "floor":
        model, tok = None, None
        if not small:
            torch.empty(1, device=device)  # the CUDA context, as every load creates it
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if method == "hf-quantize":
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(base / "bf16", quantization_config=bnb, device_map=device,
                                                         dtype=torch.bfloat16)
        else:
            kw = {"dtype": torch.bfloat16} if method == "hf-prequant-bf16" else {}
            model = AutoModelForCausalLM.from_pretrained(base / "nf4", device_map=device, **kw)
        tok = AutoTokenizer.from_pretrained(base / "nf4")
    t_ret = time.perf_counter()
    if torch.cuda.is_available() and not small:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    gc.callbacks.remove(_gc_timer)
    out = {"method": method, "import_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0,
           "load_peak_rss_gib": _vm_hwm_gib(),  # the peak up to here: imports + load, before the logits check
           "sync_s": t2 - t_ret, "gc_s": gc_s[0]}
    if model is not None and getattr(model, "_qconv", None):  # time between the call and the loader's own clock
        out["outside_loader_s"] = (t_ret - t1) - model._qconv["seconds"]
    if model is not None:
        qinfo = getattr(model, "_qconv", {})
        if qinfo.get("patched"):
            from qconv.runtime.patches.modules import unpatch_model

            unpatch_model(model)  # stock modules for the exactness check against transformers
        for m in model.modules():  # bitsandbytes' CPU fast path depends on the CPU; keep --small comparable
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        ids = torch.arange(3, 19).remainder(len(tok)).unsqueeze(0).to(model.device)
        with torch.no_grad():
            logits = model(ids).logits.float().cpu()
        torch.save(logits, result.with_suffix(".pt"))
        out.update(patched=qinfo.get("patched"), timings=qinfo.get("timings"), rss_mib=qinfo.get("rss_mib"), finite=bool(torch.isfinite(logits).all()))
    if torch.cuda.is_available() and not small:
        out["gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    result.write_text(json.dumps(out))


def run_child(method: str, base: Path, small: bool, tmp: Path, env: dict) -> dict:
    result = tmp / f"{method}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--_child", method, "--dir", str(base), "--_result", str(result)]
    cmd += ["--small"] if small else []
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.is_file():
        return {"method": method, "error": f"exit {proc.returncode}"}
    out = json.loads(result.read_text())
    out["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "date": datetime.date.today().isoformat()}
    for pkg in ("torch", "transformers", "bitsandbytes", "safetensors", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except Exception:  # pragma: no cover
        out["device"] = "?"
    return out


def table(rows: list[dict], ref: str) -> str:
    base = next((r for r in rows if r["method"] == ref and "error" not in r), None)
    head = ("| method | import s | load s | total s | load vs hf | total vs hf | load peak RSS GiB | process peak RSS GiB "
            "| GPU alloc GiB | GPU reserved GiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * 8)
            continue
        load = f"{r['load_s'] / base['load_s']:.2f}x" if base else "-"
        total = f"{r['total_s'] / base['total_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['method']} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['total_s']:.2f} | {load} | {total} | "
            f"{r.get('load_peak_rss_gib') or 0:.2f} | {r['peak_rss_gib']:.2f} | {r.get('gpu_alloc_gib', 0):.2f} | {r.get('gpu_reserved_gib', 0):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny Llama on the CPU (a smoke run)")
    ap.add_argument("--skip-bf16", action="store_true", help="no bf16 source, no quantize-on-load run")
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint cache (default /tmp/qconv-bench[-small])")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where results go")
    ap.add_argument("--repeats", type=int, default=2, help="runs of the qconv, qconv-warm and hf-prequant-bf16 methods")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = args.dir or Path("/tmp/qconv-bench-small" if args.small else "/tmp/qconv-bench")
    if args._child:
        child(args._child, base, args.small, args._result)
        return 0
    if args._generate:
        generate(base, args.small, bf16=not args.skip_bf16)
        return 0

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    need_bf16 = not args.skip_bf16 and "hf-quantize" in args.methods
    if not (base / "nf4").is_dir() or (need_bf16 and not (base / "bf16").is_dir()):
        t = time.perf_counter()
        gen_cmd = [sys.executable, __file__, "--_generate", "--dir", str(base)] + (["--small"] if args.small else [])
        subprocess.run(gen_cmd + ([] if need_bf16 else ["--skip-bf16"]), env=env, check=True)
        print(f"generated {base} in {time.perf_counter() - t:.1f} s", flush=True)
    nf4_bytes = sum(p.stat().st_size for p in (base / "nf4").glob("*.safetensors"))

    methods = [m for m in args.methods.split(",") if m in METHODS and (m != "hf-quantize" or need_bf16)]
    order = []
    for rep in range(args.repeats):
        order += [m for m in methods if rep == 0 or m in REPEATED]
    tmp = base / "results"
    tmp.mkdir(exist_ok=True)
    rows = []
    for method in order:
        row = run_child(method, base, args.small, tmp, env)
        if "error" not in row and (tmp / f"{method}.pt").exists():
            row["logits"] = str((tmp / f"{method}.pt").rename(tmp / f"{method}-{len(rows)}.pt"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    logits = {}
    for r in rows:
        if "logits" in r and r["method"] not in logits:
            logits[r["method"]] = torch.load(r["logits"], weights_only=True)
    ref = logits.get("hf-prequant-bf16")
    ours = [m for m in ("qconv", "qconv-warm") if m in logits]  # the qconv methods that ran
    same = ref is not None and bool(ours) and all(torch.equal(logits[m], ref) for m in ours)
    best = {}
    for r in rows:  # keep each method's fastest successful run
        # best by load time: pre-imported methods differ by import noise (seconds) far more than by load
        # time, and for the cold method load_s already holds its imports
        if "error" not in r and (r["method"] not in best or r["load_s"] < best[r["method"]]["load_s"]):
            best[r["method"]] = r
    best_rows = [best[m] for m in methods if m in best] + [r for r in rows if "error" in r]
    info = versions() | {"checkpoint_gib": nf4_bytes / 2**30, "logits_equal_qconv_vs_hf": same, "runs": rows}
    text = table(best_rows, "hf-prequant-bf16")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_load.json").write_text(json.dumps(info, indent=1))
    header = (f"{info['device']}, torch {info['torch']}, transformers {info['transformers']}, bitsandbytes "
              f"{info['bitsandbytes']}, python {info['python']}, {info['date']}; checkpoint {nf4_bytes / 2**30:.2f} GiB; "
              f"best of {args.repeats} for {', '.join(REPEATED)}; logits qconv == transformers: {same}")
    (args.out / "bench_load.md").write_text(header + "\n\n" + text + "\n")
    print(header)
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
