"""flashkd's ops that multiply by a weight under torch.autocast (python/flashkd/_autocast.py).

Inside an autocast region the linear losses and QuantLinear must give exactly
(bit for bit) what they give outside it on inputs cast to the autocast dtype by
hand, as torch's F.linear would cast them, and float32 master parameters must
get float32 gradients through the cast. Exact equality is the check that fails
if the cast is skipped: a float32 computation differs from a bf16/fp16 one in
the low bits. What the low-precision computation is worth against the float64
oracle is tested in each op's own module. Outside autocast nothing is cast.
"""
import pytest
import torch

import flashkd
from flashkd.quant import QuantLinear

from checks import assert_compile_matches_eager

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def float_leaves(device, shapes, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad) for s in shapes]


def forward_backward(fn, leaves, cotangent_seed=1):
    """fn() -> tensor or tuple of tensors (float outputs); backward of a random linear
    function of all of them (where there are leaves). Returns the detached outputs and
    the leaves' gradients."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(cotangent_seed)
    obj = sum((o.float() * torch.rand(o.shape, generator=g).to(o.device)).sum() for o in outs)
    if leaves:
        obj.backward()
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return [o.detach() for o in outs], grads


def assert_same(autocast_run, cast_run, leaves):
    (outs_a, grads_a), (outs_c, grads_c) = autocast_run, cast_run
    for i, (a, c) in enumerate(zip(outs_a, outs_c)):
        assert a.dtype == c.dtype, f"output {i}: dtype {a.dtype} under autocast, {c.dtype} cast by hand"
        assert torch.equal(a, c), f"output {i} under autocast differs from the inputs cast by hand"
    for i, (t, a, c) in enumerate(zip(leaves, grads_a, grads_c)):
        assert a is not None and a.dtype == t.dtype, f"leaf {i}: gradient dtype {None if a is None else a.dtype}"
        assert torch.equal(a, c), f"leaf {i}: gradient under autocast differs from the inputs cast by hand"


@pytest.mark.parametrize("dtype", list(AUTOCAST_DTYPES))
def test_linear_cross_entropy(dtype, device):
    dt = AUTOCAST_DTYPES[dtype]
    h, W, b = leaves = float_leaves(device, [(2, 7, 24), (37, 24), (37,)])
    y = torch.randint(0, 37, (2, 7), device=device)
    y[0, :3] = -100
    kw = dict(label_smoothing=0.1, z_loss=0.01, return_lse=True, chunk_budget_bytes=37 * 4 * 3)

    def under_autocast():
        with torch.autocast(device, dtype=dt):
            return flashkd.linear_cross_entropy(h, W, y, b, **kw)

    autocast_run = forward_backward(under_autocast, leaves)
    cast_run = forward_backward(lambda: flashkd.linear_cross_entropy(h.to(dt), W.to(dt), y, b.to(dt), **kw), leaves)
    assert_same(autocast_run, cast_run, leaves)
    assert autocast_run[0][0].dtype == torch.float32  # the loss stays float32, as F.cross_entropy's does


@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("dtype", list(AUTOCAST_DTYPES))
def test_linear_distill_loss(dtype, teacher, device):
    dt = AUTOCAST_DTYPES[dtype]
    h, W, b = leaves = float_leaves(device, [(3, 5, 16), (29, 16), (29,)])
    th, tW, tb = float_leaves(device, [(3, 5, 24), (33, 24), (33,)], seed=1, requires_grad=False)
    labels = torch.randint(0, 29, (3, 5), device=device)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, labels=labels, hard_weight=0.5, return_stats=True)
    # Teacher logits are a loss input, not a head: like F.cross_entropy's input, never cast.
    tl = (th @ tW.T + tb).detach()

    def call(cast):
        c = (lambda t: t.to(dt)) if cast else (lambda t: t)
        teacher_args = (dict(teacher_hidden=c(th), teacher_weight=c(tW), teacher_bias=c(tb)) if teacher == "weights"
                        else dict(teacher_logits=tl))
        loss, stats = flashkd.linear_distill_loss(c(h), c(W), student_bias=c(b), **teacher_args, **kw)
        return (loss, *(stats[k] for k in ("divergence", "student_entropy", "teacher_entropy")))

    def under_autocast():
        with torch.autocast(device, dtype=dt):
            return call(cast=False)

    assert_same(forward_backward(under_autocast, leaves), forward_backward(lambda: call(cast=True), leaves), leaves)


@pytest.mark.parametrize("frozen", [False, True], ids=["training", "frozen"])
@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
@pytest.mark.parametrize("dtype", list(AUTOCAST_DTYPES))
def test_quant_linear(dtype, scheme, frozen, device):
    dt = AUTOCAST_DTYPES[dtype]
    torch.manual_seed(0)
    layer = QuantLinear(40, 24, scheme=scheme, group_size=8).to(device)
    if frozen:
        layer.freeze()
    (x,) = float_leaves(device, [(6, 40)], seed=2, requires_grad=not frozen)  # frozen: inference only
    leaves = [] if frozen else [x, layer.weight, layer.bias]

    def under_autocast():
        with torch.autocast(device, dtype=dt):
            return layer(x)

    autocast_run = forward_backward(under_autocast, leaves)
    layer_cast_by_hand = forward_backward(lambda: layer(x.to(dt)), leaves)
    assert autocast_run[0][0].dtype == dt, "QuantLinear's output is in the autocast dtype, like nn.Linear's"
    assert_same(autocast_run, layer_cast_by_hand, leaves)


def test_outside_autocast_nothing_is_cast(device):
    h = torch.randn(4, 8, device=device, dtype=torch.bfloat16)
    W = torch.randn(16, 8, device=device)
    y = torch.randint(0, 16, (4,), device=device)
    with pytest.raises(TypeError, match="weight"):
        flashkd.linear_cross_entropy(h, W, y)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=False), pytest.raises(TypeError, match="weight"):
        flashkd.linear_cross_entropy(h, W, y)
    layer = QuantLinear(8, 16, scheme="w8a8").to(device)
    assert layer(torch.randn(4, 8, device=device)).dtype == torch.float32


def test_compile_fullgraph_under_autocast(device):
    y = torch.randint(0, 37, (9,), device=device)

    def f(h, W, b):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, lse = flashkd.linear_cross_entropy(h, W, y, b, return_lse=True)
        return loss + lse.sum() / 64, lse.detach()

    # The loss and LSE come from the op itself and must agree closely (a float32 head
    # would move them by ~1e-3). The gradients go through bf16 tensors that inductor
    # fuses without rounding each intermediate as eager does: one bf16 step apart.
    assert_compile_matches_eager(f, lambda: float_leaves(device, [(9, 24), (37, 24), (37,)]),
                                 grad_tol=(2.0 ** -7, 2.0 ** -9))


def test_op_bodies_ignore_autocast(device):
    # The ops' result dtypes must not depend on autocast (their fake kernels, which
    # torch.compile traces, cannot see it): the casts happen in the Python layer only.
    x, w = float_leaves(device, [(5, 16), (8, 16)], requires_grad=False)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = torch.ops.flashkd.qat_linear(x, w, None, "w4a16", 8, False)[0]
    assert out.dtype == torch.float32
