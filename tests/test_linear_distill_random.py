"""flashkd.linear_distill_loss on random combinations of every option at once
(checks.RANDOM_CASES cases), judged by the tolerance model of
tests/linear_distill_cases.py."""
import random

import pytest
import torch

from checks import CPU_16BIT_GEMMS, RANDOM_CASES, cpu_16bit_gemm, random_lead
from linear_distill_cases import DIVS, check_case


# test_linear_distill.py varies a few options at a time. Here each case draws all of them at once
# (divergence and parameter, teacher as weights or logits of any dtype, Ds != Dt, a larger
# teacher vocabulary, biases, labels with any ignore_index, hard/soft weights, token
# weights, reductions, shift, vocab_size, statistics, soft cap, chunk budget, which
# student tensors need gradients) from a generator seeded by the case number
# (checks.RANDOM_CASES cases; 12000 passed on the CPU). In float32 anything goes,
# vocabularies and hidden sizes of 1 and taid_lambda = 0 included (their gradients
# cancel to ~0, held to the per-element floor of grad_terms). bf16 is drawn only with
# >= 32 tokens, V >= 100 and hidden sizes >= 8, and not for tvd: there its logits'
# rounding (2^-8 relative) moves the gradient by more than float32 noise, and on a few
# tokens "no worse than plain torch" is decided by which logits round luckily (tvd's
# gradient, a sign per element, flips where rounding moves p_j - q_j across 0).


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_option_combinations(case, device):
    rng = random.Random(f"linear_distill-{case}")
    div = rng.choice(DIVS)
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16] if div != "tvd" else [torch.float32])
    low = dtype != torch.float32
    lead = random_lead(rng, low)
    V = rng.choice([100, 513] if low else [1, 2, 3, 17, 37, 100, 513])
    kw = dict(divergence=div, lead=lead, V=V, Vt=V + rng.choice([0, 0, 1, 8]),
              Ds=rng.choice([8, 24] if low else [1, 3, 8, 24]), Dt=rng.choice([16, 40] if low else [1, 5, 16, 40]),
              dtype=dtype, teacher=rng.choice(["weights", "logits"]),
              sbias=rng.random() < 0.4, tbias=rng.random() < 0.4, labels=rng.random() < 0.6,
              ignore=rng.choice([0.0, 0.3, 1.0]), weights=rng.random() < 0.3, scale=rng.choice([1.0, 3.0, 8.0]),
              seed=case, reduction=rng.choice(["none", "sum", "mean", "batchmean"]),
              t2_scaling=rng.random() < 0.3, return_stats=rng.random() < 0.3,
              budget_rows=rng.choice([None, 0.5, 1, 2.5, 7]))
    if kw["teacher"] == "logits" and rng.random() < 0.5:
        kw["tdtype"] = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    if div == "jsd":
        kw["beta"] = rng.choice([0.5, 0.1, 0.9])
    if div in ("skl", "srkl"):
        kw["alpha"] = rng.choice([0.1, 0.0, 0.5])
    if div == "taid":
        kw["taid_lambda"] = rng.choice([0.0, 0.1, 1.0, 0.4])
    if rng.random() < 0.5:
        kw["temperature"] = rng.choice([0.5, 2.0, 3.7])
    if rng.random() < 0.3:
        kw["soft_weight"] = rng.choice([0.0, 0.5, 2.0])
    if kw["labels"]:
        kw["shift"] = rng.random() < 0.3  # shift moves the labels: it needs them
        if rng.random() < 0.6:
            kw["hard_weight"] = rng.choice([0.5, 1.0])
        if rng.random() < 0.3:
            kw["ignore_index"] = rng.choice([-1, 0])  # a valid class too: its labels are then ignored
    if rng.random() < 0.3:
        kw["softcap"] = rng.choice([4.0, 30.0])
    if kw["reduction"] != "none" and rng.random() < 0.3:
        kw["num_items"] = rng.choice([1.0, 7.0])
    if rng.random() < 0.3:
        kw["vocab_size"] = kw["label_vocab"] = rng.randint(1, V)
    if rng.random() < 0.2:
        kw["requires"] = rng.choice([("h",), ("W",), ("W", "b"), ("b",)])
    with cpu_16bit_gemm(rng.choice(CPU_16BIT_GEMMS)):
        check_case(device, **kw)
