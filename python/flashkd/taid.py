"""Schedules of the TAID interpolation weight lambda (Shing et al., 2025,
"TAID: Temporally Adaptive Interpolated Distillation")."""
from __future__ import annotations

import math


def _sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow: a loss rising from near 0 gives a
    relative change, and so a momentum, of any size."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDSchedule:
    """Produces lambda in [lambda_start, lambda_end] over ``total_steps``.

    ``mode="linear"`` (default): lambda_n = start + (end - start) * n / total_steps.

    ``mode="adaptive"``, the paper's rule: after each step, with the TAID loss
    J_n passed to :meth:`step`,

        delta_n  = (J_{n-1} - J_n) / (J_{n-1} + eps)        relative improvement
        m_n      = momentum * m_{n-1} + (1 - momentum) * delta_n
        lambda  <- clip(lambda + rate * sigmoid(m_n) * (1 - lambda),
                        lower = linear lambda_n, upper = lambda_end)

    so lambda moves towards the teacher faster while the student is improving,
    and never falls behind the linear schedule.

    Usage::

        sched = flashkd.TAIDSchedule(total_steps=1000)
        for batch in data:
            loss = flashkd.distill_loss(s, t, divergence="taid", taid_lambda=sched.value)
            ...
            sched.step(loss.item())   # the loss is only read in adaptive mode
    """

    def __init__(self, total_steps: int, lambda_start: float = 0.1, lambda_end: float = 1.0,
                 mode: str = "linear", rate: float = 5e-4, momentum: float = 0.99, eps: float = 1e-8):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not 0.0 <= lambda_start <= lambda_end <= 1.0:
            raise ValueError(f"need 0 <= lambda_start <= lambda_end <= 1, got {lambda_start}, {lambda_end}")
        if mode not in ("linear", "adaptive"):
            raise ValueError(f"mode must be 'linear' or 'adaptive', got {mode!r}")
        if rate < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError("rate must be >= 0 and momentum in [0, 1)")
        self.total_steps, self.lambda_start, self.lambda_end = total_steps, lambda_start, lambda_end
        self.mode, self.rate, self.momentum, self.eps = mode, rate, momentum, eps
        self.steps = 0
        self.value = lambda_start
        self._momentum_value = 0.0
        self._last_loss = None

    def linear_value(self, step: int) -> float:
        frac = min(max(step / self.total_steps, 0.0), 1.0)
        return self.lambda_start + (self.lambda_end - self.lambda_start) * frac

    def step(self, loss: float | None = None) -> float:
        """Advances one training step and returns the new lambda."""
        if self.mode == "adaptive":
            if loss is None:
                raise ValueError("TAIDSchedule(mode='adaptive').step needs the step's loss")
            loss = float(loss)
            if not math.isfinite(loss):
                # A NaN would stay in the momentum for good and pin lambda to the linear floor.
                raise ValueError(f"TAIDSchedule.step needs a finite loss, got {loss}")
        self.steps += 1
        floor = self.linear_value(self.steps)
        if self.mode == "linear":
            self.value = floor
            return self.value
        if self._last_loss is not None:
            delta = (self._last_loss - loss) / (self._last_loss + self.eps)
            self._momentum_value = self.momentum * self._momentum_value + (1 - self.momentum) * delta
        self._last_loss = loss
        sigmoid = _sigmoid(self._momentum_value)
        proposed = self.value + self.rate * sigmoid * (1.0 - self.value)
        self.value = min(self.lambda_end, max(floor, proposed))
        return self.value

    def state_dict(self):
        return {k: getattr(self, k) for k in ("steps", "value", "_momentum_value", "_last_loss")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)
