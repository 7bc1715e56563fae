"""Where a qconv load's host memory and time go: one process, step by step, then import-time experiments.

    python scripts/profile_load.py [--dir NF4_DIR] [--device auto|cpu|cuda:0] [--out DIR] [--no-imports]

Steps (one process, in this order; each prints wall seconds since the process started, the step's own
seconds, VmRSS and VmHWM from ``/proc/self/status``): python start, ``import torch``, the CUDA context,
transformers + the Llama modeling file, bitsandbytes (+ transformers' bnb integration), tokenizers,
``import qconv.runtime`` (+ its loader module), ``from_pretrained(dir)`` (the loader's own per-phase marks,
``model._qconv["rss_mib"]``, are printed as a second table), then a forward pass (not part of the load:
it shows what cuBLAS and friends add afterwards). The modules the load itself imported are listed.

Without ``--no-imports``, subprocesses (``python -P``: the repo root's ``kernels/`` must not shadow the
``kernels`` package transformers probes for) then time the same imports twice as they are and twice with
``PYTHONPYCACHEPREFIX`` set to a fresh writable folder and ``PYTHONDONTWRITEBYTECODE`` unset (a read-only tree without ``.pyc`` files compiles
every module at every start; the second run with the prefix shows the cost once compiled), report whether
the packages' ``__pycache__`` folders are writable and filled, and write ``python -X importtime`` of a cold
``from qconv.runtime import from_pretrained; from_pretrained(dir)`` (top 25 by cumulative and by self time).

``--dir`` is a qconv/bnb 4-bit checkpoint; without it a tiny Llama is generated on the CPU (bench_load's).
Results: ``profile_load.json``, ``profile_load.md`` and ``importtime*.log`` under ``--out`` (default $OUT or .).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREIMPORTS = (
    "import torch; import transformers.models.llama.modeling_llama; "
    "from transformers import AutoModelForCausalLM, AutoTokenizer; import bitsandbytes; "
    "from transformers.integrations import bitsandbytes as _b; import tokenizers"
)


def _status() -> tuple[float, float]:
    vals = {}
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:")):
                vals[line[:5]] = int(line.split()[1]) / 1024
    return vals.get(b"VmRSS", 0.0), vals.get(b"VmHWM", 0.0)


def _since_process_start() -> float:
    """Seconds since this process was created (interpreter start included), from /proc; else since T0."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return time.time() - (btime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.perf_counter() - T0


class Steps:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.offset = _since_process_start() - (time.perf_counter() - T0)  # process start -> T0
        self.last = T0
        self.add("python start (interpreter, site, this script's stdlib imports)", since_start=True)

    def add(self, label: str, since_start: bool = False) -> None:
        now = time.perf_counter()
        rss, hwm = _status()
        wall = self.offset + now - T0
        step = wall if since_start else now - self.last
        self.last = now
        prev = self.rows[-1]["rss_mib"] if self.rows else 0.0
        self.rows.append({"step": label, "wall_s": round(wall, 3), "step_s": round(step, 3), "rss_mib": round(rss, 1),
                          "hwm_mib": round(hwm, 1), "d_rss_mib": round(rss - prev, 1)})
        print(f"{wall:8.2f} s  {step:7.3f} s  RSS {rss:8.1f} MiB  HWM {hwm:8.1f} MiB  {label}", flush=True)


def profile(steps: Steps, directory: Path, device: str) -> dict:
    import torch

    steps.add("import torch")
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)
        steps.add("CUDA context (torch.cuda.init + a 1-element tensor)")
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    steps.add("transformers + modeling_llama (AutoModelForCausalLM, AutoTokenizer)")
    import bitsandbytes  # noqa: F401
    from transformers.integrations import bitsandbytes as _bnb_integration  # noqa: F401

    steps.add("bitsandbytes (+ transformers.integrations.bitsandbytes)")
    import tokenizers  # noqa: F401

    steps.add("tokenizers")
    floor = steps.rows[-1]
    import qconv.runtime  # noqa: F401

    steps.add("import qconv.runtime")
    import qconv.runtime.loader  # noqa: F401

    steps.add("import qconv.runtime.loader (what from_pretrained imports first)")
    before = set(sys.modules)
    model, tok = qconv.runtime.from_pretrained(directory, device_map=device, dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    steps.add(f"from_pretrained (patched: {', '.join(model._qconv['patched']) or 'none'})")
    new = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    qconv_new = sorted(m for m in set(sys.modules) - before if m.startswith("qconv."))
    ids = torch.arange(3, 19).remainder(len(tok) if tok is not None else 16).unsqueeze(0).to(model.device)
    with torch.no_grad():
        model(ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    steps.add("a forward pass of 16 tokens (after the load: cuBLAS etc.)")
    info = model._qconv
    phases = [{"phase": k, "t_s": info["timings"].get(k), "rss_mib": v[0], "hwm_mib": v[1]} for k, v in info.get("rss_mib", {}).items()]
    return {"device": device, "steps": steps.rows, "load_phases": phases, "timings": info["timings"],
            "new_top_level_modules": new, "new_qconv_modules": qconv_new,
            "qconv_over_floor_mib": round(steps.rows[-2]["hwm_mib"] - floor["hwm_mib"], 1)}


def _timed(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-P", "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - t, 2)


def _pycache_report() -> dict:
    """Is each package's folder writable, and does its __pycache__ hold .pyc files?"""
    code = (
        "import json, os, importlib.util as u\n"
        "out = {}\n"
        "for name in ('torch', 'transformers', 'transformers.models.llama', 'bitsandbytes', 'tokenizers', 'triton', 'qconv'):\n"
        "    spec = u.find_spec(name)\n"
        "    d = os.path.dirname(spec.origin) if spec and spec.origin else None\n"
        "    pc = os.path.join(d, '__pycache__') if d else None\n"
        "    n = len([f for f in os.listdir(pc) if f.endswith('.pyc')]) if pc and os.path.isdir(pc) else 0\n"
        "    out[name] = {'dir': d, 'writable': bool(d) and os.access(d, os.W_OK), 'pyc_in_pycache': n}\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-500:]}


def _parse_importtime(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:"):].split("|", 2))
        rows.append({"module": name.strip(), "self_s": int(self_us) / 1e6, "cumulative_s": int(cum_us) / 1e6})
    return rows


def import_experiments(directory: Path, device: str, out: Path, pyc_prefix: Path | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    result: dict = {"pycache": _pycache_report(), "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
                    "dont_write_bytecode": sys.dont_write_bytecode}
    result["stack_import_s_as_is"] = [_timed(PREIMPORTS, env) for _ in range(2)]
    prefix = pyc_prefix or Path(f"/tmp/qconv-pyc-{os.getpid()}")
    subprocess.run(["rm", "-rf", str(prefix)], check=False)  # start from an empty cache
    penv = dict(env, PYTHONPYCACHEPREFIX=str(prefix))
    penv.pop("PYTHONDONTWRITEBYTECODE", None)  # the first run must be allowed to write the cache
    result["stack_import_s_pycache_prefix"] = [_timed(PREIMPORTS, penv) for _ in range(2)]
    result["qconv_runtime_import_s"] = _timed("import qconv.runtime.loader", penv)
    cold = (f"from qconv.runtime import from_pretrained; import torch; "
            f"from_pretrained({str(directory)!r}, device_map={device!r}, dtype=torch.bfloat16)")
    best = None
    for tag, e in (("as_is", env), ("pycache_prefix", penv)):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-P", "-X", "importtime", "-c", cold], env=e, capture_output=True, text=True)
        result[f"cold_qconv_load_s_{tag}"] = round(time.perf_counter() - t, 2)
        (out / f"importtime_{tag}.log").write_text(res.stderr)
        if res.returncode != 0:
            result[f"cold_qconv_load_error_{tag}"] = res.stderr[-800:]
            continue
        best = _parse_importtime(res.stderr)
    if pyc_prefix is None:
        subprocess.run(["rm", "-rf", str(prefix)], check=False)
    if best:
        result["importtime_total_s"] = round(sum(r["self_s"] for r in best), 2)
        result["importtime_top_cumulative"] = sorted(best, key=lambda r: -r["cumulative_s"])[:25]
        result["importtime_top_self"] = sorted(best, key=lambda r: -r["self_s"])[:25]
    return result


def _tiny_checkpoint() -> Path:
    base = Path("/tmp/qconv-profile-small")
    if not (base / "nf4").is_dir():
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--_generate", "--small", "--skip-bf16", "--dir", str(base)]
        subprocess.run(cmd, check=True)
    return base / "nf4"


def markdown(res: dict) -> str:
    lines = ["| step | wall s | step s | VmRSS MiB | d RSS MiB | VmHWM MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['wall_s']:.2f} | {r['step_s']:.3f} | {r['rss_mib']:.0f} | {r['d_rss_mib']:+.0f} | {r['hwm_mib']:.0f} |"
              for r in res["steps"]]
    lines += ["", "| load phase | t s | VmRSS MiB | VmHWM MiB |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['t_s']} | {p['rss_mib']:.0f} | {p['hwm_mib']:.0f} |" for p in res["load_phases"]]
    lines += ["", f"modules first imported by the load: {', '.join(res['new_top_level_modules']) or 'none'}",
              f"qconv peak over the pre-imported floor: {res['qconv_over_floor_mib']:.0f} MiB"]
    imp = res.get("imports")
    if imp:
        lines += ["", f"PYTHONDONTWRITEBYTECODE={imp['PYTHONDONTWRITEBYTECODE']}; package folders: "
                      + "; ".join(f"{k} writable={v.get('writable')} pyc={v.get('pyc_in_pycache')}" for k, v in imp["pycache"].items()
                                  if isinstance(v, dict))]
        lines += [f"stack imports as is: {imp['stack_import_s_as_is']} s; with PYTHONPYCACHEPREFIX: "
                      f"{imp['stack_import_s_pycache_prefix']} s; import qconv.runtime.loader: {imp['qconv_runtime_import_s']} s",
                  f"cold qconv load (imports inside) as is {imp.get('cold_qconv_load_s_as_is')} s, "
                  f"pyc warm {imp.get('cold_qconv_load_s_pycache_prefix')} s"]
        lines += ["", "| module (importtime, pyc warm) | cumulative s | self s |", "|---|---|---|"]
        lines += [f"| {r['module']} | {r['cumulative_s']:.3f} | {r['self_s']:.3f} |" for r in imp.get("importtime_top_cumulative", [])]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default: a generated tiny Llama)")
    ap.add_argument("--device", default="auto", help="auto (cuda:0 when present), cpu or cuda:N")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--no-imports", action="store_true", help="skip the import-time subprocess experiments")
    ap.add_argument("--pyc-prefix", type=Path, default=None,
                    help="bytecode cache folder for the experiments, kept afterwards (default: a temporary one)")
    args = ap.parse_args()
    steps = Steps()
    directory = args.dir
    if directory is None:
        directory = _tiny_checkpoint()
        steps.add("generate a tiny checkpoint (subprocess; not part of the profile)")
    res = profile(steps, directory, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_imports:
        res["imports"] = import_experiments(directory, res["device"], args.out, args.pyc_prefix)
    (args.out / "profile_load.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (args.out / "profile_load.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
