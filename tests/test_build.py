"""Properties of the built library itself."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import flashkd._C


def test_isa_kernels_keep_their_own_helpers():
    """Every file in csrc/cpu/isa/ is compiled once per instruction set. A helper it
    inlines from a shared header with external linkage (an inline function, a template)
    is emitted as a weak symbol by each build, and the linker keeps one copy for all of
    them: AVX-512 code would run on an AVX2-only machine, or AVX2 code in the AVX-512
    kernels (as it did for the distillation row kernel until this test). Such helpers
    must have internal linkage or live in the per-ISA namespace."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "-C", flashkd._C.__file__], capture_output=True, text=True, check=True).stdout
    shared = [line for line in out.splitlines()
              if re.search(r" [WV] .*flashkd::cpu::", line)
              and not re.search(r"flashkd::cpu::(avx2|avx512|generic)::", line)]
    assert not shared, "weak flashkd::cpu symbols outside the per-ISA namespaces:\n" + "\n".join(shared[:10])


def test_fp16_bit_conversions_match_the_compilers(tmp_path):
    """cpu_convert.h converts fp16 by bit manipulation where the compiler has no
    half type in C++ (GCC 11 on x86-64, CPUs other than x86 and ARM): its
    results must be the compiler's own, bit for bit (tests/cpp/fp16_convert_check.cpp)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "fp16_convert_check"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{root / 'csrc' / 'include'}",
                    str(root / "tests" / "cpp" / "fp16_convert_check.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout
