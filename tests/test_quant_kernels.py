"""Quantized-matmul kernels against flashkd.reference.quant: integer results
(int8 codes, int32 accumulators) bit-exact, dequantized outputs within float
rounding, on awkward shapes, under each CPU instruction set and CUDA main loop."""
import random

import pytest
import torch

from flashkd.quant import int4_linear, int8_matmul, pack, quantize_activations, ternary_matmul, unpack
from flashkd.reference import quant as ref
from checks import RANDOM_CASES
from quant_cases import DTYPES, SHAPES, gen, kernel_variant, rand_int8, rand_ternary, randn  # noqa: F401  (fixture)

ops = torch.ops.flashkd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 63), (300, 129), (5, 1000)])
def test_quantize_activations_exact(shape, dtype, device, kernel_variant):
    g = gen("act", shape, dtype)
    x = randn(shape, g, DTYPES[dtype], device, scale=3.0)
    x[..., 0] = 0.0  # exact zeros and a row that is all zero
    if x.dim() > 1:
        x[0] = 0.0
    q, s = quantize_activations(x)
    q_ref, s_ref = ref.quantize_activations(x.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def test_quantize_activations_non_finite_rows(device):
    """A row with a NaN gets a NaN scale, one with an infinity (and no NaN) an
    infinite scale, as in the oracle, so that their outputs are not finite;
    a NaN-dropping max had given them finite scales. Other rows are exact."""
    x = randn((4, 37), gen("act-nonfinite"), device=device)
    x[1, 5], x[2, 0], x[3, 36] = float("nan"), float("inf"), -float("inf")
    q, s = quantize_activations(x)
    q_ref, s_ref = ref.quantize_activations(x.cpu())
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
    assert s[1].isnan() and s[2].isinf() and s[3].isinf()
    assert torch.equal(q[0].cpu(), q_ref[0])


def test_quantize_activations_rounds_half_to_even(device):
    # amax 127 makes inv = 1: x * inv is x itself, so ties are exact.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], device=device)
    q, _ = quantize_activations(x)
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2]]


def test_quantize_activations_strided_input(device):
    x = randn((6, 40), gen("strided"), device=device)[:, ::2]
    q, s = quantize_activations(x)
    q_ref, s_ref = ref.quantize_activations(x.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("mnk", SHAPES)
def test_int8_matmul_exact(mnk, device, kernel_variant):
    m, n, k = mnk
    g = gen("int8", mnk)
    a, w = rand_int8((m, k), g, device), rand_int8((n, k), g, device)
    a[0, :] = -128  # the extremes: -128 * -128 sums, the VNNI offset's worst case
    w[0, :] = -128
    acc = int8_matmul(a, w)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.cpu().long(), ref.int_matmul(a, w))


@pytest.mark.parametrize("mnk", [(129, 257, 16), (257, 129, 144), (383, 300, 4096), (200, 100, 1024)])
def test_int8_matmul_tile_edges(mnk, device, kernel_variant):
    """One row or column past a 128 x 256 tile, a 256-row tile pair with a
    half-filled second tile, N under half a tile (a clustered wgmma block's
    weight share then lies wholly past N), K of one 16-byte chunk."""
    m, n, k = mnk
    g = gen("int8-edges", mnk)
    a, w = rand_int8((m, k), g, device), rand_int8((n, k), g, device)
    assert torch.equal(int8_matmul(a, w).cpu().long(), ref.int_matmul(a, w))


def test_int8_matmul_many_k_tiles(device, kernel_variant):
    """Forty-two 128-byte k tiles, so every stage of a pipelined main loop is
    refilled ten times (its barriers' phases wrap), with partial M, N and K tiles."""
    m, n, k = 200, 300, 128 * 41 + 48
    g = gen("int8-many-k")
    a, w = rand_int8((m, k), g, device), rand_int8((n, k), g, device)
    assert torch.equal(int8_matmul(a, w).cpu().long(), ref.int_matmul(a, w))


@pytest.mark.parametrize("mnk", SHAPES)
def test_ternary_matmul_exact(mnk, device, kernel_variant):
    m, n, k = mnk
    g = gen("ternary", mnk)
    a, wq = rand_int8((m, k), g, device), rand_ternary((n, k), g, device)
    acc = ternary_matmul(a, pack(wq, "w1.58a8"))
    assert torch.equal(acc.cpu().long(), ref.int_matmul(a, wq))



@pytest.mark.parametrize("k", [4 * 81, 4 * 162 + 3])
def test_ternary_decode_every_byte(k, device, kernel_variant):
    """Each of the 81 bytes of four valid codes, at every position of the
    decoders' vector chunks (and a table-decoded tail): identity activations make
    the int32 result the decoded weights themselves."""
    valid = torch.tensor([b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))], dtype=torch.uint8)
    width = -(-k // 4)
    rows = [valid.roll(shift).repeat(-(-width // 81))[:width] for shift in range(5)]
    packed = torch.stack(rows).to(device)
    acc = ternary_matmul(torch.eye(k, dtype=torch.int8, device=device), packed)
    assert torch.equal(acc.cpu().T.to(torch.int8), unpack(packed.cpu(), "w1.58a8", k))

def test_ternary_after_a_wider_call(device, kernel_variant):
    """A call with K not a multiple of 256 after a wider one: the kernel's reused
    weight tiles then hold the earlier call's bytes past the packed row, which
    must meet zero activations only."""
    g = gen("ternary-after-wider")
    wide = torch.ones(8, 1000, dtype=torch.int8, device=device)  # every code 2: nonzero bytes
    ternary_matmul(rand_int8((8, 1000), g, device), pack(wide, "w1.58a8"))
    a, wq = rand_int8((8, 300), g, device), rand_ternary((8, 300), g, device)
    assert torch.equal(ternary_matmul(a, pack(wq, "w1.58a8")).cpu().long(), ref.int_matmul(a, wq))


@pytest.mark.parametrize("m", [1, 40])
def test_one_row_views_of_stride_zero(m, device, kernel_variant):
    """A one-row weight (and a one-row activation) whose row stride is 0, as
    expand() and as_strided() make them: contiguous by torch's rule, and bit-exact
    (oneDNN, given that stride as a leading dimension, wrote nothing)."""
    k = 96
    g = gen("stride0", m)
    a, w = rand_int8((m, k), g, device), rand_int8((1, k), g, device)
    w0 = w.as_strided((1, k), (0, 1))
    a0 = a.as_strided((1, k), (0, 1)) if m == 1 else a
    assert w0.is_contiguous() and a0.is_contiguous()
    assert torch.equal(int8_matmul(a0, w0).cpu().long(), ref.int_matmul(a0, w0))
    wt = rand_ternary((1, k), g, device)
    packed = pack(wt, "w1.58a8")
    packed0 = packed.as_strided(packed.shape, (0, 1))
    assert torch.equal(ternary_matmul(a0, packed0).cpu().long(), ref.int_matmul(a0, wt))


def test_leading_dims(device):
    g = gen("lead")
    a, w = rand_int8((2, 3, 50), g, device), rand_int8((6, 50), g, device)
    assert int8_matmul(a, w).shape == (2, 3, 6)
    assert torch.equal(int8_matmul(a, w).cpu().long(), ref.int_matmul(a, w))


def _tolerance(dtype):
    # Kernels may contract the epilogue's multiply-add into one FMA: one float32
    # rounding apart, then the output dtype's own rounding.
    return {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-5)}[dtype]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["int8", "ternary"])
@pytest.mark.parametrize("mnk", [(1, 5, 33), (19, 70, 131), (40, 70, 128)])
def test_dequantizing_epilogue(mnk, kind, dtype, per_row, bias, device, kernel_variant):
    m, n, k = mnk
    out_dtype = DTYPES[dtype]
    g = gen("epi", mnk, kind, dtype, per_row, bias)
    a = rand_int8((m, k), g, device)
    wq = rand_int8((n, k), g, device) if kind == "int8" else rand_ternary((n, k), g, device)
    a_scale = torch.rand(m, generator=g).add_(0.01).to(device)
    w_scale = torch.rand(n if per_row else 1, generator=g).add_(0.01).to(device)
    b = randn(n, g, out_dtype, device) if bias else None
    if kind == "int8":
        out = ops.int8_linear(a, wq, a_scale, w_scale, b, out_dtype)
    else:
        out = ops.ternary_linear(a, pack(wq, "w1.58a8"), a_scale, w_scale, b, out_dtype)
    expect = ref.epilogue(ref.int_matmul(a, wq), a_scale.cpu(), w_scale.cpu(), None if b is None else b.cpu(),
                          out_dtype)
    assert out.dtype == out_dtype
    rtol, atol = _tolerance(out_dtype)
    torch.testing.assert_close(out.cpu(), expect, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["int8", "ternary"])
@pytest.mark.parametrize("mnk", [(1, 5, 33), (32, 70, 131), (65, 200, 260), (300, 130, 64), (33, 130, 70000)])
def test_cpu_main_loops_give_the_same_bits(mnk, kind):
    """oneDNN's int32 GEMM (from 32 rows on) and flashkd's dot-product kernels
    share the epilogue: int32 accumulators and every output dtype come out bit
    for bit the same. At K = 70000 oneDNN runs in panels of 64 columns (8 MiB
    of decoded weights each), 130 = 64 + 64 + 2."""
    ops.quant_cpu_gemm("onednn")  # skips nothing: without oneDNN this raises, and the test should fail
    ops.quant_cpu_gemm("", True)
    m, n, k = mnk
    g = gen("loops", mnk, kind)
    a = rand_int8((m, k), g)
    wq = rand_int8((n, k), g) if kind == "int8" else rand_ternary((n, k), g)
    w = wq if kind == "int8" else pack(wq, "w1.58a8")
    gemm = ops.int8_linear if kind == "int8" else ops.ternary_linear
    a_scale, w_scale = torch.rand(m, generator=g).add_(0.01), torch.rand(n, generator=g).add_(0.01)
    try:
        for out_dtype in DTYPES.values():
            bias = randn(n, g, out_dtype)
            outs = {}
            for choice in ("flashkd", "onednn"):
                ops.quant_cpu_gemm(choice)
                outs[choice] = (gemm(a, w), gemm(a, w, a_scale, w_scale, bias, out_dtype))
            assert torch.equal(outs["flashkd"][0], outs["onednn"][0])
            assert torch.equal(outs["flashkd"][1], outs["onednn"][1])
    finally:
        ops.quant_cpu_gemm("", True)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags
def test_cpu_main_loop_choice_is_checked():
    """"auto" runs the int32 main loop in ATen's _int_mm from 32 rows on, and only
    where ATen runs it on oneDNN (AVX-512 VNNI, oneDNN on): elsewhere _int_mm is a
    scalar loop, far slower than flashkd's kernels."""
    with pytest.raises(ValueError, match="CPU int8 GEMM must be auto, onednn or flashkd"):
        ops.quant_cpu_gemm("mkl")
    assert ops.quant_cpu_gemm("", True) == "auto"
    # Only an x86 build looks for AVX-512 VNNI (the portable kernels' build, as on
    # other CPUs, never picks oneDNN: it failed this test on a VNNI Xeon, 2026-12-08).
    x86_build = torch.ops.flashkd.cpu_isa() != "generic"
    onednn = x86_build and torch.backends.mkldnn.is_available() and torch.cpu._is_vnni_supported()
    assert [ops.quant_cpu_gemm_onednn(m) for m in (1, 31, 32, 4096)] == [False, False, onednn, onednn]
    with torch.backends.mkldnn.flags(enabled=False):
        assert not ops.quant_cpu_gemm_onednn(4096)
    try:
        ops.quant_cpu_gemm("flashkd")
        assert not ops.quant_cpu_gemm_onednn(4096)
        if torch.backends.mkldnn.is_available():
            ops.quant_cpu_gemm("onednn")
            assert ops.quant_cpu_gemm_onednn(1)
    finally:
        ops.quant_cpu_gemm("", True)


# Decode shapes for the CPU int4 kernel's nibble path (even groups, fewer
# than 8 rows): one token against four weight rows at a time, with a short
# last pass (N = 9, 6), and two tokens.
INT4_DECODE_SHAPES = [(1, 9, 130), (1, 6, 4100), (1, 4, 256), (2, 7, 66)]


@pytest.mark.parametrize("dtype,bias", [("fp32", False), ("fp32", True), ("bf16", True), ("fp16", True)])
@pytest.mark.parametrize("group_size", [1, 6, 12, 32, 128])
@pytest.mark.parametrize("mnk", SHAPES + INT4_DECODE_SHAPES)
def test_int4_linear(mnk, group_size, dtype, bias, device, kernel_variant):
    m, n, k = mnk
    if group_size == 1 and k > 300:
        pytest.skip("group_size 1 is covered by the smaller K (the oracle loops over groups)")
    x_dtype = DTYPES[dtype]
    g = gen("int4", mnk, group_size, dtype, bias)
    x = randn((m, k), g, x_dtype, device)
    w = randn((n, k), g)
    q, scale, zero = ref.int4_weights(w, group_size)
    b = randn(n, g, x_dtype, device) if bias else None
    out = int4_linear(x, pack(q, "w4a16").to(device), scale.to(device), zero.to(device), group_size, b)
    check_int4(out, x, q, scale, zero, group_size, b)


@pytest.mark.parametrize("dtype,bias", [("fp32", False), ("fp32", True), ("bf16", True)])
def test_int4_linear_weight_panels(dtype, bias, device):
    """From 256 rows the CPU dequantizes the weights in panels of 2^20 floats
    for ATen's GEMM (a float32 output straight into its columns): at K = 8192
    panels of 128 rows, N = 300 gives three, the last partial."""
    m, n, k = 256, 300, 8192
    g = gen("int4_panels", dtype, bias)
    x = randn((m, k), g, DTYPES[dtype], device)
    q, scale, zero = ref.int4_weights(randn((n, k), g), 128)
    b = randn(n, g, DTYPES[dtype], device) if bias else None
    out = int4_linear(x, pack(q, "w4a16").to(device), scale.to(device), zero.to(device), 128, b)
    check_int4(out, x, q, scale, zero, 128, b)


def check_int4(out, x, q, scale, zero, group_size, b):
    """out = x @ dequantized(q)^T + b within float32 accumulation over K terms, then
    the output dtype's rounding."""
    (m, k), n = x.shape, q.shape[0]
    per_col = lambda t: t.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    wd = ((q.double() - per_col(zero)) * per_col(scale)).double()
    exact = x.cpu().double() @ wd.T + (b.cpu().double() if b is not None else 0)
    assert out.dtype == x.dtype and out.shape == (m, n)
    bound = 1e-6 * k * (x.cpu().double().abs() @ wd.abs().T) + 1e-6
    if x.dtype != torch.float32:
        bound = bound + exact.abs() * (2 ** -8 if x.dtype == torch.bfloat16 else 2 ** -11)
    assert ((out.cpu().double() - exact).abs() <= bound).all(), (m, n, k, group_size)


# Random shapes: M, N, K drawn around the kernels' block edges (M 1-7 decode,
# 4-row and 4-column blocks, 64-byte vectors, 256-wide K chunks) from a
# generator seeded by the case number (checks.RANDOM_CASES cases each).


def random_mnk(rng):
    m = rng.choice([rng.randint(1, 8), rng.randint(1, 40), rng.randint(1, 300)])
    n = rng.choice([rng.randint(1, 9), rng.randint(1, 150)])
    k = rng.choice([rng.randint(1, 70), rng.randint(1, 1100), 64 * rng.randint(1, 20) + rng.choice([0, 0, 1, 3])])
    return m, n, k


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_shapes_exact(case, device, kernel_variant):
    """quantize_activations, int8 and ternary GEMMs: bit-exact on random shapes."""
    rng = random.Random(f"quant-{case}")
    m, n, k = random_mnk(rng)
    g = gen("random", case)
    x = randn((m, k), g, DTYPES[rng.choice(list(DTYPES))], device, scale=rng.choice([0.01, 1.0, 100.0]))
    a, s = quantize_activations(x)
    a_ref, s_ref = ref.quantize_activations(x.cpu())
    assert torch.equal(a.cpu(), a_ref) and torch.equal(s.cpu(), s_ref), (m, n, k)
    w8, wt = rand_int8((n, k), g, device), rand_ternary((n, k), g, device)
    assert torch.equal(int8_matmul(a, w8).cpu().long(), ref.int_matmul(a, w8)), (m, n, k)
    assert torch.equal(ternary_matmul(a, pack(wt, "w1.58a8")).cpu().long(), ref.int_matmul(a, wt)), (m, n, k)


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_shapes_int4(case, device, kernel_variant):
    """int4_linear on random shapes and group sizes, within float32 accumulation."""
    rng = random.Random(f"int4-{case}")
    m, n, k = random_mnk(rng)
    group_size = rng.choice([rng.randint(1, 40), 32, 64, 128, k, k + 5])
    if group_size < 8 and k > 300:
        group_size = 32  # the oracle loops over groups
    x_dtype = DTYPES[rng.choice(list(DTYPES))]
    g = gen("random-int4", case)
    x = randn((m, k), g, x_dtype, device)
    q, scale, zero = ref.int4_weights(randn((n, k), g), group_size)
    b = randn(n, g, x_dtype, device) if rng.random() < 0.5 else None
    out = int4_linear(x, pack(q, "w4a16").to(device), scale.to(device), zero.to(device), group_size, b)
    check_int4(out, x, q, scale, zero, group_size, b)

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int4_group_wider_than_the_row(dtype, device):
    """A group_size of K or more is one group, however large (the CUDA kernels
    index groups with 32-bit widths): the same output as group_size = K."""
    m, n, k = 24, 8, 64
    g = gen("int4_wide_group", dtype)
    x = randn((m, k), g, DTYPES[dtype], device)
    q, scale, zero = ref.int4_weights(randn((n, k), g), k)
    args = (pack(q, "w4a16").to(device), scale.to(device), zero.to(device))
    want = int4_linear(x, *args, k)
    for group_size in (k + 1, 2**31, 2**63 - 1):
        assert torch.equal(int4_linear(x, *args, group_size), want)


def test_meta_beside_real_tensors_is_an_error():
    """A meta tensor beside real ones reaches the fake kernels, which check devices
    as the C++ glue does instead of answering with empty memory."""
    g = gen("meta")
    a, w = rand_int8((4, 16), g), rand_int8((5, 16), g)
    with pytest.raises(ValueError, match="w must be on the device of a"):
        int8_matmul(a, w.to("meta"))
    with pytest.raises(ValueError, match="w_packed must be on the device of a"):
        ternary_matmul(a, pack(rand_ternary((5, 16), g), "w1.58a8").to("meta"))
    q, scale, zero = ref.int4_weights(randn((5, 16), g), 8)
    with pytest.raises(ValueError, match="scale must be on the device of x"):
        int4_linear(randn((4, 16), g), pack(q, "w4a16"), scale.to("meta"), zero, 8)


@pytest.mark.parametrize("m", [0, 3])
def test_empty(m, device):
    a = torch.zeros(m, 8, dtype=torch.int8, device=device)
    assert int8_matmul(a, torch.ones(0, 8, dtype=torch.int8, device=device)).shape == (m, 0)
    assert ternary_matmul(a, torch.zeros(4, 2, dtype=torch.uint8, device=device)).shape == (m, 4)


def test_zero_in_features(device):
    """K = 0: every accumulator is 0, the activation scale is the clipped 1e-5 / 127."""
    q, s = quantize_activations(torch.zeros(2, 3, 0, device=device))
    assert q.shape == (2, 3, 0) and torch.equal(s.cpu(), ref.quantize_activations(torch.zeros(2, 3, 0))[1])
    acc = int8_matmul(torch.zeros(3, 0, dtype=torch.int8, device=device), torch.zeros(5, 0, dtype=torch.int8,
                                                                                      device=device))
    assert torch.equal(acc.cpu(), torch.zeros(3, 5, dtype=torch.int32))
