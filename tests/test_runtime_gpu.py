"""The runtime on a CUDA device (marked ``gpu``: skipped without one).

Also runnable as a plain script (``python tests/test_runtime_gpu.py``) where pytest is not installed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _transformers(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda:0")


def _ids(vocab=384):
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_logits_equal_transformers(quantized_checkpoint_factory, arch):
    from qconv import runtime

    directory = quantized_checkpoint_factory(arch, source_kw={"odd_shapes": arch == "llama"}, max_shard_size="40KB")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, tok = runtime.from_pretrained(directory, dtype=torch.bfloat16, patch=False)
    stored = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
    assert torch.cuda.max_memory_allocated() - before <= stored + (80 << 20)  # no second copy on the GPU
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
    ref = _transformers(directory)
    with torch.no_grad():
        a, b = model(_ids()).logits, ref(_ids()).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), (a - b).abs().max()


def test_gpu_ring_uploader_byte_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    from qconv.runtime.shard_reader import RingUploader, as_typed
    from qconv.safetensors_header import read_header

    tensors = {f"t{i}": torch.randn(1000 + 37 * i, dtype=torch.bfloat16) for i in range(20)}
    tensors["u8"] = torch.randint(0, 255, (4099,), dtype=torch.uint8)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    dests = {n: torch.empty(e.nbytes, dtype=torch.uint8, device="cuda") for n, e in header.tensors.items()}
    uploader = RingUploader({path: [(header.tensors[n], d) for n, d in dests.items()]}, threads=3, buffers=2, chunk_bytes=777)
    assert uploader._ring._registered and uploader._ring.buffers[0].is_pinned()  # page-locked: truly async copies
    uploader.wait()
    assert uploader._ring._map is None and not uploader._ring._registered  # unpinned and unmapped after the read
    ref = load_file(str(path))
    for n, raw in dests.items():
        assert torch.equal(as_typed(header.tensors[n], raw).cpu(), ref[n]), n


def test_gpu_lora_step(quantized_checkpoint_factory):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qconv import runtime

    model, _ = runtime.from_pretrained(quantized_checkpoint_factory("qwen2"), patch=True)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    peft_model.train()
    ids = _ids()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_gpu_patched_close_to_stock(quantized_checkpoint_factory, arch):
    """With the kernels that exist swapped in, logits stay within bf16 noise of the stock model."""
    from qconv import runtime

    directory = quantized_checkpoint_factory(arch)
    stock, _ = runtime.from_pretrained(directory, patch=False)
    patched, _ = runtime.from_pretrained(directory, patch=True)
    ids = _ids()
    with torch.no_grad():
        a, b = stock(ids, labels=ids), patched(ids, labels=ids)
    assert torch.isfinite(b.logits).all()
    # bf16 activations through 2 layers: kernels may round differently from eager PyTorch
    torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(b.loss, a.loss, rtol=0.01, atol=0.01)


def _main() -> int:
    """Plain-script mode: the same checks with a local checkpoint factory."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_checkpoint, make_quantized_checkpoint

    root = Path(tempfile.mkdtemp(prefix="qconv-gpu-tests-"))
    cache: dict = {}

    def factory(arch="llama", source_kw=None, **kw):
        key = (arch, tuple(sorted((source_kw or {}).items())), tuple(sorted(kw.items())))
        if key not in cache:
            n = len(cache)
            src = make_checkpoint(root / f"src{n}", arch, **(source_kw or {}))
            cache[key] = make_quantized_checkpoint(src, root / f"bnb{n}", **kw)
        return cache[key]

    checks = [(test_gpu_logits_equal_transformers, {"arch": a}) for a in ("llama", "gemma2")]
    checks += [(test_gpu_ring_uploader_byte_exact, {}), (test_gpu_lora_step, {})]
    checks += [(test_gpu_patched_close_to_stock, {"arch": a}) for a in ("llama", "mistral", "qwen2", "gemma2")]
    failed = 0
    for fn, kw in checks:
        args = {"tmp_path": Path(tempfile.mkdtemp(dir=root))} if "tmp_path" in fn.__code__.co_varnames else {}
        if "quantized_checkpoint_factory" in fn.__code__.co_varnames:
            args["quantized_checkpoint_factory"] = factory
        try:
            fn(**args, **kw)
            print(f"PASS {fn.__name__} {kw}")
        except Exception as exc:  # report all, fail at the end
            failed += 1
            print(f"FAIL {fn.__name__} {kw}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
