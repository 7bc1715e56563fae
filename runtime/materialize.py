"""Put loaded tensors into the meta skeleton, then finish the model the way transformers does.

Quantized weights become ``Params4bit`` built from the stored tensors (no quantization at load time);
other tensors are cast to the skeleton's dtype (or a keep-in-fp32 rule). Missing parameters and the
non-persistent buffers (RoPE ``inv_freq`` ...) are materialised on their device and initialised by the
model's own ``initialize_weights`` (loaded tensors carry ``_is_hf_initialized`` so they are skipped),
and tied weights are tied last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from qconv import format as fmt
from qconv.errors import QconvError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


@dataclass
class FillReport:
    loaded: int = 0
    quantized: int = 0
    missing: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)


def _set_tensor(modules: Mapping[str, "torch.nn.Module"], name: str, value: "torch.Tensor", *, is_param: bool) -> "torch.Tensor":
    import torch

    module_name, _, attr = name.rpartition(".")
    module = modules[module_name]
    if is_param:
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value
    return value


def fill_model(
    model: "torch.nn.Module",
    tensors: Mapping[str, "torch.Tensor"],
    quantized: Mapping[str, str],
    device_of: Callable[[str], "torch.device"],
    dtype_rules: list,
) -> FillReport:
    """Load ``tensors`` (typed, already on their devices) into ``model``; return what was missing/unexpected."""
    import torch
    from bitsandbytes.nn import Params4bit

    report = FillReport()
    modules = dict(model.named_modules(remove_duplicate=False))  # "" is the model itself
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    expected = set(model.state_dict(keep_vars=True).keys())
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
    used: set[str] = set()

    for name in sorted(expected):
        if name in quantized:
            module = modules[name.removesuffix(".weight")]
            stats = {
                suffix: tensors[f"{name}.{suffix}"]
                for suffix in fmt.state_suffixes(quantized[name], double_quant=True)
                if f"{name}.{suffix}" in tensors
            }
            used.update(f"{name}.{k}" for k in stats)
            data = tensors[name]
            param = Params4bit.from_prequantized(data=data, quantized_stats=stats, requires_grad=False, device=data.device, module=module)
            param._is_hf_initialized = True
            module._parameters["weight"] = param
            used.add(name)
            report.quantized += 1
            continue
        if name not in tensors:
            report.missing.add(name)
            continue
        ref = params.get(name, buffers.get(name))
        value = tensors[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise QconvError(f"tensor {name}: checkpoint shape {tuple(value.shape)} but the model expects {tuple(ref.shape)}")
        if value.is_floating_point():
            target = next((d for pattern, d in dtype_rules if pattern.search(name)), ref.dtype)
            value = value.to(target)
        _set_tensor(modules, name, value, is_param=name in params)._is_hf_initialized = True
        used.add(name)
        report.loaded += 1

    report.unexpected = set(tensors) - used
    # tied targets stay on meta: they are tied below; everything else missing is materialised and initialised
    for name in sorted(report.missing - tied_targets):
        ref = params.get(name, buffers.get(name))
        _set_tensor(modules, name, torch.empty_like(ref, device=device_of(name)), is_param=name in params)
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            _set_tensor(modules, name, torch.empty_like(buf, device=device_of(name)), is_param=False)
    for name in tied_targets:
        try:
            model.get_parameter(name)._is_hf_initialized = True
        except AttributeError:
            pass
    model.initialize_weights()
    model.tie_weights(missing_keys=report.missing, recompute_mapping=False)
    leftovers = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise QconvError(f"parameters left without data after loading: {', '.join(leftovers[:5])}")
    return report
