"""Token merging (flashkd.tome) against the pure-torch ToMe oracle
(flashkd.reference.tome): plans, merged outputs, unmerge, size-weighted merging,
source tracking, gradients, opcheck, torch.compile and bad inputs."""
import pytest
import torch

import flashkd.tome as tome
from flashkd.prune import topk_tokens
from flashkd.reference import tome as ref

from checks import RANDOM_CASES, assert_same_bits, results_per_cpu_isa

ops = torch.ops.flashkd
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def oracle_plan(metric, r, class_token, distill_token):
    """The oracle's plan in float64 from the same (rounded) metric values."""
    r = ref.capped_r(metric.shape[1], r, class_token, distill_token)
    return ref.matching_plan(metric.double().cpu(), r, class_token, distill_token)


def assert_plan_equal(got, want):
    for name, g, w in zip(("unm_idx", "src_idx", "dst_idx"), got, want):
        assert torch.equal(g.cpu(), w), f"{name}: {g} != {w}"


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 16, 33])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_matches_oracle(device, tokens, flags, dtype):
    class_token, distill_token = flags
    metric = rand(3, tokens, 20, dtype=dtype, device=device, seed=tokens)
    cap = ref.capped_r(tokens, tokens, class_token, distill_token)
    for r in sorted({0, 1, cap, cap + 3}):
        got = tome.matching_plan(metric, r, class_token=class_token, distill_token=distill_token)
        assert_plan_equal(got, oracle_plan(metric, r, class_token, distill_token))


@pytest.mark.parametrize("flags", FLAGS)
def test_plan_tie_rules(device, flags):
    """Exact ties: identical B rows (smallest j wins) and identical A rows
    (stable order: smaller i first)."""
    class_token, distill_token = flags
    base = rand(1, 2, 12, seed=3)
    metric = torch.empty(2, 15, 12)
    metric[:, 0::2] = base[0, 0]  # every A row the same vector
    metric[:, 1::2] = base[0, 1]  # every B row the same vector
    metric = metric.to(device)
    for r in (1, 3, 7):
        got = tome.matching_plan(metric, r, class_token=class_token, distill_token=distill_token)
        assert_plan_equal(got, oracle_plan(metric, r, class_token, distill_token))


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_zero_rows(device, flags, dtype):
    """Zero metric rows (padding tokens) have NaN similarities, which never win:
    zero B rows at the start of a kernel tile (B rows 0, 16, 32) must not hide
    the tile's other rows, zero A rows rank after every row with a partner, and
    however far r reaches, the class token is never merged and the distill
    token never receives a merge."""
    class_token, distill_token = flags
    metric = rand(2, 70, 12, dtype=dtype, device=device, seed=8)
    metric[:, [1, 33, 65]] = 0  # B rows 0, 16, 32
    metric[0, [2, 4, 10]] = 0  # A rows 1, 2, 5 of batch 0
    metric[1, 2::2] = 0  # every A row of batch 1 but the first
    cap = ref.capped_r(70, 70, class_token, distill_token)
    for r in (1, 5, 30, cap):
        got = tome.matching_plan(metric, r, class_token=class_token, distill_token=distill_token)
        assert_plan_equal(got, oracle_plan(metric, r, class_token, distill_token))
        _, src, dst = got
        if class_token:
            assert not (src == 0).any()
        if distill_token:
            assert not (dst == 0).any()


@pytest.mark.parametrize("tokens", [3, 4, 5, 8, 9])
@pytest.mark.parametrize("flags", FLAGS)
def test_plan_at_the_cap_keeps_protected_tokens(device, tokens, flags):
    """At the largest r the class token stays and, for odd token counts too,
    nothing merges into the distill token (ToMe's own cap would force it)."""
    class_token, distill_token = flags
    cap = tome.capped_r(tokens, tokens, class_token, distill_token)
    assert cap == ref.capped_r(tokens, tokens, class_token, distill_token)
    assert cap <= (tokens - class_token - distill_token) // 2
    metric = rand(2, tokens, 6, device=device, seed=tokens)
    unm, src, dst = tome.matching_plan(metric, tokens, class_token=class_token, distill_token=distill_token)
    assert src.shape[1] == cap
    if class_token:
        assert not (src == 0).any()
    if distill_token:
        assert not (dst == 0).any()


@pytest.mark.parametrize("seed", range(24))
def test_plan_random_awkward(device, seed):
    """Random token counts, widths, flags and r, with zero rows thrown in: the
    plan equals the oracle's, and the protected tokens stay protected. Exact
    ties are test_plan_tie_rules' job: copied tokens tie exactly in the
    kernel, but the float64 oracle's GEMM can round two identical rows'
    scores differently (seen: 2.8e-17 apart), and with fewer than 4 channels
    near-ties below float32 rounding are common (documented)."""
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    tokens, cols, batch = 1 + pick(80), 4 + pick(21), 1 + pick(3)
    class_token, distill_token = bool(pick(2)), bool(pick(2))
    metric = torch.randn(batch, tokens, cols, generator=g)
    for _ in range(pick(8)):  # zero rows
        metric[pick(batch), pick(tokens)] = 0
    metric = metric.to(device)
    cap = tome.capped_r(tokens, tokens, class_token, distill_token)
    for r in sorted({0, pick(cap + 1), cap}):
        got = tome.matching_plan(metric, r, class_token=class_token, distill_token=distill_token)
        assert_plan_equal(got, oracle_plan(metric, r, class_token, distill_token))
        if class_token:
            assert not (got[1] == 0).any()
        if distill_token:
            assert not (got[2] == 0).any()


def test_cap_counts_the_receivers():
    # ToMe's cap, (T - protected) // 2, would be 1, 2 and 4 here
    assert [tome.capped_r(t, t, False, True) for t in (3, 5, 9)] == [0, 1, 3]
    assert [tome.capped_r(t, t, True, True) for t in (3, 5, 9)] == [0, 1, 3]
    assert [tome.capped_r(t, t, True, False) for t in (3, 5, 9)] == [1, 2, 4]


def merge_inputs(device, tokens, flags, dtype, r=3, seed=0):
    class_token, distill_token = flags
    metric = rand(2, tokens, 16, device=device, seed=seed)
    x = rand(2, tokens, 24, dtype=dtype, device=device, seed=seed + 1)
    merge, unmerge = tome.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    plan = oracle_plan(metric, r, class_token, distill_token)
    return x, merge, unmerge, [p.to(device) for p in plan]


def tolerance(dtype):
    return {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]


@pytest.mark.parametrize("tokens", [2, 3, 10, 17])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "sum", "amax"])
def test_merge_matches_oracle(device, tokens, flags, dtype, mode):
    x, merge, _, plan = merge_inputs(device, tokens, flags, dtype, r=tokens)  # r above the cap
    want = ref.merge(x.double(), plan, mode, flags[1]).to(dtype)
    got = merge(x, mode)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tokens", [3, 10, 17])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_matches_oracle(device, tokens, flags, dtype):
    _, merge, unmerge, plan = merge_inputs(device, tokens, flags, dtype)
    y = rand(2, tokens - plan[1].shape[1], 5, dtype=dtype, device=device, seed=9)
    if plan[1].shape[1] == 0:  # r capped to 0: identity, as ToMe
        assert unmerge(y) is y
    else:
        assert torch.equal(unmerge(y), ref.unmerge(y, plan, tokens))


def test_r_zero_is_identity(device):
    metric, x = rand(2, 9, 8, device=device), rand(2, 9, 4, device=device)
    for r, flags in ((0, (False, False)), (5, (True, True))):  # T=2 with both tokens protected caps r at 0
        merge, unmerge = tome.bipartite_soft_matching(metric[:, : 9 if r == 0 else 2], r, class_token=flags[0],
                                                      distill_token=flags[1])
        assert merge(x) is x and unmerge(x) is x
        size = torch.full((2, 9, 1), 2.0, device=device)
        y, s = tome.merge_wavg(merge, x, size)
        torch.testing.assert_close(y, x)
        assert torch.equal(s, size)


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_wavg_chained(device, flags, dtype):
    """Two merges in a row with sizes carried over, as in a ToMe ViT."""
    class_token, distill_token = flags
    x = rand(3, 21, 16, dtype=dtype, device=device, seed=4)
    metric = rand(3, 21, 8, device=device, seed=5)
    rx, size, rsize = x.double(), None, None
    for step in range(2):
        merge, _ = tome.bipartite_soft_matching(metric, 4, class_token=class_token, distill_token=distill_token)
        plan = oracle_plan(metric, 4, class_token, distill_token)
        x, size = tome.merge_wavg(merge, x, size)
        rx, rsize = ref.merge_wavg(lambda t, mode: ref.merge(t, plan, mode, distill_token), rx, rsize)
        metric = ref.merge(metric, plan, "mean", distill_token)
        rtol, atol = tolerance(dtype)
        torch.testing.assert_close(x, rx.to(dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(size, rsize.to(dtype))
    assert size.sum().item() == 3 * 21  # every original token counted once


@pytest.mark.parametrize("flags", FLAGS)
def test_merge_source(device, flags):
    x = rand(2, 13, 4, device=device)
    merge, _, plan = merge_inputs(device, 13, flags, torch.float32, r=5)[1:]
    source = tome.merge_source(merge, x)
    want = ref.merge(torch.eye(13, device=device).expand(2, 13, 13), plan, "amax", flags[1])
    assert torch.equal(source, want)
    assert torch.equal(source.sum(1), torch.ones(2, 13, device=device))  # each original token in one group


def test_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = tome.attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias, ref.attention_bias(size))
    q = rand(1, 2, 3, 8)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias)
    logits = q @ q.transpose(-1, -2) / 8**0.5 + size.log()[:, None, None, :, 0]
    torch.testing.assert_close(out, logits.softmax(-1) @ q)


# --- gradients -------------------------------------------------------------------


def grad_of(fn, *inputs, seed=7):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * rand(*o.shape, dtype=o.dtype, device=o.device, seed=seed + i)).sum() for i, o in enumerate(outs))
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("mode", ["mean", "sum", "amax"])
def test_merge_grad(device, flags, mode):
    x, merge, unmerge, plan = merge_inputs(device, 15, flags, torch.float32, r=5)
    if mode == "amax":  # small integers: many exact ties, whose gradient is shared equally
        x = torch.randint(0, 3, x.shape, generator=torch.Generator().manual_seed(1)).float().to(device)
    (got,) = grad_of(lambda t: merge(t, mode), x)
    (want,) = grad_of(lambda t: ref.merge(t, plan, mode, flags[1]), x)
    torch.testing.assert_close(got, want)
    y = merge(x)
    (got,) = grad_of(unmerge, y)
    (want,) = grad_of(lambda t: ref.unmerge(t, plan, 15), y)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("with_size", [False, True])
def test_merge_wavg_grad(device, flags, with_size):
    x, merge, _, plan = merge_inputs(device, 15, flags, torch.float32, r=5)
    size = (torch.rand(2, 15, 1, generator=torch.Generator().manual_seed(2)) * 3 + 0.5).to(device) if with_size else None
    got = grad_of(lambda t, s: tome.merge_wavg(merge, t, s), x, size)
    want = grad_of(lambda t, s: ref.merge_wavg(lambda u, mode: ref.merge(u, plan, mode, flags[1]), t, s),
                   x.double(), size.double() if with_size else None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-6)


def test_merge_wavg_size_requires_grad_only_through_size(device):
    """The merged sizes depend on the sizes alone: with x requiring grad and
    sizes that do not (or none, ToMe's first layer) they are a constant, as in
    ToMe, so that log(size) as an attention mask keeps SDPA on its fused
    kernel; sizes that require grad give sizes that do."""
    x, merge, _, _ = merge_inputs(device, 15, (True, False), torch.float32, r=5)
    x.requires_grad_(True)
    size = torch.rand(2, 15, 1, generator=torch.Generator().manual_seed(2)).to(device) + 0.5
    for given in (None, size):
        out, size_out = tome.merge_wavg(merge, x, given)
        assert out.requires_grad and not size_out.requires_grad
    out, size_out = tome.merge_wavg(merge, x, size.clone().requires_grad_(True))
    assert size_out.requires_grad


@pytest.mark.parametrize("seed", RANDOM_CASES)
def test_merges_random_awkward(device, seed):
    """Random batch, token count, channel count (vector tails: 1 to 70), r,
    flags, dtype and a strided x: merge (each mode), unmerge, merge_wavg with
    sizes and merge_source equal the oracle's on the same plan, and merge_wavg's
    gradients too."""
    g = torch.Generator().manual_seed(2000 + seed)
    pick = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    batch, tokens, cols = 1 + pick(4), 2 + pick(120), 1 + pick(70)
    class_token, distill_token = bool(pick(2)), bool(pick(2))
    dtype = DTYPES[pick(3)]
    metric = torch.randn(batch, tokens, 8, generator=g).to(device)
    wide = torch.randn(batch, tokens, 2 * cols, generator=g).to(device=device, dtype=dtype)
    x = wide[..., ::2] if pick(2) else wide[..., :cols]  # channel stride 2, or a row stride > cols
    r = 1 + pick(tokens)
    merge, unmerge = tome.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    plan = [p.to(device) for p in oracle_plan(metric, r, class_token, distill_token)]
    if plan[1].shape[1] == 0:  # r capped to 0: the identity, as in ToMe (test_r_zero_is_identity)
        assert merge(x) is x
        return
    rtol, atol = tolerance(dtype)
    for mode in ("mean", "sum", "amax"):
        want = ref.merge(x.double(), plan, mode, distill_token).to(dtype)
        torch.testing.assert_close(merge(x, mode), want, rtol=rtol, atol=atol, msg=mode)
    y = merge(x)
    torch.testing.assert_close(unmerge(y), ref.unmerge(y, plan, tokens))
    size = (torch.rand(batch, tokens, 1, generator=g) * 3 + 0.5).to(device)
    ref_merge = lambda u, mode: ref.merge(u, plan, mode, distill_token)  # noqa: E731
    # The op takes the sizes in x's dtype (ToMe's), so the oracle does too: against
    # float32 sizes a float16 case (1521423: sizes up to 3.5, a weighted sum that
    # cancels to 0.016) was 1.1e-3 off, all of it the sizes' rounding.
    got = tome.merge_wavg(merge, x, size)
    want = ref.merge_wavg(ref_merge, x.double(), size.to(dtype).double())
    torch.testing.assert_close(got[0], want[0].to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1].to(dtype), rtol=rtol, atol=atol)  # sizes come back in x's dtype
    source = tome.merge_source(merge, x)
    eye = torch.eye(tokens, dtype=dtype, device=device).expand(batch, tokens, tokens)
    assert torch.equal(source, ref.merge(eye, plan, "amax", distill_token))
    if dtype == torch.float32:
        # No worse than the oracle's formula run in float32, plus a floor: a size's
        # gradient sums a product per channel, and its float32 noise grows with C
        # (case 204115: C = 70, 1.7e-6 off at -0.017; the float32 formula 2.1e-6 off).
        got = grad_of(lambda t, s: tome.merge_wavg(merge, t, s), x, size)
        want = grad_of(lambda t, s: ref.merge_wavg(ref_merge, t, s), x.double(), size.double())
        plain = grad_of(lambda t, s: ref.merge_wavg(ref_merge, t, s), x, size)
        for a, b, p in zip(got, want, plain):
            plain_err = (p.double() - b).abs().max().item()
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6 + 2 * plain_err)

def test_gradcheck_linear_ops():
    """sum / mean merge and unmerge are linear: float32 gradcheck is exact enough."""
    x, merge, unmerge, _ = merge_inputs("cpu", 9, (True, False), torch.float32, r=3)
    x = x[:, :, :3].detach().requires_grad_(True)
    kw = dict(eps=1e-2, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradcheck(lambda t: merge(t, "mean"), (x,), **kw)
    assert torch.autograd.gradcheck(lambda t: merge(t, "sum"), (x,), **kw)
    y = merge(x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(unmerge, (y,), **kw)


# --- opcheck, compile ----------------------------------------------------------------


def test_opcheck(device):
    metric = rand(2, 11, 8, device=device)
    x = rand(2, 11, 6, device=device, seed=1).requires_grad_(True)
    size = (torch.rand(2, 11, 1) + 0.5).to(device).requires_grad_(True)
    plan = ops.tome_plan(metric, 3, True, False)
    torch.library.opcheck(ops.tome_plan, (metric, 3, True, False))
    for mode in ("mean", "sum", "amax"):
        torch.library.opcheck(ops.tome_merge, (x, *plan, mode, True))
    torch.library.opcheck(ops.tome_merge_wavg, (x, size, *plan, False))
    torch.library.opcheck(ops.tome_merge_wavg, (x, None, *plan, True))
    y = ops.tome_merge(x, *plan, "mean", False).detach().requires_grad_(True)
    torch.library.opcheck(ops.tome_unmerge, (y, *plan, 11))
    # the backward ops themselves
    xd, sd, g = x.detach(), size.detach(), torch.randn_like(y).detach()
    for mode in ("mean", "sum", "amax"):
        out = ops.tome_merge(xd, *plan, mode, True)
        torch.library.opcheck(ops.tome_merge_backward, (g, xd, out, *plan, mode, True))
    out, size_out = ops.tome_merge_wavg(xd, sd, *plan, False)
    torch.library.opcheck(ops.tome_merge_wavg_backward,
                          (g, torch.randn_like(size_out), xd, sd, out, size_out, *plan, False, True))
    torch.library.opcheck(ops.tome_merge_wavg_backward, (g, None, xd, sd, out, size_out, *plan, False, False))


def test_compile_fullgraph(device):
    def step(metric, x, size):
        merge, unmerge = tome.bipartite_soft_matching(metric, 4, class_token=True)
        y, size = tome.merge_wavg(merge, x, size)
        source = tome.merge_source(merge, x)
        return unmerge(y), size, source

    metric = rand(2, 17, 8, device=device)
    x = rand(2, 17, 6, device=device, seed=1)
    size = torch.ones(2, 17, 1, device=device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xg, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = step(metric, xg, size), compiled(metric, xc, size)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    want[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(xc.grad, xg.grad)


# --- bad inputs ------------------------------------------------------------------------


def test_meta_beside_real_tensors_is_an_error():
    """A meta tensor beside real ones reaches the fake kernels, which check devices
    as the C++ glue does instead of answering with empty memory."""
    metric, x = rand(2, 9, 8), rand(2, 9, 4)
    merge, unmerge = tome.bipartite_soft_matching(metric, 2)
    with pytest.raises(ValueError, match="must be on the device of x"):
        merge(x.to("meta"))
    with pytest.raises(ValueError, match="size must be on the device of x"):
        tome.merge_wavg(merge, x, torch.ones(2, 9, 1, device="meta"))
    with pytest.raises(ValueError, match="scores must be on the device of x"):
        topk_tokens(x, torch.rand(2, 9, device="meta"), 4)


def test_bad_inputs():
    metric, x = rand(2, 9, 8), rand(2, 9, 4)
    with pytest.raises(ValueError, match="r must be >= 0"):
        tome.bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError, match="metric must be a 3-D"):
        tome.bipartite_soft_matching(metric[0], 2)
    merge, unmerge = tome.bipartite_soft_matching(metric, 2)
    with pytest.raises(ValueError, match="x must have batch 2 and 9 tokens"):
        merge(x[:1])
    with pytest.raises(ValueError, match="x must have batch 2 and 9 tokens"):
        merge(x[:, :8])
    with pytest.raises(ValueError, match="mode must be one of"):
        merge(x, "max")
    with pytest.raises(ValueError, match=r"x must have batch 2 and 7 tokens \(the merged tokens of the plan\)"):
        unmerge(x)
    with pytest.raises(ValueError, match="size must have shape"):
        tome.merge_wavg(merge, x, torch.ones(2, 9))
    with pytest.raises(TypeError, match="metric must be float32"):
        tome.matching_plan(metric.double(), 2)
    with pytest.raises(ValueError, match="r must be in"):
        ops.tome_plan(metric, 5, False, False)
    plan = ops.tome_plan(metric, 2, False, False)
    with pytest.raises(ValueError, match="mode must be"):
        ops.tome_merge(x, *plan, "median", False)
    with pytest.raises(ValueError, match="unm_idx and src_idx must together cover"):
        ops.tome_merge(rand(2, 13, 4), *plan, "sum", False)
    with pytest.raises(ValueError, match="metric must have at least one channel"):
        tome.matching_plan(rand(2, 9, 0), 2)
    with pytest.raises(ValueError, match="r must be in"):  # 7 tokens with a distill token: 2 receivers
        ops.tome_plan(rand(2, 7, 4), 3, False, True)
    full = ops.tome_plan(rand(1, 4, 8), 2, False, False)  # every even token merged: no unm_idx
    with pytest.raises(ValueError, match="unm_idx: a merge with distill_token"):
        ops.tome_merge(rand(1, 4, 2), *full, "sum", True)
    with pytest.raises(ValueError, match="size must have shape"):
        tome.attention_bias(torch.ones(2, 3, 2))


def test_non_contiguous_inputs(device):
    metric = rand(2, 16, 40, device=device)[:, :15, ::2]  # sliced tokens and channels
    x = rand(2, 8, 15, device=device, seed=1).transpose(1, 2)  # (2, 15, 8), channel stride 15
    merge, unmerge = tome.bipartite_soft_matching(metric, 4, class_token=True)
    plan = oracle_plan(metric, 4, True, False)
    assert_plan_equal(tome.matching_plan(metric, 4, class_token=True), plan)
    torch.testing.assert_close(merge(x, "mean"), ref.merge(x, plan, "mean"))
    y = rand(2, 8, 11, device=device, seed=2).transpose(1, 2)
    assert torch.equal(unmerge(y), ref.unmerge(y, plan, 15))


def test_cpu_results_do_not_depend_on_the_instruction_set():
    """The CPU kernels' channel sums (the metric's norms, the gradients of
    merge_wavg's sizes and of the fused remainder's scores) run in one fixed
    order (csrc/cpu/row_sums.h), so the AVX2 and AVX-512 builds give the same
    plans, outputs and gradients, bit for bit, on a ViT-S-sized layer."""
    metric, x = rand(4, 197, 64, seed=11), rand(4, 197, 384, seed=12)
    size = rand(4, 197, 1, seed=13).abs() + 0.5
    scores = rand(4, 197, seed=14).softmax(-1)

    def run():
        merge, _ = tome.bipartite_soft_matching(metric, 16, class_token=True)
        merged = grad_of(lambda t, s: tome.merge_wavg(merge, t, s), x, size)
        kept = grad_of(lambda t, s: topk_tokens(t, s, 120, fuse_remainder=True)[0], x, scores)
        return [*merged, *kept]

    assert_same_bits(results_per_cpu_isa(run))
