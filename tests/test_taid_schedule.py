"""flashkd.TAIDSchedule: the linear and adaptive schedules of TAID's
lambda, their state, bad arguments, and lambda driving distill_loss."""
import pytest
import torch

import flashkd

from distill_cases import device, gen, logits  # noqa: F401  (fixture)


def test_taid_schedule_linear():
    sched = flashkd.TAIDSchedule(total_steps=10, lambda_start=0.2, lambda_end=0.9)
    assert sched.value == 0.2
    values = [sched.step() for _ in range(14)]
    for n, v in enumerate(values, start=1):
        assert v == pytest.approx(0.2 + 0.7 * min(n, 10) / 10, abs=1e-12)
    assert sched.value == pytest.approx(0.9)
    state = sched.state_dict()
    other = flashkd.TAIDSchedule(total_steps=10, lambda_start=0.2, lambda_end=0.9)
    other.load_state_dict(state)
    assert other.steps == 14 and other.value == sched.value


def test_taid_schedule_adaptive():
    """Adaptive lambda stays within [linear schedule, lambda_end] and rises
    faster while the loss falls than while it rises."""
    def run(losses):
        sched = flashkd.TAIDSchedule(total_steps=400, lambda_start=0.1, lambda_end=0.8, mode="adaptive",
                                     rate=0.02, momentum=0.5)
        vals = []
        for n, loss in enumerate(losses, start=1):
            v = sched.step(loss)
            assert sched.linear_value(n) - 1e-12 <= v <= 0.8 + 1e-12
            vals.append(v)
        return vals

    steps = 60
    falling = run([10.0 * 0.9 ** n for n in range(steps)])
    rising = run([1.0 * 1.1 ** n for n in range(steps)])
    assert all(b > a for a, b in zip(falling, falling[1:]) if a < 0.8)
    assert all(f > r for f, r in zip(falling[5:], rising[5:]))
    assert falling[-1] > flashkd.TAIDSchedule(total_steps=400, lambda_start=0.1, lambda_end=0.8).linear_value(steps)
    long = run([1.0 / (n + 1) for n in range(2000)])
    assert long[-1] == pytest.approx(0.8)  # reaches lambda_end and stays there
    with pytest.raises(ValueError, match="loss"):
        flashkd.TAIDSchedule(total_steps=5, mode="adaptive").step()


def test_taid_schedule_adaptive_extreme_losses():
    """A loss rising from near 0 makes the relative change, and the momentum,
    huge and negative: lambda keeps to the linear floor (math.exp overflowed
    here before). A non-finite loss is an error, not a momentum."""
    sched = flashkd.TAIDSchedule(total_steps=10, mode="adaptive", momentum=0.5)
    sched.step(1e-12)
    assert sched.step(5.0) == pytest.approx(sched.linear_value(2))
    state = sched.state_dict()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite loss"):
            sched.step(bad)
    assert sched.state_dict() == state  # a refused step changes nothing


@pytest.mark.parametrize("kwargs", [
    dict(total_steps=0), dict(total_steps=2.5), dict(total_steps=10, lambda_start=0.9, lambda_end=0.5),
    dict(total_steps=10, lambda_end=1.5), dict(total_steps=10, lambda_start=-0.1), dict(total_steps=10, mode="cosine"),
    dict(total_steps=10, rate=-1.0), dict(total_steps=10, momentum=1.0),
], ids=["steps0", "steps_float", "start_gt_end", "end_gt_1", "start_neg", "mode", "rate", "momentum"])
def test_taid_schedule_bad_args(kwargs):
    with pytest.raises(ValueError):
        flashkd.TAIDSchedule(**kwargs)


def test_taid_schedule_drives_the_loss(device):
    """The schedule's lambda is a valid taid_lambda, and lambda = 1 makes TAID
    the forward KL (r = p)."""
    g = gen("taid_sched")
    s, t = logits((4, 33), g, device=device), logits((4, 33), g, device=device)
    sched = flashkd.TAIDSchedule(total_steps=3, lambda_start=0.0, lambda_end=1.0)
    losses = []
    for _ in range(4):
        losses.append(flashkd.distill_loss(s, t, divergence="taid", taid_lambda=sched.value))
        sched.step()
    assert losses[0].abs() <= 1e-6  # lambda = 0: r = q, KL(q || q) = 0
    torch.testing.assert_close(losses[-1], flashkd.distill_loss(s, t, divergence="fkl"), rtol=1e-5, atol=1e-6)
    assert losses[1] < losses[2] < losses[3]
