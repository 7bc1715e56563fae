"""The patch mechanism: per-instance class swaps whose ``forward`` calls a qconv kernel.

``patch_model`` replaces each target ``module.__class__`` by a subclass (``Qconv<Name>``) that overrides only
``forward``; parameters, buffers, names and ``isinstance`` stay as they were, other instances of the
class (an unpatched model) are untouched, and :func:`unpatch_model` restores the original classes.
RoPE is applied by a module-level function of each modeling file, so a transparent dispatcher is put in
its place once: it calls our kernel only while a patched attention module is running (a context
variable set by that module's forward, also during gradient-checkpoint recomputation), and the
original function otherwise.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import types
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qconv.runtime.patches import FamilyPatch

logger = logging.getLogger(__name__)

_ROPE_KERNEL: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("qconv_rope_kernel", default=None)
_ACTIVATION_OPS = {"silu": ("swiglu", {}), "swish": ("swiglu", {}), "gelu_pytorch_tanh": ("geglu", {"approximate": "tanh"})}


def patched_class(cls: type, tag: str, make_forward: Callable[[type], Callable]) -> type:
    """A subclass of ``cls`` (``Qconv<Name>``) whose ``forward`` is ``make_forward(cls)``."""
    return type(f"Qconv{cls.__name__}", (cls,), {"forward": make_forward(cls), "_qconv_patch": tag, "__module__": __name__})


def set_module_class(module: "torch.nn.Module", cls: type) -> None:
    """Swap ``module``'s class, keeping an accelerate hook (``device_map`` over several devices) pointed at the
    new ``forward``: the hook calls ``module._old_forward``, the forward bound when the hook was added, which
    would otherwise keep running the old class's code."""
    previous = type(module)
    module.__class__ = cls
    old = module.__dict__.get("_old_forward")
    if old is not None and getattr(old, "__func__", None) is previous.forward:
        module._old_forward = types.MethodType(cls.forward, module)


def unpatch_model(model: "torch.nn.Module") -> None:
    """Undo :func:`patch_model` (module classes and the loss); the RoPE dispatcher stays, inert."""
    for module in model.modules():
        if getattr(type(module), "_qconv_patch", None):
            set_module_class(module, type(module).__mro__[1])
    if getattr(model, "_qconv_loss", False):
        del model._loss_function
        model._qconv_loss = False


def _rms_norm(fn: Callable, eps_attr: str, offset: float) -> Callable[[type], Callable]:
    def make(cls: type) -> Callable:
        def forward(self, hidden_states):
            return fn(hidden_states, self.weight, getattr(self, eps_attr), offset=offset)

        return forward

    return make


def _gated_mlp(fn: Callable, kwargs: dict[str, Any]) -> Callable[[type], Callable]:
    def make(cls: type) -> Callable:
        def forward(self, x):
            return self.down_proj(fn(self.gate_proj(x), self.up_proj(x), **kwargs))

        return forward

    return make


def _rope_attention(fn: Callable) -> Callable[[type], Callable]:
    def make(cls: type) -> Callable:
        original = cls.forward

        def forward(self, *args, **kwargs):
            token = _ROPE_KERNEL.set(fn)
            try:
                return original(self, *args, **kwargs)
            finally:
                _ROPE_KERNEL.reset(token)

        return forward

    return make


def install_rope_dispatch(modeling_module: Any) -> bool:
    """Put the context-dependent ``apply_rotary_pos_emb`` into ``modeling_module`` (once); False if absent."""
    original = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "_qconv_dispatch", False):
        return True

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        fn = _ROPE_KERNEL.get()
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if fn is None or unsqueeze_dim != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"}:
            return original(q, k, cos, sin, *args, **kwargs)
        return fn(q, k, cos, sin)

    apply_rotary_pos_emb._qconv_dispatch = True
    modeling_module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def causal_lm_loss(fn: Callable) -> Callable:
    """transformers' ``ForCausalLMLoss`` contract (shift, ignore_index, num_items_in_batch) over ``fn``."""

    def loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100, shift_labels=None, **kwargs):
        import torch.nn.functional as F

        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        logits = logits.reshape(-1, vocab_size)
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        if num_items_in_batch is None:
            return fn(logits, shift_labels, ignore_index=ignore_index)
        total = fn(logits, shift_labels, ignore_index=ignore_index, reduction="sum")
        if hasattr(num_items_in_batch, "to"):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    return loss


def patch_model(model: "torch.nn.Module", family: "FamilyPatch", kernel: Callable[[str], Callable | None]) -> list[str]:
    """Swap in every available kernel for ``family``; return the ops patched."""
    modeling = importlib.import_module(family.modeling_module)
    swaps: dict[type, tuple[str, Callable[[type], Callable]]] = {}
    ops: list[str] = []
    if family.rms_norm and (fn := kernel("rms_norm")):
        swaps[getattr(modeling, family.rms_norm)] = ("rms_norm", _rms_norm(fn, family.rms_norm_eps_attr, family.rms_norm_offset))
        ops.append("rms_norm")
    if family.mlp:
        act = getattr(model.config, family.activation_attr, None)
        op, kwargs = _ACTIVATION_OPS.get(act, (None, {}))
        if op and (fn := kernel(op)):
            swaps[getattr(modeling, family.mlp)] = (op, _gated_mlp(fn, kwargs))
            ops.append(op)
    if family.attention and (fn := kernel("rope")) and install_rope_dispatch(modeling):
        swaps[getattr(modeling, family.attention)] = ("rope", _rope_attention(fn))
        ops.append("rope")
    subclasses = {cls: patched_class(cls, tag, make) for cls, (tag, make) in swaps.items()}
    for module in model.modules():
        sub = subclasses.get(type(module))
        if sub is not None:
            set_module_class(module, sub)
    if family.cross_entropy and (fn := kernel("cross_entropy")):
        model.loss_function = causal_lm_loss(fn)
        model._qconv_loss = True
        ops.append("cross_entropy")
    logger.info("qconv patches for %s: %s", model.config.model_type, ", ".join(ops) or "none (kernels not available)")
    return ops
