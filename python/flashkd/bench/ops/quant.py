"""Quantized linear cases (issue #6): x [M, K] @ W [N, K]^T + bias, summed to
a scalar, for each scheme, in two forms:

  w1.58a8, w8a8, w4a16   training form (flashkd.quant.quant_linear: weights
                         quantized from the latent float weight on every call,
                         STE backward): forward and forward+backward
  <scheme>-infer         inference form (frozen, packed weights): forward only

Shapes are MxNxK:dtype (dtype of x, of the latent weight and of torch's
weight). Providers:
  flashkd   the quantized layer
  torch     torch.nn.functional.linear in the case dtype (fp32 nn.Linear on the
            CPU set, bf16 on the GPU sets): the float baseline the ratios use
  flashkd-mma.sync  (CUDA, where flashkd runs a wgmma loop) the same layer with the
            int8 GEMM forced onto the sm_80 mma.sync main loop: what wgmma buys
  flashkd-wgmma-1cta  (CUDA, where flashkd runs clustered wgmma) the same layer with the
            wgmma main loop run without clusters: what sharing the weight
            tile between two blocks buys
  flashkd-dot  (CPU, from 32 rows, where flashkd runs the int32 main loop in
            oneDNN) the same layer on flashkd's own int8 dot-product kernels:
            what oneDNN buys
  cublas-int8  (CUDA, w8a8-infer) torch._int_mm, cuBLAS's int8 GEMM with int32
            output and no epilogue: a reference for the int8 main loop alone
  torchao   (w8a8-infer, w4a16-infer) torchao's inference layers, when it is
            importable and can build them here: Int8DynamicActivationInt8Weight
            (per-token int8 activations, per-channel int8 weights) and
            Int4WeightOnly (groups of 128, tinygemm's packing: CUDA, bf16); each
            input set's layer is quantized in an untimed warm-up call

``bytes_per_weight`` is the weight storage each provider reads: the packed
buffers (scales and zeros included) for the inference form, the latent float
weight otherwise. Errors are against float64 oracles of each provider's own
math (flashkd.reference.quant's quantizers for flashkd, the float product for
torch), both reduced over rows first so they cost O((M + N) K). torchao's
quantizers are not in the oracle: its error is against the float product, i.e.
its quantization error, and its bytes per weight are those of its quantized
weight tensor's storage.
"""
from __future__ import annotations

import torch

import flashkd
from flashkd.quant import quant_linear
from flashkd.quant.linear import frozen_buffers, frozen_linear
from flashkd.reference import quant as ref

from ..cases import DTYPES, Inputs, Provider, Unsupported, import_peer, under_kernel_choice
from ..errors import error_record, max_abs_diff

NAME = "quant_linear"
SCHEMES = ("w1.58a8", "w8a8", "w4a16")
VARIANTS = SCHEMES + tuple(f"{s}-infer" for s in SCHEMES)
DEFAULT_VARIANTS = {"cpu": VARIANTS, "cuda": VARIANTS}
GROUP_SIZE = 128
_GPU_SQUARE = "8192x8192x8192"
_GPU_DECODE = tuple(f"{m}x{nk}x{nk}" for nk in (4096, 8192) for m in (1, 16))
_GPU_TRAIN = "8192x4096x4096"
_CPU_DECODE = "1x4096x4096"
SHAPE_SETS = {
    "quick": ("16x64x200:fp32", "5x33x130:bf16"),
    "overview": ("512x512x512:fp32",),
    "accept": ("1024x1024x1024:fp32", f"{_CPU_DECODE}:fp32"),
    "cpu": ("1024x1024x1024:fp32", f"{_CPU_DECODE}:fp32"),
    "gpu": tuple(f"{s}:bf16" for s in (_GPU_SQUARE, *_GPU_DECODE, _GPU_TRAIN)),
    "gpu-target": (f"{_GPU_SQUARE}:bf16",),
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu"}
# On a GPU each shape of the gpu set is measured for the variants the issue
# asks about there, plus the packed ternary and int4 kernels at the large-M
# (prefill) shape, which run on the tensor cores; other variants are skipped.
GPU_PLAN = {_GPU_SQUARE: ("w8a8-infer",), _GPU_TRAIN: ("w1.58a8", "w1.58a8-infer", "w4a16-infer"),
            **{s: ("w1.58a8-infer", "w4a16-infer") for s in _GPU_DECODE}}
# On the CPU the decode shape (one token) is measured for the inference forms only.
CPU_PLAN = {_CPU_DECODE: tuple(f"{s}-infer" for s in SCHEMES)}
PLANS = {"cuda": GPU_PLAN, "cpu": CPU_PLAN}


def _check_plan(case, device):
    """Unsupported unless the device's plan measures this variant at this shape."""
    plan = PLANS.get(device.type, {})
    if case.shape in plan and case.variant not in plan[case.shape]:
        raise Unsupported(f"not in the {device.type.upper()} plan at this shape (measured: "
                          f"{', '.join(plan[case.shape])})")


def parse_shape(spec):
    """"MxNxK:dtype" -> ("MxNxK", dtype)."""
    shape, _, dtype = spec.partition(":")
    dims = shape.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims) or dtype not in DTYPES:
        raise ValueError(f"{NAME} shape must look like 1024x1024x1024:fp32 (M x N x K, dtype in "
                         f"{', '.join(DTYPES)}), got {spec!r}")
    return "x".join(str(int(d)) for d in dims), dtype


def _dims(case):
    return tuple(int(d) for d in case.shape.split("x"))


def _scheme(case):
    return case.variant.removesuffix("-infer")


def _inference(case):
    return case.variant.endswith("-infer")


def make_inputs(case, device, seed):
    m, n, k = _dims(case)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    train = not _inference(case)
    x = torch.randn(m, k, generator=gen, device=device, dtype=dtype).requires_grad_(train)
    weight = (torch.randn(n, k, generator=gen, device=device) * k ** -0.5).to(dtype).requires_grad_(train)
    bias = (torch.randn(n, generator=gen, device=device) * 0.1).to(dtype).requires_grad_(train)
    tensors = {"x": x, "weight": weight, "bias": bias}
    if not train:
        tensors.update(frozen_buffers(weight, _scheme(case), GROUP_SIZE))
    return Inputs(tensors, ("x", "weight", "bias") if train else ())


def accuracy_inputs(inputs, max_elements):
    """The inputs themselves: the oracles below cost O((M + N) K)."""
    return inputs


def _packed_bytes(case):
    _, n, k = _dims(case)
    per_weight = {"w1.58a8": 0.25, "w8a8": 1.0, "w4a16": 0.5}[_scheme(case)]
    groups = -(-k // GROUP_SIZE)
    scales = {"w1.58a8": 4 * n, "w8a8": 4 * n, "w4a16": 8 * n * groups}[_scheme(case)]
    return per_weight * n * k + scales


def floor_bytes(case):
    """Inference forms (timed forward only): x read and the output written
    once, plus the weight as the flashkd form stores it. Training forms (timed
    forward+backward): the forward's x, W and output, then the backward's
    grad_out, x and W read and grad_x and grad_W written."""
    m, n, k = _dims(case)
    size = DTYPES[case.dtype].itemsize
    if _inference(case):
        return int((m * k + m * n) * size + _packed_bytes(case))
    return int((m * k + n * k + m * n) * size + (m * n + 2 * m * k + 2 * n * k) * size)


def _flashkd(case, device):
    if device.type == "cuda":
        if not flashkd.has_cuda_kernels():
            raise Unsupported("this flashkd build has no CUDA kernels")
    _check_plan(case, device)
    scheme = _scheme(case)
    if _inference(case):
        return lambda t: frozen_linear(t["x"], t, t["bias"], scheme, GROUP_SIZE).sum(dtype=torch.float32)
    return lambda t: quant_linear(t["x"], t["weight"], t["bias"], scheme=scheme,
                                  group_size=GROUP_SIZE).sum(dtype=torch.float32)


def _torch(case, device):
    _check_plan(case, device)
    return lambda t: torch.nn.functional.linear(t["x"], t["weight"], t["bias"]).sum(dtype=torch.float32)


def _same_float_call(case, device):
    """What the float baseline's call depends on: not the scheme."""
    planned = case.variant in PLANS.get(device.type, {}).get(case.shape, (case.variant,))
    return case.shape, case.dtype, _inference(case), planned


def _flashkd_on_mainloop(name):
    """The flashkd provider with its CUDA int8 GEMM forced onto main loop `name`,
    where flashkd runs another, a wgmma loop."""
    def make(case, device):
        if device.type != "cuda":
            raise Unsupported("a CUDA main-loop choice")
        current = torch.ops.flashkd.quant_cuda_mainloop() if flashkd.has_cuda_kernels() else "none"
        if current not in ("wgmma", "wgmma-1cta") or current == name:
            raise Unsupported(f"flashkd runs {current} here, not a wgmma loop other than {name}")
        if _scheme(case) == "w4a16" or case.variant == "w1.58a8-infer":
            raise Unsupported("no int8 GEMM in this variant (packed ternary and int4 run their own kernels)")
        return under_kernel_choice(_flashkd(case, device), torch.ops.flashkd.quant_cuda_mainloop, name)
    return make


def _flashkd_dot(case, device):
    if device.type != "cpu":
        raise Unsupported("a CPU main-loop choice")
    if _scheme(case) == "w4a16":
        raise Unsupported("no int8 GEMM in this variant (int4 weights meet float activations)")
    if not torch.ops.flashkd.quant_cpu_gemm_onednn(_dims(case)[0]):
        raise Unsupported("flashkd runs its own kernels here already (fewer than 32 rows, no AVX-512 VNNI for "
                          "ATen's oneDNN path, or a forced choice)")
    return under_kernel_choice(_flashkd(case, device), torch.ops.flashkd.quant_cpu_gemm, "flashkd")


def _cublas_int8(case, device):
    if device.type != "cuda" or case.variant != "w8a8-infer":
        raise Unsupported("a CUDA reference for the w8a8 GEMM")
    _check_plan(case, device)

    def run(t):
        a, _ = torch.ops.flashkd.quantize_int8_rows(t["x"])
        return torch._int_mm(a, t["weight_int8"].t()).sum(dtype=torch.float32)
    return run


# torchao's config class and options for each variant it is compared on.
_TORCHAO_CONFIGS = {
    "w8a8-infer": ("Int8DynamicActivationInt8WeightConfig", {}),
    "w4a16-infer": ("Int4WeightOnlyConfig", {"group_size": GROUP_SIZE, "int4_packing_format": "tile_packed_to_4d"}),
}


def _torchao_layer(case, weight, bias):
    """An inference nn.Linear holding weight and bias, quantized by torchao for case's variant."""
    name, options = _TORCHAO_CONFIGS[case.variant]
    quantize_, config = import_peer("torchao", "torchao.quantization", "quantize_", name)
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    quantize_(layer.requires_grad_(False), config(**options))
    if type(layer.weight) is torch.nn.Parameter:  # left float: Int4WeightOnlyConfig only logs, e.g. K % 128
        raise ValueError(f"{name} left the weight unquantized at this shape")
    return layer


def _torchao(case, device):
    if case.variant not in _TORCHAO_CONFIGS:
        raise Unsupported("torchao is compared on w8a8-infer and w4a16-infer (no ternary layer; its "
                          "training forms are not these)")
    _check_plan(case, device)
    import_peer("torchao", "torchao.quantization", "quantize_")  # Unsupported where it is missing
    probe = make_inputs(case, device, seed=0).tensors
    try:  # whether torchao can build this layer here at all (int4: its CUDA packing needs bf16)
        _torchao_layer(case, probe["weight"], probe["bias"])
    except Exception as exc:  # noqa: BLE001  (the peer's own reason, shown as the skip reason)
        raise Unsupported(f"torchao cannot build {case.variant} here: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:160]}") from None
    layers = {}  # per input set (keyed by its weight tensor), made in the warm-up

    def run(t):
        key = id(t["weight"])
        if key not in layers:
            layers[key] = _torchao_layer(case, t["weight"], t["bias"])
        return layers[key](t["x"]).sum(dtype=torch.float32)
    return run


def _torchao_bytes_per_weight(case, t):
    layer = _torchao_layer(case, t["weight"], t["bias"])
    return _stored_bytes(layer.weight) / layer.weight.numel()


def _stored_bytes(t):
    """Bytes of the plain tensors a tensor subclass holds, through nested
    subclasses (some torchao versions wrap the quantized tensor once more)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.nbytes
    names, _ = flatten()
    return sum(_stored_bytes(getattr(t, name)) for name in names)


PROVIDERS = {"flashkd": Provider(_flashkd),
             "torch": Provider(_torch, same_call=_same_float_call),
             "flashkd-mma.sync": Provider(_flashkd_on_mainloop("mma.sync")),
             "flashkd-wgmma-1cta": Provider(_flashkd_on_mainloop("wgmma-1cta")),
             "flashkd-dot": Provider(_flashkd_dot),
             "cublas-int8": Provider(_cublas_int8),
             "torchao": Provider(_torchao, per_input_warmup=True)}


def _oracles(case, t):
    """{provider: (loss, {leaf: gradient})} in float64. With loss = sum of the
    outputs, grad_out is all ones: grad_x rows all equal the column sums of the
    weight used, grad_weight rows all equal the column sums of x, grad_bias = M."""
    x, w, b = t["x"].detach(), t["weight"].detach(), t["bias"].detach().double()
    m = x.shape[0]
    x_colsum = x.double().sum(0)
    scheme = _scheme(case)
    if scheme == "w4a16":
        wd = ref.dequantized_weight(w.cpu(), scheme, GROUP_SIZE).to(x.device).double()
        q_loss = (x_colsum @ wd.T).sum() + m * b.sum()
    else:
        qa, a_scale = ref.quantize_activations(x)
        wq, w_scale = ref.ternary_weights(w) if scheme == "w1.58a8" else ref.int8_weights(w)
        # sum_{m,n} acc[m,n] a_scale[m] w_scale[n] = sum_n w_scale[n] ((a_scale * qa) summed over m) . wq[n]
        scaled_rows = (qa.double() * a_scale.double().unsqueeze(1)).sum(0)
        q_loss = (w_scale.double() * (wq.double() @ scaled_rows)).sum() + m * b.sum()
        wd = wq.double() * w_scale.double().reshape(-1, 1)
    float_loss = (x_colsum @ w.double().T).sum() + m * b.sum()
    grad_w = x_colsum.expand(w.shape[0], -1)
    grad_b = torch.full_like(b, float(m))
    quant_grads = {"x": wd.sum(0).expand(m, -1), "weight": grad_w, "bias": grad_b}
    float_grads = {"x": w.double().sum(0).expand(m, -1), "weight": grad_w, "bias": grad_b}
    quant = (q_loss.item(), quant_grads)
    exact = (float_loss.item(), float_grads)
    return {"flashkd": quant, "flashkd-mma.sync": quant, "flashkd-wgmma-1cta": quant, "flashkd-dot": quant,
            "torch": exact, "torchao": exact}


def errors(case, inputs, outputs):
    """Loss relative error and gradient errors (max abs error over the worse leaf,
    divided by that leaf's max oracle gradient) against each provider's own
    float64 oracle, and the weight bytes per weight each provider reads."""
    oracles = _oracles(case, inputs.tensors)
    size = DTYPES[case.dtype].itemsize
    _, n, k = _dims(case)
    result = {}
    for name, (loss, grads) in outputs.items():
        if name not in oracles:  # cublas-int8: integer accumulators without scales, no oracle here
            continue
        ref_loss, ref_grads = oracles[name]
        rec = error_record(abs(loss - ref_loss), ref_loss,
                           {leaf: (max_abs_diff(got, ref_grads[leaf].cpu()), ref_grads[leaf].abs().max().item())
                            for leaf, got in grads.items()})
        packed = name.startswith("flashkd") and _inference(case)
        if name == "torchao":
            rec["bytes_per_weight"] = _torchao_bytes_per_weight(case, inputs.tensors)
        else:
            rec["bytes_per_weight"] = _packed_bytes(case) / (n * k) if packed else float(size)
        result[name] = rec
    return result
