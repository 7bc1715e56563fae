"""Where each tensor goes: parse ``device_map`` and ``dtype``, split decoder layers over several GPUs.

A plan maps module-name prefixes to devices (``{"": "cuda:0"}`` for one device). Names come from the
checkpoint, so the plan is known before the model skeleton exists and reading can start early.
Multi-GPU plans assign whole decoder layers (``...layers.<i>``): ``"auto"``/``"balanced"`` split them in
contiguous, equally sized groups; ``"sequential"`` fills each GPU up to its free memory in order.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from qconv.errors import QconvError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LAYER_RE = re.compile(r"^(?P<block>.*?\.(?:layers|h|blocks)\.\d+)\.")
_SPLIT_MODES = ("auto", "balanced", "sequential")


def resolve_dtype(dtype: Any, device: "torch.device") -> "torch.dtype":
    """``None`` -> bfloat16 where the GPU supports it, else float16; float32 on the CPU. Strings accepted."""
    import torch

    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise QconvError(f"dtype: unknown dtype {dtype!r} (use bfloat16, float16 or float32)")
        dtype = value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QconvError(f"dtype: {dtype!r} is not a floating-point torch dtype")
    return dtype


def to_device(value: Any, option: str = "device_map") -> "torch.device":
    """Parse one device value (``"cpu"``, ``"cuda:1"``, ``1``, ``torch.device``) and check that it exists."""
    import torch

    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"
    if isinstance(value, str) and value.isdigit():
        value = f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise QconvError(f"{option}: {value!r} is not a device (use 'cpu', 'cuda:0', an index, 'auto' or a dict)") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.cuda.current_device() if device.index is None and count else (device.index or 0)
        if index >= count:
            raise QconvError(
                f"{option}: {value!r} names a GPU that does not exist ({count} CUDA device(s) visible)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise QconvError(f"{option}: device type {device.type!r} is not supported (use CPU or CUDA devices)")
    return device


def layer_block(name: str) -> str | None:
    """The decoder-layer module a tensor belongs to (``model.layers.3``), or None."""
    m = LAYER_RE.match(name)
    return m.group("block") if m else None


def split_layers(sizes: list[int], capacities: list[int], mode: str) -> list[int]:
    """Assign each layer (by byte size, in order) to a GPU index; contiguous groups, never out of order.

    ``balanced``/``auto``: groups of about ``total / n_gpus`` bytes. ``sequential``: fill GPU 0 up to its
    capacity, then GPU 1, ... A plan that does not fit raises :class:`QconvError`.
    """
    n = len(capacities)
    if n == 0:
        raise QconvError("device_map: no GPU to place the model on")
    if sum(sizes) > sum(capacities):
        raise QconvError(
            f"device_map={mode!r}: the model needs {sum(sizes) / 2**30:.2f} GiB but the GPUs have "
            f"{sum(capacities) / 2**30:.2f} GiB free"
        )
    out: list[int] = []
    gpu, used = 0, 0
    target = sum(sizes) / n
    for size in sizes:
        limit = capacities[gpu] if mode == "sequential" else min(capacities[gpu], target * 1.0001)
        if used + size > limit and used > 0 and gpu < n - 1:
            gpu, used = gpu + 1, 0
        if used + size > capacities[gpu]:
            raise QconvError(f"device_map={mode!r}: a layer does not fit on GPU {gpu}")
        out.append(gpu)
        used += size
    return out


class DevicePlan:
    """Module-name prefix -> device; the longest matching prefix wins (``""`` matches everything)."""

    def __init__(self, mapping: Mapping[str, "torch.device"]):
        self.mapping = dict(mapping)
        self._prefixes = sorted(self.mapping, key=len, reverse=True)

    def device_of(self, name: str) -> "torch.device":
        for prefix in self._prefixes:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return self.mapping[prefix]
        raise QconvError(f"device_map: no entry covers {name!r} (add it, or a parent module, or '')")

    @property
    def devices(self) -> list["torch.device"]:
        return sorted(set(self.mapping.values()), key=str)

    @property
    def main_device(self) -> "torch.device":
        return self.device_of("") if "" in self.mapping else self.devices[0]

    def hf_device_map(self) -> dict[str, Any]:
        """The form transformers/accelerate use (``model.hf_device_map``): index for GPUs, "cpu" for the CPU."""
        return {k: (d.index if d.type == "cuda" else d.type) for k, d in self.mapping.items()}


def resolve_device_map(
    device_map: Any,
    tensor_sizes: Mapping[str, int],
    *,
    tied_embeddings: bool = False,
    reserve_bytes: int = 2 << 30,
) -> DevicePlan:
    """Turn the user's ``device_map`` into a :class:`DevicePlan` for the checkpoint's tensors."""
    import torch

    if device_map is None:
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, Mapping):
        if not device_map:
            raise QconvError("device_map: empty dict")
        plan = DevicePlan({str(k): to_device(v) for k, v in device_map.items()})
        for name in tensor_sizes:
            plan.device_of(name)  # every tensor must be covered
        return plan
    if isinstance(device_map, str) and device_map in _SPLIT_MODES:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return DevicePlan({"": torch.device("cpu")})
        if count == 1:
            return DevicePlan({"": torch.device("cuda", 0)})
        free = [torch.cuda.mem_get_info(i)[0] - reserve_bytes for i in range(count)]
        return _split_plan(tensor_sizes, free, device_map, tied_embeddings)
    return DevicePlan({"": to_device(device_map)})


def _split_plan(sizes: Mapping[str, int], free: list[int], mode: str, tied: bool) -> DevicePlan:
    import torch

    blocks: dict[str, int] = {}
    for name, n in sizes.items():
        block = layer_block(name)
        if block is not None:
            blocks[block] = blocks.get(block, 0) + n
    order = sorted(blocks, key=lambda b: int(b.rsplit(".", 1)[1]))
    other = sum(sizes.values()) - sum(blocks.values())
    capacities = list(free)
    capacities[0] -= other // 2  # embeddings (and a tied head) live with the first layers
    capacities[-1] -= other - other // 2
    gpus = split_layers([blocks[b] for b in order], capacities, mode)
    first, last = torch.device("cuda", gpus[0] if gpus else 0), torch.device("cuda", gpus[-1] if gpus else 0)
    mapping: dict[str, torch.device] = {"": last}
    for name in _non_layer_modules(sizes):
        is_input_side = "embed" in name or name.endswith((".wte", ".wpe")) or (tied and "lm_head" in name)
        mapping[name] = first if is_input_side else last
    for block, gpu in zip(order, gpus):
        mapping[block] = torch.device("cuda", gpu)
    return DevicePlan(mapping)


def _non_layer_modules(names: Iterable[str]) -> set[str]:
    """Module names (weight name minus its last parts) of tensors outside the decoder layers."""
    out = set()
    for name in names:
        if layer_block(name) is None:
            module = name.split(".weight")[0].split(".bias")[0]
            out.add(module)
    return out


def covering_map(model: Any, device_of) -> dict[str, Any]:
    """The smallest ``{module name: device}`` covering every parameter and buffer of ``model``, without ``""``
    unless everything is on one device: the form ``accelerate.dispatch_model`` hooks module by module."""

    def devices(prefix: str, module: Any) -> set:
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
        return {device_of(f"{prefix}.{n}" if prefix else n) for n in names}

    out: dict[str, Any] = {}

    def walk(prefix: str, module: Any) -> None:
        found = devices(prefix, module)
        if len(found) <= 1:
            if found:
                out[prefix] = found.pop()
            return
        own = [n for n, _ in module.named_parameters(recurse=False, remove_duplicate=False)]
        own += [n for n, _ in module.named_buffers(recurse=False, remove_duplicate=False)]
        for n in own:
            full = f"{prefix}.{n}" if prefix else n
            out[full] = device_of(full)
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out

