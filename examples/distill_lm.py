#!/usr/bin/env python
"""End-to-end knowledge distillation of a small decoder LM with flashkd.

1. Make deterministic synthetic text: a "skip-bigram" Markov chain over a
   vocabulary of a few hundred to a few thousand tokens. Each token follows
   either the previous token (probability ``mix``) or the one before it, via
   sparse random successor tables, so the next-token distribution is soft
   (several plausible continuations) and needs attention to two positions.
   Nothing is downloaded; the seed fixes everything.
2. Train a teacher LM briefly with cross-entropy (flashkd.linear_cross_entropy).
3. From the same init, with the same batches, train two identical students on
   ``hard_weight * CE(labels) + soft_weight * T^2 * D(teacher || student)``:
     - fused:     flashkd.nn.LinearDistillLoss on (student hidden, head
                  weight) and (teacher hidden, head weight); logits never exist;
     - reference: flashkd.reference.linear_distill_loss, plain torch on
                  materialized float32 logits, same options.
4. Print both loss curves, their max abs difference and the wall times; plot
   them (PNG, needs matplotlib). Exit status 1 if the curves differ by more than
   ``--tol`` at any step (default 1e-3, absolute, on losses of order 1-5;
   both runs start from the same parameters, so the only difference is float
   rounding in the loss and its gradient, which training slowly amplifies).

    python examples/distill_lm.py --size tiny            # seconds
    python examples/distill_lm.py --size full            # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import flashkd
from flashkd import reference
from flashkd.models import DecoderLM, LMConfig
from flashkd.nn import LinearCrossEntropyLoss, LinearDistillLoss


@dataclass(frozen=True)
class Size:
    vocab: int
    seq_len: int
    batch: int
    teacher: LMConfig
    student: LMConfig
    teacher_steps: int
    student_steps: int
    n_train: int  # training sequences
    lr: float = 3e-3


def _lm(vocab, seq_len, dim, n_layers, n_heads, mlp_hidden):
    return LMConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, mlp_hidden=mlp_hidden,
                    max_seq_len=seq_len, tie_head=True)


SIZES = {
    "tiny": Size(256, 32, 16, _lm(256, 32, 64, 2, 4, 128), _lm(256, 32, 32, 1, 2, 64),
                 teacher_steps=60, student_steps=40, n_train=1024),
    "small": Size(512, 64, 16, _lm(512, 64, 128, 2, 4, 256), _lm(512, 64, 64, 2, 4, 128),
                  teacher_steps=200, student_steps=150, n_train=4096),
    "full": Size(2048, 64, 16, _lm(2048, 64, 128, 2, 4, 384), _lm(2048, 64, 64, 2, 4, 192),
                 teacher_steps=400, student_steps=300, n_train=8192),
}


# --------------------------------------------------------------------- data
class SkipBigramChain:
    """x_t ~ mix * A[x_{t-1}, :] + (1 - mix) * B[x_{t-2}, :].

    A and B are sparse row-stochastic (``k`` random successors per token with
    skewed random weights), generated from ``seed``.
    """

    def __init__(self, vocab: int, *, k: int = 6, mix: float = 0.7, seed: int = 0):
        self.vocab, self.k, self.mix = vocab, k, mix
        g = torch.Generator().manual_seed(seed)
        self.succ = [torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(vocab)]) for _ in range(2)]
        self.prob = []
        for _ in range(2):
            w = torch.rand(vocab, k, generator=g, dtype=torch.float64).pow(3) + 1e-3  # skewed weights
            self.prob.append(w / w.sum(-1, keepdim=True))

    def dense(self, which: int) -> torch.Tensor:
        out = torch.zeros(self.vocab, self.vocab, dtype=torch.float64)
        return out.scatter_(1, self.succ[which], self.prob[which])

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """n sequences of ``length`` tokens (int64)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(n, length, dtype=torch.long)
        x[:, :2] = torch.randint(0, self.vocab, (n, 2), generator=g)
        for t in range(2, length):
            first = torch.rand(n, generator=g) < self.mix
            ctx = torch.where(first, x[:, t - 1], x[:, t - 2])
            pick = torch.multinomial(torch.where(first[:, None], self.prob[0][ctx], self.prob[1][ctx]), 1,
                                     generator=g).squeeze(1)
            succ = torch.where(first[:, None], self.succ[0][ctx], self.succ[1][ctx])
            x[:, t] = succ.gather(1, pick[:, None]).squeeze(1)
        return x

    def entropy_rate(self, x: torch.Tensor) -> float:
        """Mean -log P_true(x_t | x_{t-1}, x_{t-2}) over positions t >= 2: the
        cross-entropy floor a perfect model reaches on x."""
        A, B = self.dense(0), self.dense(1)
        p = self.mix * A[x[:, 1:-1], x[:, 2:]] + (1 - self.mix) * B[x[:, :-2], x[:, 2:]]
        return float(-p.log().mean())


# ----------------------------------------------------------------- training
def _optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def _lr_at(step, steps, lr):
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def _batches(n_train, batch, steps, seed):
    """Batch indices for every step, fixed by the seed (shared by both students)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n_train, generator=g) for _ in range(steps * batch // n_train + 1)])
    return order[: steps * batch].view(steps, batch)


def _log_every(steps):
    return max(1, steps // 20)


def train_teacher(size, data, args, log):
    model = DecoderLM(size.teacher, seed=args.seed + 1).to(args.device)
    opt = _optimizer(model, size.lr)
    ce = LinearCrossEntropyLoss()
    steps = size.teacher_steps
    idx = _batches(len(data), size.batch, steps, args.seed + 2)
    t0, every = time.perf_counter(), _log_every(steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, size.lr)
        x = data[idx[step]].to(args.device)
        loss = ce(model(x[:, :-1]), model.head_weight, x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps - 1:
            log(f"  teacher step {step:4d}/{steps}  CE {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)")
    model.eval().requires_grad_(False)
    return model, time.perf_counter() - t0


def train_student(kind, size, data, teacher, args, options, log):
    """Train a student with the fused (``kind="fused"``) or plain-torch
    (``kind="reference"``) distillation loss. Returns per-step losses and timings."""
    model = DecoderLM(size.student, seed=args.seed + 3).to(args.device)
    opt = _optimizer(model, size.lr)
    fused = LinearDistillLoss(**options)
    steps = size.student_steps
    idx = _batches(len(data), size.batch, steps, args.seed + 4)
    losses, loss_time = [], 0.0
    t0, every = time.perf_counter(), _log_every(steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, size.lr)
        x = data[idx[step]].to(args.device)
        inputs, labels = x[:, :-1], x[:, 1:]
        with torch.no_grad():
            t_hidden = teacher(inputs)
        opt.zero_grad(set_to_none=True)
        hidden = model(inputs)
        # Two-stage backward so the loss's own forward+backward can be timed:
        # the loss sees a detached leaf, then its gradient is pushed through the model.
        leaf = hidden.detach().requires_grad_(True)
        _sync(args.device)
        tl = time.perf_counter()
        if kind == "fused":
            loss = fused(leaf, model.head_weight, t_hidden, teacher.head_weight, labels=labels)
        else:
            loss = reference.linear_distill_loss(leaf, model.head_weight, t_hidden, teacher.head_weight,
                                                 labels=labels, **options)
        loss.backward()  # grads to `leaf` and (directly) to the tied head weight
        _sync(args.device)
        loss_time += time.perf_counter() - tl
        hidden.backward(leaf.grad)
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps - 1:
            log(f"  {kind:9s} step {step:4d}/{steps}  loss {losses[-1]:.5f}  ({time.perf_counter() - t0:.1f}s)")
    return model, {"losses": losses, "wall_s": time.perf_counter() - t0, "loss_s": loss_time}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def heldout_ce(model, x):
    """Mean next-token cross-entropy at positions t >= 2 (the chain's floor is defined there)."""
    logits = model.logits(x[:, :-1])[:, 1:].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 2:].reshape(-1)))


# --------------------------------------------------------------------- output
def pyplot(path, log):
    """matplotlib.pyplot on the file-only Agg backend, or None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: skipping the plot ({path})")
        return None
    return plt


def save_figure(plt, fig, path):
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plot(path, steps, fused, ref, tol, title, log):
    plt = pyplot(path, log)
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    ax1.plot(steps, ref, label="reference (plain torch, materialized logits)", lw=2.5, alpha=0.6)
    ax1.plot(steps, fused, label="flashkd LinearDistillLoss (fused)", lw=1.2, ls="--")
    ax1.set_ylabel("distillation loss")
    ax1.set_title(title)
    ax1.legend()
    nz = [(s, abs(a - b)) for s, a, b in zip(steps, fused, ref) if a != b]
    if nz:
        ax2.semilogy(*zip(*nz), ".", color="C3", ms=3, label="|fused - reference| (steps with equal losses omitted)")
    ax2.axhline(tol, color="k", lw=1, ls=":", label=f"tolerance {tol:g}")
    ax2.set_yscale("log")
    ax2.set_ylabel("abs difference")
    ax2.legend(fontsize=8, loc="center right")
    ax2.set_xlabel("step")
    return save_figure(plt, fig, path)


def common_parser(doc, default_size, plot_name):
    """The options both examples take; `doc` is the script's docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=default_size,
                   help="tiny: seconds; small: ~1 min; full: vocab 2048, a few minutes on 2 CPU cores")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: per size)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: per size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), plot_name),
                   help=f"PNG of both curves (default examples/{plot_name}; '' for none)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: deterministic, and immune to oversubscription on a "
                        "shared machine; raise it on an idle many-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_with_threads(run, args) -> int:
    """run(args) with torch limited to --threads CPU threads, restored afterwards."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def parse_args(argv=None):
    p = common_parser(__doc__, "small", "distill_lm.png")
    p.add_argument("--divergence", default="fkl", choices=[d for d in flashkd.DIVERGENCES if d != "taid"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per size)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="max allowed |fused - reference| loss difference at any step (default 1e-3)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the example; returns the exit status (0: curves agree within --tol)."""
    return run_with_threads(run, parse_args(argv))


def run(args) -> int:
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    size = SIZES[args.size]
    size = dataclasses.replace(size, student_steps=args.steps or size.student_steps,
                               teacher_steps=args.teacher_steps or size.teacher_steps, lr=args.lr or size.lr)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    chain = SkipBigramChain(size.vocab, seed=args.seed)
    data = chain.sample(size.n_train, size.seq_len + 1, seed=args.seed + 100)
    heldout = chain.sample(256, size.seq_len + 1, seed=args.seed + 200).to(args.device)
    floor = chain.entropy_rate(heldout.cpu())
    unigram = torch.bincount(data.flatten(), minlength=size.vocab).double() / data.numel()
    unigram_h = float(-(unigram[unigram > 0] * unigram[unigram > 0].log()).sum())
    log(f"data: skip-bigram chain, vocab {size.vocab}, {size.n_train} x {size.seq_len + 1} tokens; "
        f"entropy floor {floor:.3f} nats/token (unigram {unigram_h:.3f})")
    log(f"teacher {DecoderLM(size.teacher).num_parameters():,} params, "
        f"student {DecoderLM(size.student).num_parameters():,} params, device {args.device}, "
        f"torch threads {torch.get_num_threads()}")

    log(f"[1/3] teacher: {size.teacher_steps} steps of cross-entropy")
    teacher, teacher_s = train_teacher(size, data, args, log)
    teacher_ce = heldout_ce(teacher, heldout)
    log(f"  teacher held-out CE {teacher_ce:.4f} (floor {floor:.4f}, unigram {unigram_h:.4f}), {teacher_s:.1f}s")

    options = dict(divergence=args.divergence, temperature=args.temperature, hard_weight=0.5, soft_weight=0.5,
                   t2_scaling=True)
    log(f"[2/3] student, fused flashkd loss: {options}")
    s_fused, fused = train_student("fused", size, data, teacher, args, options, log)
    log("[3/3] student, plain-torch reference loss (same init, same batches)")
    s_ref, ref = train_student("reference", size, data, teacher, args, options, log)

    steps = size.student_steps
    diffs = [abs(a - b) for a, b in zip(fused["losses"], ref["losses"])]
    max_diff = max(diffs)
    every = _log_every(steps)
    shown = sorted(set(range(0, steps, every)) | {steps - 1})
    print(f"\n{'step':>6} {'fused':>10} {'reference':>10} {'|diff|':>10}")
    for s in shown:
        print(f"{s:6d} {fused['losses'][s]:10.5f} {ref['losses'][s]:10.5f} {diffs[s]:10.2e}")
    ce_fused, ce_ref = heldout_ce(s_fused, heldout), heldout_ce(s_ref, heldout)
    ok = max_diff <= args.tol and all(math.isfinite(v) for v in fused["losses"] + ref["losses"])
    print(f"\nmax |fused - reference| over {steps} steps: {max_diff:.3e} (step 0: {diffs[0]:.1e}; "
          f"tolerance {args.tol:g}) -> {'OK' if ok else 'MISMATCH'}")
    print(f"final loss: fused {fused['losses'][-1]:.5f}, reference {ref['losses'][-1]:.5f} "
          f"(first {fused['losses'][0]:.5f})")
    print(f"held-out CE: teacher {teacher_ce:.4f}, student fused {ce_fused:.4f}, student reference {ce_ref:.4f} "
          f"(floor {floor:.4f}, unigram {unigram_h:.4f})")
    print(f"wall time: fused run {fused['wall_s']:.1f}s (loss fwd+bwd {fused['loss_s']:.2f}s), reference run "
          f"{ref['wall_s']:.1f}s (loss fwd+bwd {ref['loss_s']:.2f}s), teacher {teacher_s:.1f}s, "
          f"total {time.perf_counter() - t_start:.1f}s")

    title = (f"{args.size}: {args.divergence}, T={args.temperature:g}, vocab {size.vocab}, "
             f"max |diff| {max_diff:.1e}")
    plot = write_plot(args.plot, list(range(steps)), fused["losses"], ref["losses"], args.tol,
                      title, log) \
        if args.plot else None
    if plot:
        print(f"plot: {plot}")
    results = {"ok": ok, "tol": args.tol, "max_diff": max_diff, "size": args.size, "options": options,
               "fused": fused, "reference": ref, "teacher_s": teacher_s,
               "heldout_ce": {"teacher": teacher_ce, "fused": ce_fused, "reference": ce_ref,
                              "floor": floor, "unigram": unigram_h},
               "total_s": time.perf_counter() - t_start, "plot": plot}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
