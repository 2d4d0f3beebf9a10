"""Shapes and random inputs shared by the quantized-matmul tests."""
import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (M, N, K): M = 1 and N = 1, K below / not a multiple of the vector width
# (64 bytes, 16 floats), of 4 (ternary) and 2 (int4), and a few blocks' worth.
# On CUDA, M > 16 takes the tensor-core path (partial M, N and K tiles, more K
# tiles than pipeline stages) when the activation rows are 16-byte aligned:
# K % 16 == 0 for int8 and ternary, K % 8 == 0 for bf16/fp16 int4 (with
# group_size % 32 == 0 or a single group); K > 2048 runs the GEMV's K loop;
# 1030 x 520 x 1040 runs the main loops' steady state over many k tiles and a
# short last group of the block raster.
SHAPES = [(1, 1, 1), (1, 7, 3), (3, 1, 65), (5, 9, 130), (17, 67, 257), (130, 70, 100), (4, 133, 1027),
          (17, 1, 16), (130, 70, 128), (300, 260, 336), (3, 40, 4100), (1030, 520, 1040),
          (2, 9, 1), (40, 6, 1)]  # K = 1: oneDNN needs the strides of the one-column weight spelled out


def gen(*key):
    return torch.Generator().manual_seed(hash(key) % (2 ** 31))


def randn(shape, g, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def rand_int8(shape, g, device="cpu"):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).to(device)


def rand_ternary(shape, g, device="cpu"):
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8).to(device)


# The kernel choices a test runs under: on the CPU each instruction set of
# flashkd's int8 dot-product kernels (AVX-512 VNNI or AVX2 vpmaddwd on x86-64;
# the portable kernels elsewhere, or in an x86 build with FLASHKD_CPU_PORTABLE),
# run for every M, and oneDNN's int32 main loop with flashkd's epilogue (what
# the CPU runs from 32 rows on), also run for every M; on CUDA each int8
# tensor-core main loop (wgmma on an H100 with the sm_90a build, in clusters
# of two blocks or one, and mma.sync).
KERNEL_VARIANTS = [("cpu", "avx512"), ("cpu", "avx2"), ("cpu", "generic"), ("cpu", "onednn"), ("cuda", "wgmma"),
                   ("cuda", "wgmma-1cta"), ("cuda", "mma.sync")]


def _select_cpu(name):
    """The CPU choice `name`: an instruction set of flashkd's kernels, or oneDNN."""
    ops = torch.ops.flashkd
    if name == "onednn":
        ops.quant_cpu_gemm("onednn")
        return
    ops.quant_cpu_gemm("flashkd")
    try:
        ops.cpu_isa(name)
    except (RuntimeError, ValueError):
        ops.quant_cpu_gemm("", True)
        raise


def _reset_cpu():
    torch.ops.flashkd.cpu_isa("", True)
    torch.ops.flashkd.quant_cpu_gemm("", True)


@pytest.fixture(params=KERNEL_VARIANTS, ids=[v for _, v in KERNEL_VARIANTS])
def kernel_variant(request):
    """Runs a test under each kernel choice of its device that this machine
    has, then restores the automatic choice."""
    device = request.getfixturevalue("device")
    kind, name = request.param
    if kind != device:
        pytest.skip(f"{name} is a {kind} kernel choice")
    select, reset = ((_select_cpu, _reset_cpu) if kind == "cpu" else
                     (torch.ops.flashkd.quant_cuda_mainloop, lambda: torch.ops.flashkd.quant_cuda_mainloop("", True)))
    try:
        select(name)
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    if kind == "cpu":
        from flashkd.quant import cpu_int8_kernel

        assert torch.ops.flashkd.quant_cpu_gemm() == ("onednn" if name == "onednn" else "flashkd")
        assert name == "onednn" or cpu_int8_kernel().startswith(name)
    else:
        assert torch.ops.flashkd.quant_cuda_mainloop() == name
    yield name
    reset()
