"""Checks shared by the test modules."""
import contextlib
import math
import os

import pytest
import torch

# Non-default parameters, so that each one is seen to reach the kernel.
DIV_KW = {
    "fkl": {},
    "rkl": {},
    "jsd": {"beta": 0.3},
    "skl": {"alpha": 0.2},
    "srkl": {"alpha": 0.25},
    "tvd": {},
    "taid": {"taid_lambda": 0.4},
}


# The case numbers each random-draw test runs (test_random_* in every op's module;
# each case's generator is seeded by its number): FLASHKD_RANDOM_CASES=N for a
# longer exploration, FLASHKD_RANDOM_FIRST=K to start at case K, so that a new
# run draws cases no earlier run has seen.
_FIRST_RANDOM_CASE = int(os.environ.get("FLASHKD_RANDOM_FIRST", "0"))
RANDOM_CASES = range(_FIRST_RANDOM_CASE, _FIRST_RANDOM_CASE + int(os.environ.get("FLASHKD_RANDOM_CASES", "32")))


def random_lead(rng, low_precision):
    """Leading dims for a random linear-loss case: 1 to 3 dims of awkward sizes, or in
    bf16/fp16 (4 | 8, 8 | 16): >= 32 tokens, where "no worse than plain torch" is not
    decided by which logits happen to round luckily."""
    if low_precision:
        return (rng.choice([4, 8]), rng.choice([8, 16]))
    return tuple(rng.choice([1, 2, 3, 5, 9]) for _ in range(rng.choice([1, 1, 2, 3])))


def scalar_objective(loss, gen):
    """A scalar to differentiate a loss through: per-token losses weighted by
    cotangents exactly representable in bf16/fp16 (0.5 + j/64, drawn from
    `gen`), so that every dtype's computation sees the same ones; a 0-d loss
    times 1.75."""
    if loss.dim() == 0:
        return loss * 1.75
    cot = (0.5 + torch.randint(0, 64, loss.shape, generator=gen, dtype=torch.float64) / 64).to(loss.device)
    return (loss * cot.to(loss.dtype)).sum()


def loss_options(labels, weights, kw):
    """kw with the labels a linear loss sees (moved by `shift`: position i is scored
    against labels[i + 1], the last position ignored) and the token weights."""
    if labels is not None and kw.get("shift"):
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], kw.get("ignore_index", -100))], -1)
    return dict(kw, labels=labels, weights=weights)


def token_factors(lead, kw, soft_c, hard_c):
    """Per token of a distillation loss with options `kw` (labels, ignore_index, weights,
    reduction, num_items): soft_c + hard_c (hard only with a label), times the token
    weight, 0 where ignored, over the divisor of mean; and the reduction."""
    labels = kw.get("labels")
    per = torch.full(tuple(lead), soft_c + (hard_c if labels is not None else 0.0), dtype=torch.float64)
    valid = torch.ones(tuple(lead), dtype=torch.bool)
    if labels is not None:
        valid = labels.cpu() != kw.get("ignore_index", -100)
        per = per * valid
    if kw.get("weights") is not None:
        per = per * kw["weights"].detach().cpu().double()
    red = kw.get("reduction", "mean")
    denom = 1.0 if red in ("none", "sum") else (kw.get("num_items") or max(int(valid.sum()), 1))
    return per / denom, red


# float64 gradcheck is impossible (the kernels take float32/bfloat16/float16 only).
# In float32, the analytic directional derivative <grad, v> is compared with the
# central difference (f(x + eps v) - f(x - eps v)) / (2 eps) of the op's own
# forward, for random unit directions over all parameters and for each alone.
# With f = O(1), eps = 1e-2: truncation O(eps^2 f''') ~ 1e-4, float32 rounding
# O(EPS32 |f| / eps) ~ 1e-5; tolerance 3e-3 + 1e-2 |analytic|.
def directional_check(f, params, device, eps=1e-2, n_dirs=3, seed=0, analytic_from=None):
    """Finite differences of f against the gradient of `analytic_from` (default f)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    (analytic_from or f)(*leaves).backward()
    grads = [p.grad.double() for p in leaves]
    subsets = [list(range(len(params)))] * n_dirs + [[i] for i in range(len(params))]
    for which in subsets:
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) if i in which
             else torch.zeros(p.shape, dtype=torch.float64) for i, p in enumerate(params)]
        norm = math.sqrt(sum((t ** 2).sum().item() for t in v))
        v = [(t / norm).to(device) for t in v]
        analytic = sum((gr * t).sum().item() for gr, t in zip(grads, v))
        with torch.no_grad():
            plus = f(*[(p.double() + eps * t).float() for p, t in zip(params, v)]).item()
            minus = f(*[(p.double() - eps * t).float() for p, t in zip(params, v)]).item()
        fd = (plus - minus) / (2 * eps)
        assert abs(fd - analytic) <= 3e-3 + 1e-2 * abs(analytic), \
            f"direction over params {which}: finite difference {fd:.6g} vs analytic {analytic:.6g}"


def assert_compile_matches_eager(f, make_leaves, scale=1.0, grad_tol=(1e-5, 1e-6)):
    """f(*leaves) -> (loss, an extra output): eager and torch.compile(fullgraph=True)
    agree on the loss, the extra output and (to grad_tol = (rtol, atol)) every leaf's
    gradient."""
    def run(fn):
        leaves = make_leaves()
        loss, extra = fn(*leaves)
        (loss * scale).backward()
        return [loss.detach(), extra] + [t.grad for t in leaves]

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        name = ("loss", "extra output")[i] if i < 2 else f"grad of leaf {i - 2}"
        rtol, atol = grad_tol if i >= 2 else (1e-5, 1e-6)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


def device_fixture_with_cuda_kernels(select, names):
    """A `device` fixture for a test module whose op has several CUDA kernels:
    its CUDA half runs once per kernel, forced with ``select(name)`` (and set
    back to automatic after), and is skipped where that kernel cannot run."""
    params = ["cpu"] + [pytest.param(name, marks=pytest.mark.cuda, id=f"cuda-{name}") for name in names]

    @pytest.fixture(params=params)
    def device(request):
        if request.param == "cpu":
            yield "cpu"
            return
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        try:
            select(request.param)
        except (RuntimeError, ValueError) as e:
            pytest.skip(str(e))
        yield "cuda"
        select("", True)

    return device


def results_per_cpu_isa(run):
    """{isa: run()} for every CPU instruction set this machine and build can
    select (AVX-512 and AVX2 on x86-64, generic elsewhere), then back to the
    automatic choice."""
    results = {}
    try:
        for isa in ("avx512", "avx2", "generic"):
            try:
                torch.ops.flashkd.cpu_isa(isa, False)
            except (RuntimeError, ValueError):
                continue  # not this machine's (or this build's) instruction set
            results[isa] = run()
    finally:
        torch.ops.flashkd.cpu_isa("", True)
    assert results, "no CPU instruction set could be selected"
    return results


# The ways flashkd runs CPU GEMMs on 16-bit operands (torch.ops.flashkd.cpu_16bit_gemm):
# ATen's GEMMs in the dtype, or float32 GEMMs on converted operands ("auto" picks the
# latter where ATen has no oneDNN GEMM for the dtype).
CPU_16BIT_GEMMS = ("native", "float32")


@contextlib.contextmanager
def cpu_16bit_gemm(mode):
    """Runs flashkd's 16-bit CPU GEMMs in `mode`, then back to the automatic choice."""
    torch.ops.flashkd.cpu_16bit_gemm(mode)
    try:
        yield mode
    finally:
        torch.ops.flashkd.cpu_16bit_gemm("", True)


# More threads than the machine may have cores is fine: the split is what is tested.
THREAD_COUNTS = (1, 2, 3, 7)


def results_per_thread_count(run):
    """{threads: run()} for each of THREAD_COUNTS, then the caller's count back."""
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in THREAD_COUNTS:
            torch.set_num_threads(threads)
            results[threads] = run()
    finally:
        torch.set_num_threads(before)
    return results


def assert_same_bits(results):
    """Every entry of {setting: outputs} (as results_per_cpu_isa and
    results_per_thread_count give) equals the first, bit for bit."""
    (first, want), *others = results.items()
    for setting, got in others:
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"output {i} differs between {first} and {setting}"
