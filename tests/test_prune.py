"""Top-k token pruning (flashkd.prune.topk_tokens) against the oracle
(flashkd.reference.tome.topk_tokens): selection, fused remainder, gradients,
opcheck, torch.compile and bad inputs."""
import pytest
import torch

from flashkd.prune import topk_tokens
from flashkd.reference import tome as ref

from checks import RANDOM_CASES

ops = torch.ops.flashkd
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def positive_scores(b, t, device, seed=1, dtype=torch.float32):
    return rand(b, t, seed=seed).softmax(-1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("tokens,keep", [(1, 1), (2, 2), (5, 2), (17, 6), (17, 17), (40, 13)])
@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("fuse_remainder", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(device, tokens, keep, protect_first, fuse_remainder, dtype):
    if protect_first and keep < 2:
        pytest.skip("protect_first needs keep >= 2")
    x = rand(3, tokens, 12, dtype=dtype, device=device)
    scores = positive_scores(3, tokens, device, dtype=dtype)
    got, index = topk_tokens(x, scores, keep, fuse_remainder=fuse_remainder, protect_first=protect_first)
    want, want_index = ref.topk_tokens(x.double(), scores.double(), keep, fuse_remainder, protect_first)
    assert torch.equal(index, want_index)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol)
    assert torch.equal(got[:, :keep], x.gather(1, index[..., None].expand(-1, -1, 12)))


def test_ties_keep_lower_position(device):
    scores = torch.tensor([[5.0, 1.0, 3.0, 1.0, 3.0, 1.0]], device=device)
    x = rand(1, 6, 4, device=device)
    _, index = topk_tokens(x, scores, 4, protect_first=False)
    assert index.tolist() == [[0, 2, 4, 1]]
    _, index = topk_tokens(x, scores, 4, protect_first=True)
    assert index.tolist() == [[0, 2, 4, 1]]
    scores[0, 0] = -100.0  # protected token: its score is ignored
    _, index = topk_tokens(x, scores, 3)
    assert index.tolist() == [[0, 2, 4]]


def check_float32_against_oracle(x, scores, keep, fuse_remainder, protect_first=True, scores_tol=(1e-5, 1e-6)):
    """Selection, output and the gradients to x and (with the fused token) the
    scores of float32 inputs equal the float64 oracle's; returns the index."""
    x, scores = x.detach().requires_grad_(True), scores.detach().requires_grad_(True)
    xr, sr = x.detach().double().requires_grad_(True), scores.detach().double().requires_grad_(True)
    out, index = topk_tokens(x, scores, keep, fuse_remainder=fuse_remainder, protect_first=protect_first)
    want, want_index = ref.topk_tokens(xr, sr, keep, fuse_remainder, protect_first)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    cot = rand(*out.shape, device=x.device, seed=5)
    out.backward(cot)
    want.backward(cot.double())
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-5, atol=1e-6)
    if fuse_remainder:
        torch.testing.assert_close(scores.grad, sr.grad.float(), rtol=scores_tol[0], atol=scores_tol[1])
    else:
        assert scores.grad is None
    return index


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("fuse_remainder", [False, True])
def test_grad(device, protect_first, fuse_remainder):
    check_float32_against_oracle(rand(2, 11, 7, device=device), positive_scores(2, 11, device), 5, fuse_remainder,
                                 protect_first)


@pytest.mark.parametrize("fuse_remainder", [False, True])
def test_many_tokens(device, fuse_remainder):
    """More tokens than a block's shared memory could rank (the CUDA kernel
    once refused more than 12000), a count that is no multiple of a rank tile,
    NaN and tied scores: selection, outputs and gradients equal the oracle's."""
    tokens, cols, keep = 12_289, 3, 4_101
    scores = torch.rand(2, tokens, generator=torch.Generator().manual_seed(2))
    scores[:, 100:600] = 0.5  # ties broken by position
    scores[0, 7_000] = float("nan")  # ranked above everything
    index = check_float32_against_oracle(rand(2, tokens, cols, device=device), scores.to(device), keep,
                                         fuse_remainder, scores_tol=(1e-4, 1e-5))
    assert index[0, 1].item() == 7_000


def test_backward_skips_out_of_range_index(device):
    """The backward op takes the index as given: entries outside [0, tokens)
    (which the forward never writes) are left out instead of written out of
    bounds, and the valid entries still route their gradient rows."""
    x, scores = rand(2, 9, 5, device=device), positive_scores(2, 9, device)
    out, index = ops.topk_tokens(x, scores, 4, False, True)
    bad = index.clone()
    bad[0, 1], bad[1, 2] = 9, -3
    g = rand(*out.shape, device=device, seed=6)
    grad_x, _ = ops.topk_tokens_backward(g, x, scores, out, bad, False, True, False)
    want = torch.zeros_like(x)
    for b in range(2):
        for k in range(4):
            if 0 <= bad[b, k] < 9:
                want[b, bad[b, k]] = g[b, k]
    assert torch.equal(grad_x, want)


@pytest.mark.parametrize("seed", RANDOM_CASES)
def test_random_awkward(device, seed):
    """Random batch, token (half the cases past one CUDA rank tile of 256) and
    channel counts (channel tails 1 to 70), keep,
    flags, dtype, strided x and scores with ties (bf16/fp16 rounding and
    repeated values): selection equal to the oracle's, outputs and (float32)
    gradients to x and the scores within rounding."""
    g = torch.Generator().manual_seed(3000 + seed)
    pick = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    batch, tokens, cols = 1 + pick(4), (1 + pick(250)) if pick(2) else (250 + pick(900)), 1 + pick(70)
    protect_first, fuse_remainder = bool(pick(2)) and tokens >= 2, bool(pick(2))
    keep = (2 if protect_first else 1) + pick(tokens - (1 if protect_first else 0))
    dtype = DTYPES[pick(3)]
    wide = torch.randn(batch, tokens, 2 * cols, generator=g).to(device=device, dtype=dtype)
    x = wide[..., ::2] if pick(2) else wide[..., :cols]
    scores = torch.rand(batch, tokens, generator=g)
    if pick(2):
        scores = (scores * 8).floor() / 8 + 0.125  # repeated values: ties broken by position
    scores = scores.to(device=device, dtype=dtype)
    got, index = topk_tokens(x, scores, keep, fuse_remainder=fuse_remainder, protect_first=protect_first)
    want, want_index = ref.topk_tokens(x.double(), scores.double(), keep, fuse_remainder, protect_first)
    assert torch.equal(index, want_index)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol)
    if dtype == torch.float32:
        xl, sl = x.detach().clone().requires_grad_(True), scores.detach().clone().requires_grad_(True)
        xr, sr = x.detach().double().requires_grad_(True), scores.detach().double().requires_grad_(True)
        cot = torch.randn(got.shape, generator=g).to(device)
        topk_tokens(xl, sl, keep, fuse_remainder=fuse_remainder, protect_first=protect_first)[0].backward(cot)
        ref.topk_tokens(xr, sr, keep, fuse_remainder, protect_first)[0].backward(cot.double())
        torch.testing.assert_close(xl.grad, xr.grad.float(), rtol=1e-5, atol=1e-6)
        if fuse_remainder:
            # d/ds_i of the fused token is (x_i - fused) . cot / S (S = the dropped
            # tokens' score sum): float32 noise relative to |x| |cot| / S summed
            # over the channels, however much the dot product cancels. Nothing
            # dropped: the oracle's scores get no gradient, flashkd's zeros.
            if sr.grad is None:
                assert (sl.grad == 0).all()
            else:
                dropped = scores.double().sum(-1) - scores.double().gather(1, index).sum(-1)
                noise = 1e-6 * (x.abs().amax() * cot[:, -1].abs().sum(-1) / dropped).amax().item()
                torch.testing.assert_close(sl.grad, sr.grad.float(), rtol=1e-5, atol=max(1e-6, noise))


def test_gradcheck():
    """The gather is linear; float32 gradcheck with a coarse step is exact enough for x."""
    x = rand(2, 6, 3).requires_grad_(True)
    scores = positive_scores(2, 6, "cpu")
    assert torch.autograd.gradcheck(lambda t: topk_tokens(t, scores, 3, fuse_remainder=True)[0], (x,), eps=1e-2,
                                    atol=1e-3, rtol=1e-3)


def test_opcheck(device):
    x = rand(2, 9, 5, device=device).requires_grad_(True)
    scores = positive_scores(2, 9, device).requires_grad_(True)
    for fuse in (False, True):
        for protect in (False, True):
            torch.library.opcheck(ops.topk_tokens, (x, scores, 4, fuse, protect))
            out, index = ops.topk_tokens(x.detach(), scores.detach(), 4, fuse, protect)
            torch.library.opcheck(ops.topk_tokens_backward,
                                  (torch.randn_like(out), x.detach(), scores.detach(), out, index, fuse, protect, True))


def test_compile_fullgraph(device):
    def prune(x, scores):
        out, index = topk_tokens(x, scores, 5, fuse_remainder=True)
        return out * 2, index

    x = rand(2, 12, 6, device=device)
    scores = positive_scores(2, 12, device)
    compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")
    xg, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = prune(xg, scores), compiled(xc, scores)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    want[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(xc.grad, xg.grad)


def test_bad_inputs():
    x, scores = rand(2, 6, 3), positive_scores(2, 6, "cpu")
    with pytest.raises(ValueError, match="keep must be in"):
        topk_tokens(x, scores, 7)
    with pytest.raises(ValueError, match="keep must be in"):
        topk_tokens(x, scores, 1)
    with pytest.raises(ValueError, match="keep must be in"):
        topk_tokens(x, scores, 0, protect_first=False)
    with pytest.raises(ValueError, match="scores must have shape"):
        topk_tokens(x, scores[:, :5], 3)
    with pytest.raises(ValueError, match="x must be a 3-D"):
        topk_tokens(x[0], scores, 3)
    with pytest.raises(TypeError, match="keep must be an int"):
        topk_tokens(x, scores, 2.5)
    with pytest.raises(ValueError, match="keep must be in"):
        ops.topk_tokens(x, scores, 9, False, True)
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.topk_tokens(x, scores[:1], 3, False, True)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.topk_tokens(x.double(), scores, 3, False, True)
