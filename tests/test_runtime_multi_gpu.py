"""The runtime over two GPUs (``device_map`` "auto" / dict): marked ``gpu``, skipped with fewer than two.

The same tiny checkpoint loaded on one GPU is the reference: placement must not change a single logit
(same kernels, same kind of GPU), with qconv's Triton patches off and on (a kernel launched on the wrong
GPU's context fails or reads garbage, so the patched case is the one that checks device handling).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

SPLIT_BY_HAND = {"": 1, "model.embed_tokens": 0, "model.layers.0": 0}


def _ids(vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(0))


def _devices(model) -> set[int]:
    return {p.device.index for p in model.parameters()}


@pytest.mark.parametrize("patch", [False, True])
@pytest.mark.parametrize("device_map", ["auto", "by-hand"])
def test_two_gpus_give_the_one_gpu_logits(quantized_checkpoint_factory, device_map, patch):
    from qconv import runtime

    directory = quantized_checkpoint_factory("llama")
    one, _ = runtime.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda:0", patch=patch)
    two, _ = runtime.from_pretrained(directory, dtype=torch.bfloat16, patch=patch,
                                     device_map=SPLIT_BY_HAND if device_map == "by-hand" else device_map)
    assert _devices(two) == {0, 1}
    assert two.model.embed_tokens.weight.device.index == 0 and two.lm_head.weight.device.index == 1
    ids = _ids()
    with torch.no_grad():
        a = one(ids.cuda(0), labels=ids.cuda(0))
        b = two(ids.cuda(0), labels=ids.cuda(0))
    assert torch.isfinite(b.logits).all()
    torch.testing.assert_close(b.logits.to(a.logits.device), a.logits, rtol=0, atol=0)
    out_a = one.generate(ids[:1].cuda(0), max_new_tokens=6, do_sample=False)
    out_b = two.generate(ids[:1].cuda(0), max_new_tokens=6, do_sample=False)
    assert torch.equal(out_a.cpu(), out_b.cpu())


def test_two_gpus_lora_step_with_patches(quantized_checkpoint_factory):
    from peft import LoraConfig, get_peft_model

    from qconv import runtime

    grads = []
    for device_map in ("cuda:0", "auto"):
        model, _ = runtime.from_pretrained(quantized_checkpoint_factory("llama"), dtype=torch.bfloat16,
                                           device_map=device_map, patch=True)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      lora_dropout=0.0, init_lora_weights=False))
        ids = _ids().cuda(0)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float().cpu() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.isfinite(grads[1][name]).all()
        torch.testing.assert_close(grads[1][name], g, rtol=1e-2, atol=1e-3, msg=name)
