"""quantize_student on the reference LM and a plain MLP, and a short
quantization-aware distillation run: a ternary (w1.58a8) student learns from
a fixed teacher about as well as the float student."""
import copy

import pytest
import torch
from torch import nn

import flashkd
from flashkd.models import DecoderLM, LMConfig
from flashkd.quant import QuantLinear, freeze_student, quantize_student


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                         nn.Linear(32, 5))


@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_mlp_replaced_in_place(scheme):
    model = mlp()
    ref = copy.deepcopy(model)
    out = quantize_student(model, scheme, skip=("3",), group_size=16)
    assert out is model
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert type(model[3]) is nn.Linear  # skipped by its last name component
    assert torch.equal(model[0].weight, ref[0].weight) and torch.equal(model[0].bias, ref[0].bias)
    assert model[0].scheme == scheme and model[0].group_size == 16
    x = torch.randn(7, 12)
    y = model(x)
    y.sum().backward()
    assert y.shape == (7, 5) and model[0].weight.grad is not None
    with torch.no_grad():
        before = model(x)
        after = freeze_student(model)(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_skip_by_qualified_name_and_idempotent():
    model = quantize_student(mlp(), "w8a8", skip=("2.0",))
    assert type(model[2][0]) is nn.Linear and isinstance(model[0], QuantLinear)
    first = model[0]
    quantize_student(model, "w8a8", skip=())
    assert model[0] is first and isinstance(model[2][0], QuantLinear)


def test_lm_layers():
    model = DecoderLM(LMConfig.preset("tiny", tie_head=False), seed=0)
    quantize_student(model, "w1.58a8", skip=("head",))
    names = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.out", "mlp.gate", "mlp.up",
                                                                       "mlp.down")}
    assert type(model.head) is nn.Linear
    assert model.logits(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scheme"):
        quantize_student(mlp(), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_student(mlp(), "w4a16", group_size=0)
    with pytest.raises(TypeError, match="skip"):
        quantize_student(mlp(), "w8a8", skip="lm_head")
    with pytest.raises(TypeError, match="model"):
        quantize_student(object(), "w8a8")


def _distill(student, teacher, data, steps):
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        start = (step * 16) % len(data)
        x = data[start:start + 16, :-1]
        with torch.no_grad():
            target = teacher.logits(x)
        loss = flashkd.distill_loss(student.logits(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ternary_student_distills_like_float_student():
    """150 steps of forward KL to a fixed random teacher (init_std 0.2, so its
    distributions are far from uniform) on 64 fixed random sequences. Observed
    on the development machine: float student 1.23 -> 0.46 (-63%), w1.58a8
    student 1.23 -> 0.64 (-48%). Asserted: both fall by >= 35% and the ternary
    student's final loss is within 2x the float student's. One thread, so the
    run takes ~20 s whatever else the machine is doing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = DecoderLM(LMConfig.preset("tiny", init_std=0.2), seed=0).eval().requires_grad_(False)
        data = torch.randint(0, 256, (64, 33), generator=torch.Generator().manual_seed(1))
        base = DecoderLM(LMConfig.preset("tiny"), seed=1)
        float_losses = _distill(copy.deepcopy(base), teacher, data, 150)
        ternary = quantize_student(copy.deepcopy(base), "w1.58a8")
        assert sum(isinstance(m, QuantLinear) for m in ternary.modules()) == 10
        ternary_losses = _distill(ternary, teacher, data, 150)
    finally:
        torch.set_num_threads(threads)
    first = lambda l: sum(l[:3]) / 3  # noqa: E731
    last = lambda l: sum(l[-5:]) / 5  # noqa: E731
    assert last(float_losses) <= 0.65 * first(float_losses), float_losses
    assert last(ternary_losses) <= 0.65 * first(ternary_losses), ternary_losses
    assert last(ternary_losses) <= 2.0 * last(float_losses), (last(ternary_losses), last(float_losses))
