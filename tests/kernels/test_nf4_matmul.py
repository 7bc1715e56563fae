"""matmul_nf4 (fused GEMV, dequantize + matmul) against float64 references and autograd.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (scripts/test.sh sets it).
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qconv.errors import QconvError  # noqa: E402
from qconv.kernels import nf4_dequantize, nf4_gemv, nf4_matmul  # noqa: E402
from qconv.kernels.utils import is_interpreter  # noqa: E402

# CPU tests run the Triton kernels through the interpreter; on a GPU machine the `gpu` tests cover them
needs_triton = pytest.mark.skipif(
    not is_interpreter(), reason="CPU tensors run the Triton kernels only with TRITON_INTERPRET=1 (scripts/test.sh)"
)


def quantize(n_out, n_in, blocksize=64, quant_type="nf4", double_quant=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g).to(device)
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def exact_weight(packed, state) -> torch.Tensor:
    """The dequantized weight in float64 (float32 products, as the format defines them, upcast)."""
    return nf4_dequantize.dequantize_nf4_reference(packed, state, torch.float32).double()


def reference(x, packed, state, bias=None) -> torch.Tensor:
    y = x.double() @ exact_weight(packed, state).t()
    return y + bias.double() if bias is not None else y


def assert_close_to_reference(y, ref, x, packed, state, rel):
    """|y - ref| <= rel * (|x| @ |W|^T): the error bound of a dot product, scaled per output."""
    assert not torch.isnan(y).any()
    scale = x.double().abs() @ exact_weight(packed, state).abs().t() + 1e-30
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"


CASES = [
    # n_out, n_in, blocksize, quant_type, double_quant, leading shape of x
    (96, 256, 64, "nf4", True, (1,)),  # GEMV
    (70, 512, 128, "fp4", False, (1, 1)),  # GEMV, N not a multiple of the block of rows
    (40, 8192, 4096, "nf4", True, ()),  # GEMV, 1-D x, 2 blocks per row
    (96, 256, 64, "nf4", True, (3,)),  # GEMV, several rows
    (33, 128, 32, "fp4", True, (2, 2)),  # GEMV, 3-D x with 4 rows
    (33, 128, 32, "fp4", True, (2, 3)),  # more rows than the GEMV path takes
    (48, 200, 64, "nf4", True, (1,)),  # K not a multiple of the blocksize: dequantize + matmul
    (64, 256, 64, "nf4", False, (20,)),  # many rows: dequantize + matmul
]


@needs_triton
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("n_out,n_in,blocksize,quant_type,double_quant,lead", CASES)
def test_forward_float32(n_out, n_in, blocksize, quant_type, double_quant, lead, with_bias):
    packed, state = quantize(n_out, n_in, blocksize, quant_type, double_quant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, n_in, generator=g)
    bias = torch.randn(n_out, generator=g) if with_bias else None
    y = nf4_matmul.matmul_nf4(x, packed, state, bias)
    assert y.shape == (*lead, n_out) and y.dtype == torch.float32
    assert_close_to_reference(y, reference(x, packed, state, bias), x, packed, state, rel=1e-5)


@needs_triton
@pytest.mark.parametrize("even_odd", [True, False])
@pytest.mark.parametrize("pair", [True, False])
@pytest.mark.parametrize("rows,rows_per_program", [(1, 1), (3, 2), (5, 4)])
def test_gemv_variants_write_every_output(rows, rows_per_program, pair, even_odd):
    """Every kernel variant, several features per step, rows split over programs, a ragged last block."""
    packed, state = quantize(80, 256, 64, "nf4", True)
    f = nf4_dequantize._state_fields(state)
    data = nf4_dequantize._packed_bytes(packed, f["numel"])
    x = torch.randn(rows, 256)
    bias = torch.randn(80)
    out = torch.full((rows, 80), float("nan"))
    nf4_matmul._gemv(x, data, state, f, bias, block_n=32, step_bytes=64, pair=pair, even_odd=even_odd,
                     rows=rows_per_program, out=out)
    assert_close_to_reference(out, reference(x, packed, state, bias), x, packed, state, rel=1e-5)


@needs_triton
def test_gemv_bf16_x_not_4_byte_aligned():
    """bf16 x at an odd element offset (not 4-byte aligned) through the GEMV path."""
    packed, state = quantize(24, 128, 64, "nf4", False)
    x = torch.randn(1, 129).to(torch.bfloat16)[:, 1:]
    assert x.data_ptr() % 4 == 2
    y = nf4_matmul.matmul_nf4(x, packed, state)
    assert_close_to_reference(y, reference(x, packed, state), x, packed, state, rel=1e-2)


@needs_triton
def test_dispatch_uses_the_gemv_kernels_for_few_rows(monkeypatch):
    """One row takes the rows kernel, up to GEMV_MAX_ROWS the tile kernel; more rows dequantize the weight."""
    packed, state = quantize(32, 128, 64, "nf4", True)
    calls = []
    dequantize, tile, rows = nf4_matmul.dequantize_nf4, nf4_matmul._gemv, nf4_matmul._GemvPlan.rows
    monkeypatch.setattr(nf4_matmul, "dequantize_nf4", lambda *a, **k: calls.append("dequantize") or dequantize(*a, **k))
    monkeypatch.setattr(nf4_matmul, "_gemv", lambda *a, **k: calls.append("tile") or tile(*a, **k))
    monkeypatch.setattr(nf4_matmul._GemvPlan, "rows", lambda *a, **k: calls.append("rows") or rows(*a, **k))
    for n_rows in (1, nf4_matmul.GEMV_MAX_ROWS, nf4_matmul.GEMV_MAX_ROWS + 1):
        nf4_matmul.matmul_nf4(torch.randn(n_rows, 128), packed, state)
    assert calls == ["rows", "tile", "dequantize"]


@needs_triton
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("n_out,n_in,blocksize,quant_type,double_quant", [
    (45, 256, 64, "nf4", True),  # N not a multiple of the rows per step
    (20, 448, 32, "fp4", False),  # K/32 not a power of two (masked chunks), plain absmax
])
def test_rows_kernel_gather_path_writes_every_output(n_out, n_in, blocksize, quant_type, double_quant, r, early):
    """The rows kernel (gather lookup, as on the CPU) over rows per step, with/without EARLY, ragged shapes."""
    packed, state = quantize(n_out, n_in, blocksize, quant_type, double_quant)
    f = nf4_dequantize._state_fields(state)
    words = nf4_dequantize._packed_bytes(packed, f["numel"]).view(torch.int32)
    args = nf4_dequantize.state_tensors(state, f, torch.device("cpu"), False)
    x, bias = torch.randn(n_in), torch.randn(n_out)
    out = torch.full((n_out,), float("nan"))
    nf4_gemv.gemv_rows(x, words, args, None, f, bias, out, r=r, early=early)
    ref = reference(x[None], packed, state, bias)
    assert_close_to_reference(out[None], ref, x[None], packed, state, rel=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_planes_hold_the_float16_code(quant_type):
    """The 8 byte-plane words rebuild the float16 code; a code float16 cannot hold gets None (gather path)."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu")
    planes = [p & 0xFFFFFFFF for p in nf4_gemv.code_planes(code)]
    low = [(planes[j // 4] >> (8 * (j % 4))) & 0xFF for j in range(16)]
    high = [(planes[4 + j // 4] >> (8 * (j % 4))) & 0xFF for j in range(16)]
    bits = torch.tensor([lo | (hi << 8) for lo, hi in zip(low, high)], dtype=torch.int32)
    rebuilt = bits.to(torch.int16).view(torch.float16)
    assert torch.equal(rebuilt, code.half())
    assert nf4_gemv.code_planes(code * 1e6) is None and nf4_gemv.code_planes(code * 1e-7) is None


@needs_triton
def test_plan_is_cached_per_weight_and_rebuilt_for_another():
    packed, state = quantize(32, 128, 64, "nf4", True)
    x = torch.randn(1, 128)
    y1 = nf4_matmul.matmul_nf4(x, packed, state)
    plan = state._qconv_gemv_plan
    assert torch.equal(nf4_matmul.matmul_nf4(x, packed, state), y1) and state._qconv_gemv_plan is plan
    packed2, state2 = quantize(32, 128, 64, "nf4", True, seed=5)
    # the same state object with another weight's tensors: a new plan
    state.absmax, state.state2, state.offset, packed = state2.absmax, state2.state2, state2.offset, packed2
    y2 = nf4_matmul.matmul_nf4(x, packed, state)
    assert state._qconv_gemv_plan is not plan
    assert_close_to_reference(y2, reference(x, packed2, state2), x, packed2, state2, rel=1e-5)


@needs_triton
@pytest.mark.parametrize("lead", [(1,), (3, 4), (24,)])
def test_gradients_match_autograd_on_the_dequantized_weight(lead):
    packed, state = quantize(48, 128, 64, "nf4", True)
    w = exact_weight(packed, state).float()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, 128, generator=g, requires_grad=True)
    bias = torch.randn(48, generator=g, requires_grad=True)
    dy = torch.randn(*lead, 48, generator=g)
    y = nf4_matmul.matmul_nf4(x, packed, state, bias)
    dx, db = torch.autograd.grad(y, (x, bias), dy)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    dx_ref, db_ref = torch.autograd.grad(x_ref @ w.t() + b_ref, (x_ref, b_ref), dy)
    assert not torch.isnan(dx).any()
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    packed, state = quantize(12, 64, 32, "fp4", True)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nf4_matmul.matmul_nf4(a, packed, state, b), (x, bias), fast_mode=True)


def test_weight_gets_no_gradient():
    packed, state = quantize(16, 64, 64, "nf4", True)
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    nf4_matmul.matmul_nf4(x, packed, state).sum().backward()
    assert x.grad is not None and packed.grad is None


def test_bad_inputs_raise_qconv_error():
    packed, state = quantize(16, 64, 64, "nf4", True)
    with pytest.raises(QconvError, match="features"):
        nf4_matmul.matmul_nf4(torch.randn(2, 32), packed, state)
    with pytest.raises(QconvError, match="bias"):
        nf4_matmul.matmul_nf4(torch.randn(2, 64), packed, state, torch.randn(5))


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels in bf16/fp16/fp32, and bitsandbytes' own 4-bit matmul as a second opinion
# --------------------------------------------------------------------------------------------------
GPU_REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16, 300])
@pytest.mark.parametrize("shape,blocksize,quant_type", [((4096, 1024), 64, "nf4"), ((1000, 2048), 128, "fp4"),
                                                         ((512, 8192), 4096, "nf4"), ((300, 1000), 64, "nf4")])
def test_gpu_forward(dtype, rows, shape, blocksize, quant_type):
    packed, state = quantize(*shape, blocksize, quant_type, True, device="cuda")
    x = torch.randn(rows, shape[1], device="cuda").to(dtype)
    bias = torch.randn(shape[0], device="cuda").to(dtype)
    y = nf4_matmul.matmul_nf4(x, packed, state, bias)
    assert y.dtype == dtype
    assert_close_to_reference(y, reference(x, packed, state, bias), x, packed, state, rel=GPU_REL[dtype])
    if rows == 1:  # bitsandbytes' GEMV (same math, another accumulation order)
        y_bnb = bnb.matmul_4bit(x, packed.t(), state, bias=bias)
        assert_close_to_reference(y_bnb, reference(x, packed, state, bias), x, packed, state, rel=GPU_REL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gradients(dtype):
    packed, state = quantize(2048, 1024, 64, "nf4", True, device="cuda")
    w = exact_weight(packed, state)
    x = torch.randn(4, 64, 1024, device="cuda").to(dtype).requires_grad_(True)
    dy = torch.randn(4, 64, 2048, device="cuda").to(dtype)
    (dx,) = torch.autograd.grad(nf4_matmul.matmul_nf4(x, packed, state), (x,), dy)
    dx_ref = dy.double() @ w
    scale = dy.double().abs() @ w.abs()
    assert not torch.isnan(dx).any()
    assert ((dx.double() - dx_ref).abs() / scale).max().item() <= GPU_REL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize,quant_type", [((1000, 4096), 64, "nf4"), ((300, 14336), 128, "fp4"),
                                                         ((64, 8192), 4096, "nf4")])
def test_gpu_rows_kernel_asm_and_gather_lookups(dtype, shape, blocksize, quant_type):
    """The rows kernel: register (prmt) lookup with float16-pair or float32 sums, L1-gather lookup; EARLY or not."""
    packed, state = quantize(*shape, blocksize, quant_type, True, device="cuda")
    f = nf4_dequantize._state_fields(state)
    words = nf4_dequantize._packed_bytes(packed, f["numel"]).view(torch.int32)
    args = nf4_dequantize.state_tensors(state, f, packed.device, False)
    planes = nf4_gemv.code_planes(state.code)
    x = torch.randn(shape[1], device="cuda").to(dtype)
    bias = torch.randn(shape[0], device="cuda").to(dtype)
    ref = reference(x[None], packed, state, bias)
    for lookup_asm, half2 in ((True, True), (True, False), (False, False)):
        for early in (True, False):
            out = torch.full((shape[0],), float("nan"), device="cuda", dtype=dtype)
            nf4_gemv.gemv_rows(x, words, args, planes, f, bias, out, lookup_asm=lookup_asm, early=early, half2=half2)
            assert_close_to_reference(out[None], ref, x[None], packed, state, rel=GPU_REL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 100.0, 1e30])
def test_gpu_rows_kernel_float16_pairs_scale_x(dtype, magnitude):
    """float16-pair sums scale x by a power of two: no overflow or flush for any x float16/bfloat16 can hold."""
    if dtype == torch.float16 and not 1e-6 <= magnitude <= 100:
        pytest.skip("outside float16's range")
    packed, state = quantize(512, 4096, 64, "nf4", True, device="cuda")
    f = nf4_dequantize._state_fields(state)
    words = nf4_dequantize._packed_bytes(packed, f["numel"]).view(torch.int32)
    args = nf4_dequantize.state_tensors(state, f, packed.device, False)
    planes = nf4_gemv.code_planes(state.code)
    x = (torch.randn(4096, device="cuda") * magnitude).to(dtype)
    x[7] = 2 * magnitude  # one outlier, as in real hidden states
    ref = reference(x[None].double(), packed, state, None)
    out = nf4_gemv.gemv_rows(x, words, args, planes, f, None, half2=True)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out[None], ref, x[None], packed, state, rel=GPU_REL[dtype])
