"""The patch mechanism (registry, class swaps, RoPE dispatcher, loss) with stand-in kernels on the CPU.

The stand-ins are plain PyTorch versions of the qconv.kernels contracts, so these tests check the wiring,
not the kernels: patched logits/loss must match unpatched ones (float32, tolerance 1e-5), other models
must stay stock, and a model with no available kernels must be left untouched.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qconv import runtime
from qconv.runtime import patches
from qconv.runtime.patches import modules as patch_modules

CALLS: dict[str, int] = {}


def _count(name):
    CALLS[name] = CALLS.get(name, 0) + 1


def fake_rms_norm(x, weight, eps, offset=0.0):
    _count("rms_norm")
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def fake_swiglu(gate, up):
    _count("swiglu")
    return F.silu(gate) * up


def fake_geglu(gate, up, approximate="tanh"):
    _count("geglu")
    return F.gelu(gate, approximate=approximate) * up


def fake_apply_rope(q, k, cos, sin):
    _count("rope")
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def fake_cross_entropy(logits, labels, ignore_index=-100, softcap=None, reduction="mean"):
    _count("cross_entropy")
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


FAKES = {"rms_norm": fake_rms_norm, "swiglu": fake_swiglu, "geglu": fake_geglu, "rope": fake_apply_rope,
         "cross_entropy": fake_cross_entropy}


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(patches, "kernel", lambda op: FAKES[op])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # patches apply on the CPU only under the interpreter
    CALLS.clear()
    return CALLS


def _loss_and_logits(model, seed=0):
    ids = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.detach().clone()  # the cross-entropy kernel may reuse the logits' memory in backward
    out.loss.backward()
    return out.loss.detach(), logits


@pytest.mark.parametrize("arch,mlp_op", [("llama", "swiglu"), ("gemma2", "geglu")])
def test_patched_matches_stock(quantized_checkpoint_factory, fake_kernels, arch, mlp_op):
    directory = quantized_checkpoint_factory(arch)
    stock, _ = runtime.from_pretrained(directory, dtype=torch.float32, patch=False)
    model, _ = runtime.from_pretrained(directory, dtype=torch.float32, patch=True)
    assert model._qconv["patched"] == ["rms_norm", mlp_op, "rope", "cross_entropy"]
    assert stock._qconv["patched"] == []
    layer = model.model.layers[0]
    stock_layer = stock.model.layers[0]
    assert type(layer.mlp).__name__.startswith("Qconv") and isinstance(layer.mlp, type(stock_layer.mlp))
    assert type(stock_layer.mlp).__name__ == type(layer.mlp).__mro__[1].__name__  # the other model is stock
    assert set(model.state_dict()) == set(stock.state_dict())

    stock_loss, stock_logits = _loss_and_logits(stock)
    assert not CALLS, "an unpatched model must never reach a qconv kernel"
    loss, out = _loss_and_logits(model)
    assert CALLS["rms_norm"] > 0 and CALLS[mlp_op] == 2 and CALLS["rope"] == 2 and CALLS["cross_entropy"] == 1
    torch.testing.assert_close(out, stock_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-5)
    g, sg = model.model.norm.weight.grad, stock.model.norm.weight.grad
    assert g is not None and g.abs().sum() > 0
    torch.testing.assert_close(g, sg, rtol=1e-4, atol=1e-5)

    patch_modules.unpatch_model(model)
    assert type(model.model.layers[0].mlp) is type(stock_layer.mlp)
    CALLS.clear()
    torch.testing.assert_close(_loss_and_logits(model)[1], stock_logits, rtol=0, atol=0)
    assert not CALLS


def test_patches_reach_modules_behind_accelerate_hooks(quantized_checkpoint_factory, fake_kernels):
    """With device_map over several GPUs, accelerate wraps module forwards in hooks that call the forward bound
    at dispatch time; a class swap must retarget it, or the hooked module silently stays stock."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, _ = runtime.from_pretrained(quantized_checkpoint_factory("llama"), dtype=torch.float32, patch=False)
    norm = model.model.norm
    stock_forward = type(norm).forward
    add_hook_to_module(norm, ModelHook())
    ops = patches.apply_patches(model)
    assert "rms_norm" in ops and norm._old_forward.__func__ is type(norm).forward is not stock_forward
    x = torch.randn(2, 3, norm.weight.shape[0])
    CALLS.clear()
    y = norm(x)
    assert CALLS.get("rms_norm") == 1  # the hook ran the patched forward
    torch.testing.assert_close(y, fake_rms_norm(x, norm.weight, norm.variance_epsilon))
    patch_modules.unpatch_model(model)
    assert norm._old_forward.__func__ is stock_forward
    CALLS.clear()
    norm(x)
    assert not CALLS


def test_loss_honours_num_items_in_batch(fake_kernels):
    loss = patch_modules.causal_lm_loss(fake_cross_entropy)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, 4], [0, -100, -100, 6, 5]])
    from transformers.loss.loss_utils import ForCausalLMLoss

    for n in (None, torch.tensor(11)):
        torch.testing.assert_close(loss(logits, labels, 7, num_items_in_batch=n), ForCausalLMLoss(logits, labels, 7, num_items_in_batch=n))


def test_no_kernels_means_no_change(quantized_checkpoint_factory, monkeypatch):
    monkeypatch.setattr(patches, "kernel", lambda op: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, _ = runtime.from_pretrained(quantized_checkpoint_factory("llama"), patch=True)
    assert model._qconv["patched"] == []
    assert not any(type(m).__name__.startswith("Qconv") for m in model.modules())
    assert not hasattr(model, "_loss_function")


def test_registry_and_unknown_family():
    assert {"llama", "mistral", "qwen2", "gemma2"} <= set(patches.REGISTRY) | {
        t for t in ("llama", "mistral", "qwen2", "gemma2") if patches.patch_for(t)
    }
    assert patches.patch_for("gemma2").rms_norm_offset == 1.0
    assert patches.patch_for("bert") is None


def test_kernel_lookup_returns_the_public_kernel_functions():
    from qconv import kernels

    for op, name in patches.OPS.items():
        assert patches.kernel(op) is getattr(kernels, name), op


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_real_kernels_match_stock(quantized_checkpoint_factory, arch):
    """qconv.kernels under the Triton interpreter (CI sets TRITON_INTERPRET=1), all float32.

    Tolerances: logits and loss 1e-4 (abs and rel); gradients 1e-4 relative L2 error.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("run the CPU suite through scripts/test.sh (TRITON_INTERPRET=1)")
    directory = quantized_checkpoint_factory(arch, compute_dtype="float32")  # all float32: tight tolerances
    stock, _ = runtime.from_pretrained(directory, dtype=torch.float32, device_map="cpu", patch=False)
    model, _ = runtime.from_pretrained(directory, dtype=torch.float32, device_map="cpu", patch=True)
    mlp_op = "geglu" if arch == "gemma2" else "swiglu"
    assert model._qconv["patched"] == ["rms_norm", mlp_op, "rope", "cross_entropy"]
    stock_loss, stock_logits = _loss_and_logits(stock)
    loss, out = _loss_and_logits(model)
    torch.testing.assert_close(out, stock_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-4, atol=1e-4)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        g, sg = model.get_parameter(name).grad, stock.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
        rel = ((g - sg).norm() / sg.norm()).item()  # relative L2 error of the whole gradient
        assert rel < 1e-4, (name, rel)


def test_lora_step_with_checkpointing_and_first_calibration(quantized_checkpoint_factory, monkeypatch):
    """A patched model's first forward under non-reentrant activation checkpointing calibrates the gradient-reuse
    probe inside a checkpointed region; that once deadlocked (the probe's backward recomputed the layer, which
    re-entered the probe). Runs in a thread so a hang fails the test instead of stalling the suite."""
    import threading

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qconv.kernels import inplace

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("run the CPU suite through scripts/test.sh (TRITON_INTERPRET=1)")
    monkeypatch.setattr(inplace._Calibration, "exclusive", None)  # as in a fresh process
    model, _ = runtime.from_pretrained(quantized_checkpoint_factory("qwen2"), device_map="cpu", patch=True)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    peft_model.train()
    ids = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(0))
    result: dict = {}

    def step():
        try:
            out = peft_model(input_ids=ids, labels=ids)
            out.loss.backward()
            result["loss"] = out.loss.detach()
        except BaseException as exc:  # reported below
            result["error"] = exc

    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    worker.join(timeout=180)
    assert not worker.is_alive(), "forward/backward hung (calibration deadlock)"
    assert "error" not in result, result.get("error")
    assert torch.isfinite(result["loss"])
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
