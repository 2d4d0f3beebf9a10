"""flashkd.distill_loss on random combinations of every option at once
(checks.RANDOM_CASES cases), judged by the tolerance model of
tests/distill_cases.py."""
import math
import random

import pytest
import torch

from checks import RANDOM_CASES
from distill_cases import (  # noqa: F401  (fixture)
    DIVS, DTYPES, check_run, default_cot, device, gen, logits, make_weights, run_all,
)


# test_distill.py varies one or two options at a time. Here each case draws all
# of them at once (divergence and its parameter, dtypes, leading dims,
# vocabulary and padding, temperature, labels with any ignore_index, hard and
# soft weights, token weights, reduction and num_items, statistics, strided
# layouts, large logits, masked classes) from a generator seeded by the case
# number, and is judged by the same tolerance model (checks.RANDOM_CASES cases).


def draw_options(rng):
    """Random distill_loss options: (kw without labels/weights, leading dims, V, label plan)."""
    div = rng.choice(DIVS)
    kw = dict(divergence=div, reduction=rng.choice(["none", "sum", "mean", "batchmean"]),
              t2_scaling=rng.random() < 0.3, return_stats=rng.random() < 0.3)
    if div == "jsd":
        kw["beta"] = rng.choice([0.5, 0.1, 0.9, rng.uniform(0.01, 0.99)])
    if div in ("skl", "srkl"):
        kw["alpha"] = rng.choice([0.1, 0.0, 0.5, 0.99, rng.uniform(0.0, 0.99)])
    if div == "taid":
        kw["taid_lambda"] = rng.choice([0.0, 1.0, 0.4, rng.uniform(0.0, 1.0)])
    if rng.random() < 0.5:
        kw["temperature"] = rng.choice([0.5, 1.3, 2.0, 3.7])
    if rng.random() < 0.3:
        kw["soft_weight"] = rng.choice([0.0, 0.5, 2.0])
    if kw["reduction"] != "none" and rng.random() < 0.3:
        kw["num_items"] = rng.choice([1.0, 7.0, 123.5])
    lead = tuple(rng.choice([1, 2, 3, 5, 8]) for _ in range(rng.choice([0, 1, 1, 2, 3])))
    V = rng.choice([1, 2, 3, 5, 16, 17, 31, 64, 100, 257, 1000, 3001])
    if V > 1 and rng.random() < 0.3:
        kw["vocab_size"] = rng.randint(1, V)
    labels = None
    if lead and rng.random() < 0.6:
        # ignore_index may be a valid class (0): those labels are then ignored
        labels = dict(ignore_index=rng.choice([-100, -1, 0]), frac_ignored=rng.choice([0.0, 0.3, 1.0]),
                      hard_weight=rng.choice([0.0, 0.5, 1.0, 0.13]))
    return kw, lead, V, labels


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_option_combinations(case, device):
    rng = random.Random(f"distill-{case}")
    kw, lead, V, label_plan = draw_options(rng)
    vocab = kw.get("vocab_size") or V
    dt, tdt = rng.choice(list(DTYPES.values())), rng.choice(list(DTYPES.values()))
    g = gen("random", case)
    if label_plan:
        lab = torch.randint(0, vocab, lead, generator=g)
        drop = torch.rand(lead, generator=g) < label_plan["frac_ignored"]
        kw["labels"] = torch.where(drop, label_plan["ignore_index"], lab).to(device)
        kw["ignore_index"] = label_plan["ignore_index"]
        kw["hard_weight"] = label_plan["hard_weight"]
    if lead and rng.random() < 0.4:
        kw["weights"] = make_weights(lead, g, device)
    scale = rng.choice([1.0, 2.0, 10.0, 30.0])
    layout = rng.choice(["contiguous", "contiguous", "sliced_vocab", "transposed_lead"])
    if layout == "sliced_vocab":
        base_shape, view = (*lead, 2 * V), (lambda x: x[..., ::2])
    elif layout == "transposed_lead" and len(lead) >= 2:
        base_shape, view = (lead[1], lead[0], *lead[2:], V), (lambda x: x.transpose(0, 1))
    else:
        base_shape, view = (*lead, V), (lambda x: x)
    s_base = logits(base_shape, g, dt, scale=scale)
    t = logits((*lead, V), g, tdt, scale=scale)
    if V > 2 and rng.random() < 0.15:
        # Masked classes, -inf in both (never the labels' or column 0)
        mask = torch.rand((*lead, V), generator=g) < 0.2
        mask[..., 0] = False
        if "labels" in kw:
            mask = mask.scatter(-1, kw["labels"].cpu().clamp(0, V - 1).unsqueeze(-1), False)
        base_mask = torch.zeros(base_shape, dtype=torch.bool)
        view(base_mask)[...] = mask
        s_base, t = s_base.masked_fill(base_mask, -math.inf), t.masked_fill(mask, -math.inf)
    s_base, t = s_base.to(device), t.to(device)
    # A per-token cotangent makes the kernel round the gradient twice (stored
    # in forward, scaled in backward): held to that model in float32 only; on
    # a few rows of bf16/fp16 "no worse than torch, which rounds once" is then
    # a matter of luck (test_distill.py::test_grad_output_scaling covers that path).
    cot = default_cot(lead, g, device) if kw["reduction"] == "none" and dt == torch.float32 else None
    r = run_all(s_base, t, view=view, cot=cot, **kw)
    check_run(r, view(s_base), t, kw, dtype=dt, rounds=1 if cot is None else 2)
