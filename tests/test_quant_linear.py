"""QuantLinear (training and frozen forms) against flashkd.reference.quant:
forward, straight-through-estimator gradients, freeze, state_dict, opcheck,
torch.compile, and argument errors."""
import io

import pytest
import torch

from flashkd.quant import SCHEMES, QuantLinear, quant_linear
from flashkd.quant.formats import dequantized_weight
from flashkd.reference import quant as ref
from checks import cpu_16bit_gemm
from quant_cases import DTYPES, gen, randn

ops = torch.ops.flashkd
# (in_features, out_features, group_size): partial last int4 group, K not a
# multiple of 4 / 2 / the vector width, N = 1.
SIZES = [(37, 19, 8), (130, 1, 128), (64, 70, 32)]
# Float outputs: the epilogue's multiply-add may be one FMA in the kernel
# (a float32 rounding apart from the oracle), then the dtype's own rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def make_layer(scheme, k, n, group_size, bias=True, per_tensor=False, device="cpu", seed=0):
    torch.manual_seed(seed)
    return QuantLinear(k, n, bias, scheme=scheme, group_size=group_size, per_tensor=per_tensor).to(device)


def schemes_with_per_tensor():
    return [("w1.58a8", False), ("w1.58a8", True), ("w8a8", False), ("w4a16", False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scheme,per_tensor", schemes_with_per_tensor())
def test_forward_and_ste_grads(scheme, per_tensor, size, bias, dtype, device, cpu_gemm_mode):
    if dtype == "fp32" and cpu_gemm_mode == "float32":
        pytest.skip("float32 operands have one way to run")
    k, n, group_size = size
    layer = make_layer(scheme, k, n, group_size, bias, per_tensor, device)
    x = randn((2, 3, k), gen("fwd", scheme, size, bias, dtype), DTYPES[dtype], device).requires_grad_()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, 3, n)
    expect = ref.quant_linear(x.detach(), layer.weight.detach(), None if not bias else layer.bias.detach(), scheme,
                              group_size, per_tensor)
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(y.detach().cpu(), expect, rtol=rtol, atol=atol)

    grad_out = randn(y.shape, gen("gout", scheme, size), x.dtype, device)
    y.backward(grad_out)
    gi, gw, gb = ref.ste_grads(x.detach(), layer.weight.detach(), grad_out, scheme, group_size, per_tensor, bias)
    # The STE products run in the input's dtype (or in float32, then rounded to it):
    # compare at its precision.
    scale = 1e-5 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.cpu().double(), gi, rtol=scale, atol=scale)
    torch.testing.assert_close(layer.weight.grad.cpu().double(), gw, rtol=scale, atol=scale * 10)
    if bias:
        torch.testing.assert_close(layer.bias.grad.cpu().double(), gb, rtol=scale, atol=scale * 10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float_products_in_float32_on_the_cpu(scheme):
    """Under cpu_16bit_gemm("float32"), a bf16 layer's float products (w4a16's forward,
    the straight-through backward) run in float32 on the bf16 values and are rounded
    once: the same bits as that computation by hand; "native" keeps them in bf16."""
    k, n, group_size = 64, 70, 32
    layer = make_layer(scheme, k, n, group_size).to(torch.bfloat16)
    x = randn((5, k), gen("f32", scheme), torch.bfloat16, "cpu")
    grad_out = randn((5, n), gen("f32-gout", scheme), torch.bfloat16, "cpu")
    wd = dequantized_weight(layer.weight.detach(), scheme, group_size).float()
    expect_gx = (grad_out.float() @ wd).bfloat16()
    expect_gw = (grad_out.float().T @ x.float()).bfloat16()
    expect_out = torch.nn.functional.linear(x.float(), wd, layer.bias.detach().float()).bfloat16()
    with cpu_16bit_gemm("float32"):
        xg = x.clone().requires_grad_()
        out = layer(xg)
        out.backward(grad_out)
    assert torch.equal(xg.grad, expect_gx) and torch.equal(layer.weight.grad, expect_gw)
    if scheme == "w4a16":
        assert torch.equal(out, expect_out)
    layer.weight.grad = None
    with cpu_16bit_gemm("native"):
        xg = x.clone().requires_grad_()
        layer(xg).backward(grad_out)
    assert not torch.equal(xg.grad, expect_gx)  # so the first check could fail


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_input_feature_many_tokens(scheme, device):
    """in_features = 1 from 32 tokens on, where the CPU's automatic choice sends
    the int8 product to oneDNN, which left the output unwritten at K = 1 until
    flashkd spelled out the operands' strides: training and frozen forms against
    the oracle."""
    layer = make_layer(scheme, 1, 6, 1, device=device)
    x = randn((40, 1), gen("k1", scheme), torch.float32, device)
    with torch.no_grad():
        expect = ref.quant_linear(x, layer.weight, layer.bias, scheme, 1, False)
        torch.testing.assert_close(layer(x).cpu(), expect, rtol=1e-5, atol=1e-5)
        layer.freeze()
        torch.testing.assert_close(layer(x).cpu(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_grad_ignores_quantization(scheme):
    """STE: grad_weight = grad_out^T @ x with the float input (not its int8 codes),
    to float32 accuracy; grad_bias = grad_out summed over tokens."""
    layer = make_layer(scheme, 21, 11, 4)
    x = randn((5, 21), gen("ste64", scheme)).requires_grad_()
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad.double(), torch.ones(5, 11, dtype=torch.float64).T @ x.detach().double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, torch.full((11,), 5.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scheme,per_tensor", schemes_with_per_tensor())
def test_freeze_keeps_outputs(scheme, per_tensor, size, dtype, device):
    k, n, group_size = size
    layer = make_layer(scheme, k, n, group_size, True, per_tensor, device)
    x = randn((4, k), gen("freeze", scheme, size, dtype), DTYPES[dtype], device)
    with torch.no_grad():
        before = layer(x)
        layer.freeze()
        after = layer(x)
    assert layer.frozen and "weight" not in dict(layer.named_parameters())
    if scheme == "w4a16":  # int4 kernel: float32 accumulation in another order than ATen's GEMM
        rtol, atol = TOL[x.dtype]
        torch.testing.assert_close(after, before, rtol=rtol, atol=atol)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("frozen", [False, True], ids=["training", "frozen"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nan_reaches_the_outputs(scheme, frozen, device):
    """A NaN weight makes its output column NaN and a NaN activation its output
    row, as in the oracle (and as in nn.Linear), instead of being quantized
    into valid codes that hide it; every other output stays what it was."""
    k, n = 24, 6
    layer = make_layer(scheme, k, n, 8, True, device=device)
    x = randn((5, k), gen("nan-out", scheme), device=device)
    with torch.no_grad():
        clean = layer(x)
        layer.weight[4, 3] = float("nan")
        if frozen:
            layer.freeze()
        x[2, 9] = float("nan")
        out = layer(x)
    nan_expected = torch.zeros(5, n, dtype=torch.bool)
    nan_expected[:, 4] = True
    nan_expected[2, :] = True
    assert torch.equal(out.isnan().cpu(), nan_expected)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(out[~nan_expected.to(out.device)], clean[~nan_expected.to(out.device)],
                               rtol=rtol, atol=atol)


def test_frozen_buffers_and_bytes():
    layer = make_layer("w1.58a8", 130, 8, 128).freeze()
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (8, 33)
    assert layer.weight_scale.shape == (8,)
    layer = make_layer("w4a16", 130, 8, 64).freeze()
    assert layer.weight_packed.shape == (8, 65) and layer.weight_zero.shape == (8, 3)
    assert abs(make_layer("w8a8", 1024, 64, 128).freeze().frozen_bytes_per_weight() - (1 + 4 / 1024)) < 1e-9


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("scheme,per_tensor", schemes_with_per_tensor())
def test_state_dict_roundtrip(scheme, per_tensor):
    x = randn((3, 37), gen("sd", scheme))
    src = make_layer(scheme, 37, 9, 8, per_tensor=per_tensor, seed=1)
    dst = make_layer(scheme, 37, 9, 8, per_tensor=per_tensor, seed=2)
    dst.load_state_dict(_roundtrip(src.state_dict()))
    assert torch.equal(dst(x), src(x))
    src.freeze()
    dst_frozen = make_layer(scheme, 37, 9, 8, per_tensor=per_tensor, seed=3).freeze()
    dst_frozen.load_state_dict(_roundtrip(src.state_dict()))
    assert set(src.state_dict()) == set(dst_frozen.state_dict())
    assert torch.equal(dst_frozen(x), src(x))
    # A state of the other form is refused with the fix, also under strict=False
    # (which would otherwise skip it and keep the old weights).
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"^QuantLinear: .*frozen layer's packed buffers.*call freeze\(\)"):
            make_layer(scheme, 37, 9, 8, per_tensor=per_tensor).load_state_dict(src.state_dict(), strict=strict)
        with pytest.raises(RuntimeError, match=r"^QuantLinear: the state holds a training-form weight"):
            dst_frozen.load_state_dict(dst.state_dict(), strict=strict)
    model = torch.nn.Sequential(torch.nn.Identity(), make_layer(scheme, 37, 9, 8, per_tensor=per_tensor))
    with pytest.raises(RuntimeError, match=r"^QuantLinear '1': the state holds a frozen"):
        model.load_state_dict({"1." + k: v for k, v in src.state_dict().items()})
    # A state without this layer's keys is still torch's business (missing keys).
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({})


def test_opcheck(device):
    g = gen("opcheck")
    x = randn((3, 2, 37), g, device=device)
    a, a_scale = ops.quantize_int8_rows(x)
    w8 = torch.randint(-127, 128, (5, 37), generator=g, dtype=torch.int8).to(device)
    wt = torch.randint(0, 256, (5, 10), generator=g, dtype=torch.uint8).to(device)
    w_scale = torch.rand(5, generator=g).to(device)
    bias = randn(5, g, device=device)
    torch.library.opcheck(ops.quantize_int8_rows.default, (x,))
    torch.library.opcheck(ops.int8_linear.default, (a, w8))
    torch.library.opcheck(ops.int8_linear.default, (a, w8, a_scale, w_scale, bias, torch.bfloat16))
    torch.library.opcheck(ops.ternary_linear.default, (a, wt, a_scale, w_scale[:1], None, torch.float32))
    w4 = torch.randint(0, 256, (5, 19), generator=g, dtype=torch.uint8).to(device)
    scale, zero = torch.rand(5, 5, generator=g).to(device), torch.randint(0, 16, (5, 5), generator=g).float().to(device)
    torch.library.opcheck(ops.int4_linear.default, (x, w4, scale, zero, 8, bias))
    for scheme in SCHEMES:
        weight = randn((5, 37), g, device=device).requires_grad_()
        torch.library.opcheck(ops.qat_linear.default, (x.clone().requires_grad_(), weight, bias.clone().requires_grad_(),
                                                       scheme, 8, False))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_compile(scheme, device):
    layer = make_layer(scheme, 37, 9, 8, device=device)
    x0 = randn((2, 4, 37), gen("compile", scheme), device=device)

    def run(fn):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.weight.grad, layer.bias.grad

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layer.freeze()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x0), layer(x0), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheme"):
        QuantLinear(4, 4, scheme="w2a16")
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(4, 4, scheme="w4a16", group_size=0)
    with pytest.raises(ValueError, match="in_features"):
        QuantLinear(0, 4, scheme="w8a8")
    with pytest.raises(ValueError, match="per_tensor"):
        QuantLinear(4, 4, scheme="w8a8", per_tensor=True)
    layer = QuantLinear(8, 4, scheme="w8a8")
    with pytest.raises(TypeError, match="input"):
        layer(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="input"):
        layer(torch.zeros(2, 7))
    layer.freeze()
    with pytest.raises(TypeError, match="input"):
        layer(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="input"):
        layer(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="weight"):
        quant_linear(torch.zeros(2, 8), torch.zeros(8), scheme="w8a8")
    with pytest.raises(ValueError, match="bias"):
        quant_linear(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(3), scheme="w8a8")


def test_bad_op_arguments():
    a = torch.zeros(3, 10, dtype=torch.int8)
    with pytest.raises(TypeError, match="a must be int8"):
        ops.int8_linear(a.float(), torch.zeros(2, 10, dtype=torch.int8))
    with pytest.raises(ValueError, match="w must have shape"):
        ops.int8_linear(a, torch.zeros(2, 11, dtype=torch.int8))
    with pytest.raises(ValueError, match="w_packed must have shape"):
        ops.ternary_linear(a, torch.zeros(2, 2, dtype=torch.uint8))  # needs ceil(10/4) = 3 bytes
    with pytest.raises(TypeError, match="w_packed must be uint8"):
        ops.ternary_linear(a, torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="a_scale must have one entry per row"):
        ops.int8_linear(a, torch.zeros(2, 10, dtype=torch.int8), torch.ones(2), torch.ones(2), None, torch.float32)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ops.int8_linear(a, torch.zeros(2, 10, dtype=torch.int8), torch.ones(3), torch.ones(3), None, torch.float32)
    with pytest.raises(ValueError, match="out_dtype is required"):
        ops.int8_linear(a, torch.zeros(2, 10, dtype=torch.int8), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_linear(a, torch.zeros(2, 10, dtype=torch.int8), torch.ones(3), torch.ones(2), torch.ones(3),
                        torch.float32)
    x = torch.zeros(3, 10)
    w4, s = torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 2)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_linear(x, w4, s, s, 0)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.int4_linear(x, w4, torch.ones(2, 3), s, 8)
    with pytest.raises(ValueError, match="w_packed must have shape"):
        ops.int4_linear(x, torch.zeros(2, 4, dtype=torch.uint8), s, s, 8)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.int4_linear(x.double(), w4, s, s, 8)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        ops.int4_linear(x, w4, s, s, 8, torch.zeros(2, dtype=torch.bfloat16))
