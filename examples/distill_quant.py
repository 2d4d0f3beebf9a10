#!/usr/bin/env python
"""Quantization-aware distillation: a ternary (BitNet b1.58, w1.58a8) student
next to a float student, both distilled from the same teacher.

Data, teacher and schedule come from examples/distill_lm.py (a synthetic
skip-bigram language, a briefly trained teacher LM). From the same student
initialization and the same batches, two students train on
``0.5 * CE(labels) + 0.5 * T^2 * KL(teacher || student)`` with
flashkd.nn.LinearDistillLoss:
  - float:   the reference decoder LM as is;
  - w1.58a8: the same model after flashkd.quant.quantize_student(model,
             "w1.58a8"): every attention and MLP projection becomes a
             QuantLinear (ternary weights, int8 activations, integer GEMM,
             straight-through-estimator backward). The tied embedding / LM
             head stays in float, as in BitNet.
At the end the ternary student is frozen (2-bit packed weights) and evaluated
again: its held-out cross-entropy is unchanged. Prints both curves and writes
a PNG (needs matplotlib).

    python examples/distill_quant.py --size tiny     # seconds
    python examples/distill_quant.py --size full     # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time

import torch

from flashkd.models import DecoderLM
from flashkd.nn import LinearDistillLoss
from flashkd.quant import QuantLinear, freeze_student, quantize_student

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_distill_lm():
    spec = importlib.util.spec_from_file_location("distill_lm", os.path.join(_HERE, "distill_lm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


lm = _load_distill_lm()


def train_student(model, label, size, data, teacher, args, log):
    """Distills ``model`` in place; returns its per-step losses and wall time."""
    opt = lm._optimizer(model, size.lr)
    loss_fn = LinearDistillLoss(divergence="fkl", temperature=args.temperature, hard_weight=0.5, soft_weight=0.5,
                                t2_scaling=True)
    steps = size.student_steps
    idx = lm._batches(len(data), size.batch, steps, args.seed + 4)
    losses, t0, every = [], time.perf_counter(), lm._log_every(steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lm._lr_at(step, steps, size.lr)
        x = data[idx[step]].to(args.device)
        inputs, labels = x[:, :-1], x[:, 1:]
        with torch.no_grad():
            t_hidden = teacher(inputs)
        loss = loss_fn(model(inputs), model.head_weight, t_hidden, teacher.head_weight, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps - 1:
            log(f"  {label:7s} step {step:4d}/{steps}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f}s)")
    return losses, time.perf_counter() - t0


def write_plot(path, float_losses, ternary_losses, title, log):
    plt = lm.pyplot(path, log)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = range(len(float_losses))
    ax.plot(steps, float_losses, label="float student", lw=1.5)
    ax.plot(steps, ternary_losses, label="w1.58a8 student (ternary weights, int8 activations)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (0.5 CE + 0.5 T² KL)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return lm.save_figure(plt, fig, path)


def parse_args(argv=None):
    p = lm.common_parser(__doc__, "full", "distill_quant.png")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return lm.run_with_threads(run, parse_args(argv))


def run(args) -> int:
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    size = lm.SIZES[args.size]
    size = dataclasses.replace(size, student_steps=args.steps or size.student_steps,
                               teacher_steps=args.teacher_steps or size.teacher_steps)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    chain = lm.SkipBigramChain(size.vocab, seed=args.seed)
    data = chain.sample(size.n_train, size.seq_len + 1, seed=args.seed + 100)
    heldout = chain.sample(256, size.seq_len + 1, seed=args.seed + 200).to(args.device)
    floor = chain.entropy_rate(heldout.cpu())

    log(f"[1/3] teacher: {size.teacher_steps} steps of cross-entropy")
    teacher, teacher_s = lm.train_teacher(size, data, args, log)
    base = DecoderLM(size.student, seed=args.seed + 3).to(args.device)
    float_student = copy.deepcopy(base)
    ternary_student = quantize_student(copy.deepcopy(base), "w1.58a8")
    n_quant = sum(isinstance(m, QuantLinear) for m in ternary_student.modules())

    log("[2/3] float student")
    float_losses, float_s = train_student(float_student, "float", size, data, teacher, args, log)
    log(f"[3/3] w1.58a8 student ({n_quant} QuantLinear layers; same init, same batches)")
    ternary_losses, ternary_s = train_student(ternary_student, "w1.58a8", size, data, teacher, args, log)

    ce = {"teacher": lm.heldout_ce(teacher, heldout), "float": lm.heldout_ce(float_student, heldout),
          "w1.58a8": lm.heldout_ce(ternary_student, heldout)}
    freeze_student(ternary_student)
    ce["w1.58a8 frozen"] = lm.heldout_ce(ternary_student, heldout)
    packed = sum(m.weight_packed.numel() + 4 * m.weight_scale.numel()
                 for m in ternary_student.modules() if isinstance(m, QuantLinear))
    floats = sum(4 * m.in_features * m.out_features for m in ternary_student.modules() if isinstance(m, QuantLinear))

    def window(losses, first):
        part = losses[:5] if first else losses[-10:]
        return sum(part) / len(part)

    print(f"\n{'':10s} {'first 5':>9s} {'last 10':>9s} {'fall':>7s} {'held-out CE':>12s} {'train s':>8s}")
    for name, losses, secs in (("float", float_losses, float_s), ("w1.58a8", ternary_losses, ternary_s)):
        a, b = window(losses, True), window(losses, False)
        print(f"{name:10s} {a:9.4f} {b:9.4f} {1 - b / a:7.1%} {ce[name]:12.4f} {secs:8.1f}")
    print(f"teacher held-out CE {ce['teacher']:.4f} (entropy floor {floor:.4f}); frozen w1.58a8 student "
          f"{ce['w1.58a8 frozen']:.4f} with {packed / 2**10:.1f} KiB of packed projection weights "
          f"(float32: {floats / 2**10:.1f} KiB)")
    print(f"total {time.perf_counter() - t_start:.1f}s (teacher {teacher_s:.1f}s)")
    title = f"{args.size}: vocab {size.vocab}, student dim {size.student.dim} x {size.student.n_layers} layers"
    plot = write_plot(args.plot, float_losses, ternary_losses, title, log) if args.plot else None
    if plot:
        print(f"plot: {plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "float": float_losses, "w1.58a8": ternary_losses, "heldout_ce": ce,
                       "floor": floor, "plot": plot}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
