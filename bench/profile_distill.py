"""One distillation call per (CUDA kernel, divergence) at the GPU target shape
(N=8192, V=128256 bf16), each between cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --kernel-name regex:distill python3 bench/profile_distill.py

bench/gpu_suite.sh runs it as its optional `profile` step. Each call is warmed up
outside the profiled range first.
"""
import torch

import flashkd

N, V = 8192, 128256


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    teacher = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    select = torch.ops.flashkd.distill_cuda_kernel
    for kernel in ("cluster", "stream"):
        try:
            select(kernel)
        except (RuntimeError, ValueError) as e:
            print(f"{kernel}: not available ({e})")
            continue
        for divergence in ("fkl", "jsd"):
            flashkd.distill_loss(student, teacher, divergence=divergence)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            flashkd.distill_loss(student, teacher, divergence=divergence)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"{kernel} {divergence}: ran the {select()[1]} kernel")
    select("", True)


if __name__ == "__main__":
    main()
