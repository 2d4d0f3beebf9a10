"""The tolerance model shared by the tests of the two linear losses
(linear_ce_cases.py and linear_distill_cases.py give the reasoning). A result passes when, element by element,

    |kernel - oracle| <= SLACK * max|plain - oracle| + (noise + u) * scale + extra
                         + K_TERMS * (noise + u) * terms,

plain being plain torch in the inputs' dtype, noise the float32 noise level of
the case, u the unit roundoff of the dtype the result is stored in, scale the
largest magnitude of the oracle's result, extra an absolute allowance, and terms
(for gradients) the sum of the magnitudes of the products an element is summed
from (product_magnitudes): a dot product keeps the noise of its products however
much it cancels.
"""
import os

import torch

from flashkd import reference as R

EPS32 = 2.0 ** -24
SLACK = 2.0  # "no worse than plain torch", with room for a different summation order
K_FLOOR = 8.0
# Calibrated on the random cases of test_linear_distill_random.py: 12000 pass at 0.25, one of
# 6000 fails at 0.1; at 0.25 a gradient scaled by 1 + 1e-4 still fails 94 of the 207
# float32 cases among the first 300 (108 without this term; the others have zero
# gradients or coarser bounds elsewhere).
K_TERMS = 0.25
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
REPORT_TOL = bool(os.environ.get("FLASHKD_TEST_REPORT_TOL"))  # pytest -s prints each error and bound


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(name, k, o, p, noise, min_scale=0.0, unit=0.0, terms=None, extra=0.0):
    """Kernel result k against the oracle's o and plain torch's p (module docstring).
    min_scale: the size of the terms the result is made of, where the result itself
    cancels to ~0. unit: unit roundoff of the dtype the result is stored in. terms: per
    element, product_magnitudes of a gradient. extra: an absolute allowance."""
    if o is None:
        assert k is None, f"{name}: kernel returned a value where the oracle has none"
        return
    assert k is not None, f"{name}: kernel returned nothing"
    assert k.shape == o.shape, f"{name}: shape {tuple(k.shape)} != {tuple(o.shape)}"
    assert not torch.isnan(k).any(), f"{name}: NaN in the kernel's result"
    scale = max(o.abs().max().item() if o.numel() else 0.0, min_scale)
    bound = SLACK * max_err(p, o) + (noise + unit) * scale + extra
    per_element = torch.zeros(o.shape, dtype=torch.float64) if terms is None else \
        K_TERMS * (noise + unit) * terms.cpu()
    bound = bound + per_element
    err = (k.double().cpu() - o.double().cpu()).abs()
    i = int(torch.argmax((err - bound).reshape(-1))) if err.numel() else 0
    worst = (err.reshape(-1)[i].item(), bound.reshape(-1)[i].item()) if err.numel() else (0.0, 0.0)
    if REPORT_TOL:
        print(f"TOL {name}: kernel {worst[0]:.2e} plain {max_err(p, o):.2e} bound {worst[1]:.2e} "
              f"ratio {worst[0] / worst[1] if worst[1] else 0.0:.3f}")
    assert (err <= bound).all(), (f"{name}: |kernel - oracle| = {worst[0]:.3e} > bound {worst[1]:.3e} at flat "
                                  f"index {i} (plain torch error {max_err(p, o):.3e}, scale {scale:.3e})")


def product_magnitudes(inp, view, M):
    """Per element of d hidden, d weight, d bias of a linear head whose logit gradient
    is G: the sums of the magnitudes of the products it is made of, given M >= |G|
    elementwise: M @ |W|, M^T |h|, sum M (in the leaves' layouts, through `view`, which
    maps the hidden leaf to the hidden passed in). {"h"|"W"|"b": tensor or None}."""
    mags = {k: None if inp[k] is None else inp[k].detach().double().abs().requires_grad_() for k in ("h", "W", "b")}
    h = mags["h"] if view is None else view(mags["h"])
    (R.head_logits(h, mags["W"], mags["b"], torch.float64) * M).sum().backward()
    return {k: None if t is None else t.grad for k, t in mags.items()}
