"""Oracle of the loss ops (distill_loss and the fused linear losses), written
from DESIGN.md §2 for clarity, not speed. Computes in float64 when given
float64 inputs (at least float32 otherwise)."""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _xdiff(x, lx, ly, live):
    """sum-term x * (lx - ly), exactly 0 where x == 0 or the entry is dead; the
    double `where` keeps -inf out of the backward pass too."""
    keep = live & (x > 0)
    return torch.where(keep, x * (torch.where(keep, lx, 0.0) - torch.where(keep, ly, 0.0)), 0.0)


def _safe_logaddexp(x, y, live):
    return torch.where(live, torch.logaddexp(torch.where(live, x, 0.0), torch.where(live, y, 0.0)), NEG_INF)


def taid_logit(a, b, lam):
    from_b = lam * b if lam > 0 else torch.zeros_like(b)
    from_a = (1 - lam) * a if lam < 1 else torch.zeros_like(a)
    return from_a + from_b


def divergence(lq, lp, kind, *, beta=0.5, alpha=0.1, a=None, b=None, taid_lambda=None):
    """Per-token divergence from log-probabilities lq (student) and lp (teacher)."""
    live = (lq > NEG_INF) | (lp > NEG_INF)
    q, p = lq.exp(), lp.exp()
    if kind == "fkl":
        terms = _xdiff(p, lp, lq, live)
    elif kind == "rkl":
        terms = _xdiff(q, lq, lp, live)
    elif kind == "jsd":
        lm = _safe_logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq, live)
        terms = beta * _xdiff(p, lp, lm, live) + (1 - beta) * _xdiff(q, lq, lm, live)
    elif kind == "skl":
        la = math.log(alpha) if alpha > 0 else NEG_INF
        lmix = _safe_logaddexp(la + lp, math.log1p(-alpha) + lq, live)
        terms = _xdiff(p, lp, lmix, live)
    elif kind == "srkl":
        la = math.log(alpha) if alpha > 0 else NEG_INF
        lmix = _safe_logaddexp(math.log1p(-alpha) + lp, la + lq, live)
        terms = _xdiff(q, lq, lmix, live)
    elif kind == "tvd":
        terms = 0.5 * (p - q).abs()
    elif kind == "taid":
        lr = torch.log_softmax(taid_logit(a.detach(), b, taid_lambda), dim=-1)
        terms = _xdiff(lr.exp(), lr, lq, live | (lr > NEG_INF))
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return _nan_rows_stay_nan(terms.sum(-1), lq, lp)


def _nan_rows_stay_nan(per_row, *log_probs):
    """per_row, NaN where any of the rows of log_probs holds a NaN (a NaN or
    +inf logit makes log_softmax's whole row NaN). The `p > 0` masks of
    _xdiff would otherwise drop such a row as if it were 0."""
    nan_row = torch.zeros_like(per_row, dtype=torch.bool)
    for lx in log_probs:
        nan_row = nan_row | lx.isnan().any(-1)
    return torch.where(nan_row, float("nan"), per_row)


def _reduce(per_token, valid, reduction, num_items):
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    denom = num_items if num_items is not None else valid.sum().clamp_min(1).to(per_token.dtype)
    return total / denom


def distill_loss(student_logits, teacher_logits, *, divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1,
                 taid_lambda=None, labels=None, ignore_index=-100, weights=None, hard_weight=0.0, soft_weight=1.0,
                 t2_scaling=False, vocab_size=None, reduction="mean", num_items=None, return_stats=False,
                 inplace_backward=False):
    """Oracle of :func:`flashkd.distill_loss` (same arguments)."""
    dt = _compute_dtype(student_logits, teacher_logits)
    V = student_logits.shape[-1]
    vocab = V if vocab_size is None else vocab_size
    s = student_logits[..., :vocab].to(dt)
    t = teacher_logits[..., :vocab].detach().to(dt)
    a, b = s / temperature, t / temperature
    lq, lp = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    div = globals()["divergence"](lq, lp, divergence, beta=beta, alpha=alpha, a=a, b=b, taid_lambda=taid_lambda)
    lead = s.shape[:-1]
    valid = torch.ones(lead, dtype=torch.bool, device=s.device)
    per_token = soft_weight * (temperature ** 2 if t2_scaling else 1.0) * div
    if labels is not None:
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        ce = torch.logsumexp(s, -1) - s.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        if hard_weight:
            per_token = per_token + hard_weight * ce
    per_token = torch.where(valid, per_token, 0.0)
    if weights is not None:
        per_token = per_token * weights.to(dt)
    loss = _reduce(per_token, valid, reduction, num_items)
    if not return_stats:
        return loss
    with torch.no_grad():
        entropy = lambda l: _nan_rows_stay_nan(-_xdiff(l.exp(), l, torch.zeros_like(l), l > NEG_INF).sum(-1), l)
        stats = {"divergence": div, "student_entropy": entropy(lq), "teacher_entropy": entropy(lp)}
        if labels is not None:
            idx = torch.where(valid, labels, 0).unsqueeze(-1)
            stats["student_logprob"] = torch.where(valid, lq.gather(-1, idx).squeeze(-1), 0.0)
            stats["teacher_logprob"] = torch.where(valid, lp.gather(-1, idx).squeeze(-1), 0.0)
        else:
            stats["student_logprob"] = torch.zeros(lead, dtype=dt, device=s.device)
            stats["teacher_logprob"] = torch.zeros(lead, dtype=dt, device=s.device)
        stats["agree"] = s.argmax(-1) == t.argmax(-1)
    return loss, stats


def head_logits(hidden, weight, bias, dt):
    z = hidden.to(dt) @ weight.to(dt).T
    return z if bias is None else z + bias.to(dt)


def _shifted(labels, ignore_index):
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def soft_cap(logits, softcap):
    """softcap * tanh(logits / softcap): the logit soft cap of the linear losses
    (DESIGN.md §2); the logits unchanged when softcap is None."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def cross_entropy(logits, targets, *, ignore_index=-100, softcap=None, label_smoothing=0.0, z_loss=0.0,
                  weights=None, reduction="mean", num_items=None, shift=False, return_lse=False):
    """The loss of :func:`linear_cross_entropy` on given (pre-cap) logits (..., V)."""
    z = soft_cap(logits, softcap)
    labels = _shifted(targets, ignore_index) if shift else targets
    valid = labels != ignore_index
    lse = torch.logsumexp(z, -1)
    safe = torch.where(valid, labels, 0)
    nll = lse - z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    smooth = lse - z.mean(-1)
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse ** 2
    per_token = torch.where(valid, per_token, 0.0)
    if weights is not None:
        per_token = per_token * weights.to(z.dtype)
    loss = _reduce(per_token, valid, reduction, num_items)
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(hidden, weight, targets, bias=None, *, chunk_budget_bytes=None, **options):
    """Oracle of :func:`flashkd.linear_cross_entropy`: materializes the logits (options
    as :func:`cross_entropy`; chunk_budget_bytes is accepted and ignored)."""
    return cross_entropy(head_logits(hidden, weight, bias, _compute_dtype(hidden, weight)), targets, **options)


def linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                        teacher_logits=None, student_bias=None, teacher_bias=None, softcap=None, shift=False,
                        chunk_budget_bytes=None, labels=None, ignore_index=-100, **options):
    """Oracle of :func:`flashkd.linear_distill_loss`: materializes both logits."""
    dt = _compute_dtype(student_hidden, student_weight)
    zs = soft_cap(head_logits(student_hidden, student_weight, student_bias, dt), softcap)
    V = zs.shape[-1]
    if teacher_logits is not None:
        zt = teacher_logits[..., :V].to(dt)
    else:
        zt = head_logits(teacher_hidden, teacher_weight, teacher_bias, dt)[..., :V]
    if shift and labels is not None:
        labels = _shifted(labels, ignore_index)
    return distill_loss(zs, zt, labels=labels, ignore_index=ignore_index, **options)
