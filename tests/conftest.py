"""Shared pytest setup for flashkd.

FLASHKD_POISON=1 makes the C++ glue fill every output with NaN (bools with
True, integers with -7) before a kernel writes it, so an element a kernel
forgets to write shows up as NaN instead of as whatever the allocator left
there. The glue reads the variable once, at its first allocation, so it must
be set before flashkd is imported anywhere in the test session.
"""
import os
import sys

assert "flashkd" not in sys.modules, "flashkd was imported before tests/conftest.py could set FLASHKD_POISON"
os.environ["FLASHKD_POISON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import flashkd  # noqa: E402,F401  (imported here, after the variable is set)
from checks import CPU_16BIT_GEMMS, cpu_16bit_gemm  # noqa: E402


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every test taking `device` runs on the CPU and, marked `cuda`, on the GPU
    (`pytest -m cuda` runs the GPU half; it is skipped where there is no GPU)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(params=CPU_16BIT_GEMMS)
def cpu_gemm_mode(request, device):
    """A 16-bit test of an op with float GEMMs (linear losses, QuantLinear) runs once per
    way flashkd may run them on the CPU (checks.CPU_16BIT_GEMMS: in the dtype, or in
    float32), so that both are tested on every machine whatever "auto" picks there; on
    CUDA, where the choice does not apply, once."""
    if device == "cuda" and request.param != "native":
        pytest.skip("the CPU 16-bit GEMM choice does not apply on CUDA")
    with cpu_16bit_gemm(request.param):
        yield request.param
