"""dequantize_nf4 against bitsandbytes' dequantize_4bit (bitwise in fp32) and a float64 reference.

On the CPU the Triton kernel runs under TRITON_INTERPRET=1 (scripts/test.sh sets it); the `gpu` tests
run the compiled kernel in bf16/fp16/fp32 against bitsandbytes on CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qconv.errors import QconvError  # noqa: E402
from qconv.kernels import nf4_dequantize as nf4  # noqa: E402
from qconv.kernels.utils import is_interpreter  # noqa: E402

# CPU tests run the Triton kernel through the interpreter; on a GPU machine the `gpu` tests cover it
needs_triton = pytest.mark.skipif(
    not is_interpreter(), reason="CPU tensors run the Triton kernel only with TRITON_INTERPRET=1 (scripts/test.sh)"
)

REFERENCE = nf4.dequantize_nf4_reference  # kept before `forbid_reference` replaces the module attribute
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two tensors of the same float dtype (+0 == -0)."""
    assert a.dtype == b.dtype
    bits = INT_VIEW[a.dtype]
    sign = torch.iinfo(bits).min

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i - sign), i)

    return (ordered(a) - ordered(b)).abs()


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit. On the CPU, its pure-PyTorch backend for shapes whose last dim is
    not a multiple of the blocksize: bitsandbytes 0.50.2's native CPU kernel indexes blocks per row
    there and returns wrong values (e.g. [2, 96] with blocksize 64); CUDA and the PyTorch backend use
    flat blocks, as the format does."""
    last = state.shape[-1]
    if packed.device.type == "cuda" or last % state.blocksize == 0:
        return bnb_functional.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), state.code,
                                    state.blocksize, state.shape, state.dtype)


def quantize(shape, blocksize=64, quant_type="nf4", double_quant=True, dtype=torch.float32,
             storage=torch.uint8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(dtype).to(device)
    packed, state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant, quant_storage=storage
    )
    return packed, state


def run_kernel(packed, state, out_dtype):
    """The Triton path with a NaN-poisoned output buffer: every element must be written."""
    out = torch.full(state.shape, float("nan"), dtype=out_dtype, device=packed.device)
    result = nf4.dequantize_nf4(packed, state, out_dtype, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert not torch.isnan(result).any(), "kernel left elements unwritten (or produced NaN)"
    return result


@pytest.fixture
def forbid_reference(monkeypatch):
    """Make sure the Triton kernel, not the PyTorch fallback, produced the result."""

    def boom(*a, **k):
        raise AssertionError("dequantize_nf4 fell back to the PyTorch reference")

    monkeypatch.setattr(nf4, "dequantize_nf4_reference", boom)


CASES = [
    # shape, blocksize, quant_type, double_quant
    ((64, 96), 64, "nf4", True),
    ((37, 53), 64, "nf4", True),  # numel odd and not a multiple of the blocksize
    ((129, 70), 32, "fp4", False),
    ((33, 200), 128, "fp4", True),
    ((300, 64), 256, "nf4", False),
    ((5, 999), 4096, "nf4", True),  # a single partial block
    ((1000,), 512, "fp4", True),
    ((3, 5, 7), 64, "nf4", False),  # 3-D weight shape, tiny
]


@needs_triton
@pytest.mark.parametrize("shape,blocksize,quant_type,double_quant", CASES)
def test_float32_bitwise_equal_to_bitsandbytes(shape, blocksize, quant_type, double_quant, forbid_reference):
    packed, state = quantize(shape, blocksize, quant_type, double_quant)
    expected = bnb_dequantize(packed, state)
    got = run_kernel(packed, state, torch.float32)
    assert got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@needs_triton
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_blocksize_matches_float64_reference(blocksize, forbid_reference):
    packed, state = quantize((24, 1000 + blocksize // 2), blocksize, "nf4", True, seed=blocksize)
    got = run_kernel(packed, state, torch.float32).double()
    exact = REFERENCE(packed, state, torch.float64, compute_dtype=torch.float64)
    # float32 compute: one rounding in the product (and two in the nested absmax)
    assert torch.allclose(got, exact, rtol=4 * 2**-24, atol=0)
    assert torch.equal(got.float(), bnb_dequantize(packed, state))


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_half_outputs_within_one_ulp(out_dtype, quant_type, forbid_reference):
    packed, state = quantize((45, 130), 64, quant_type, True, dtype=out_dtype)
    expected = bnb_dequantize(packed, state)
    assert expected.dtype == out_dtype
    got = run_kernel(packed, state, out_dtype)
    assert int(ulp_distance(got, expected).max()) <= 1
    # and within one ulp of the correctly rounded float32 value
    assert int(ulp_distance(got, REFERENCE(packed, state, torch.float32).to(out_dtype)).max()) <= 1


@needs_triton
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_quant_storage_other_than_uint8(storage, forbid_reference):
    packed, state = quantize((40, 128), 64, "nf4", True, storage=storage)
    assert packed.dtype == storage
    expected = bnb_dequantize(packed, state)
    got = run_kernel(packed, state, torch.float32)
    assert torch.equal(got, expected)


@needs_triton
@pytest.mark.parametrize("pair", [True, False])
@pytest.mark.parametrize("blocksize", [32, 256])
def test_both_table_variants_and_small_programs(pair, blocksize):
    """Both code-lookup variants, and programs of a few rows (many programs, a ragged last one)."""
    packed, state = quantize((50, 100), blocksize, "fp4", True)
    out = torch.full(state.shape, float("nan"))
    nf4._launch_dequantize(nf4._packed_bytes(packed, out.numel()), state, nf4._state_fields(state), out.view(-1),
                           bytes_per_program=max(1024, blocksize), num_warps=4, pair=pair)
    assert torch.equal(out, bnb_dequantize(packed, state))


@needs_triton
def test_default_dtype_is_the_state_dtype(forbid_reference):
    packed, state = quantize((16, 64), 64, "nf4", False, dtype=torch.float16)
    got = nf4.dequantize_nf4(packed, state)
    assert got.dtype == torch.float16 and got.shape == (16, 64)
    assert int(ulp_distance(got, bnb_dequantize(packed, state)).max()) <= 1


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setattr(nf4, "is_interpreter", lambda: False)
    packed, state = quantize((33, 70), 64, "fp4", True)
    assert torch.equal(nf4.dequantize_nf4(packed, state), bnb_dequantize(packed, state))


def test_bad_inputs_raise_qconv_error():
    packed, state = quantize((16, 64), 64, "nf4", True)
    with pytest.raises(QconvError, match="bytes"):
        nf4.dequantize_nf4(packed[:-1], state)
    with pytest.raises(QconvError, match="out_dtype"):
        nf4.dequantize_nf4(packed, state, torch.int8)
    state.blocksize = 48
    with pytest.raises(QconvError, match="blocksize"):
        nf4.dequantize_nf4(packed, state)
    state.blocksize, state.quant_type = 64, "int4"
    with pytest.raises(QconvError, match="quant_type"):
        nf4.dequantize_nf4(packed, state)


def test_public_names_are_functions_and_runtime_import_skips_triton():
    """qconv.kernels.<op> is the function even after its same-named file is imported; the runtime's import
    does not pull in triton (it is imported only when a model gets patched)."""
    code = "\n".join([
        "import importlib, sys, types",
        "import qconv.runtime",
        "assert 'triton' not in sys.modules, 'import qconv.runtime imported triton'",
        "import qconv.kernels as k",
        "for module in ('rms_norm', 'swiglu', 'cross_entropy', 'rope', 'nf4_dequantize', 'nf4_matmul'):",
        "    importlib.import_module('qconv.kernels.' + module)",
        "for name in k.__all__:",
        "    value = getattr(k, name)",
        "    assert callable(value) and not isinstance(value, types.ModuleType), (name, value)",
    ])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# GPU: the compiled kernel against bitsandbytes on CUDA
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((1024, 4096), 64), ((333, 777), 32), ((257, 1000), 4096), ((96, 4000), 256)])
def test_gpu_matches_bitsandbytes(dtype, quant_type, double_quant, shape, blocksize, forbid_reference):
    packed, state = quantize(shape, blocksize, quant_type, double_quant, dtype=dtype, device="cuda")
    expected = bnb_dequantize(packed, state)
    got = run_kernel(packed, state, dtype)
    if dtype == torch.float32 and quant_type == "nf4":
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    elif dtype == torch.float32:
        # bitsandbytes' CUDA FP4 kernel gives -0.0 for the negative-zero code (its CPU path and the
        # stored code table give +0.0): equal values, and bitwise equal wherever the value is not zero
        assert torch.equal(got, expected)
        nonzero = expected != 0
        assert torch.equal(got[nonzero].view(torch.int32), expected[nonzero].view(torch.int32))
    else:
        assert int(ulp_distance(got, expected).max()) <= 1
    exact = REFERENCE(packed, state, torch.float64, compute_dtype=torch.float64)
    tol = {torch.float32: 2**-22, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert torch.allclose(got.double(), exact, rtol=tol, atol=1e-6)
