"""flashkd's CPU kernels give the same bits whatever the number of threads.

A run on a laptop, a 2-core CI machine and a 64-core server must agree: the
kernels split work over rows (tokens, batch entries, weight rows) and never
split one sum across threads, so the thread count changes who computes a
result, not how. These tests hold them to it with row counts that no thread
count divides evenly. The linear losses are left out: their GEMMs are ATen's,
whose order of summation is the BLAS library's business.
"""
import pytest
import torch

import flashkd
import flashkd.prune
import flashkd.tome
from flashkd.quant import QuantLinear

from checks import assert_same_bits, results_per_thread_count


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "taid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_loss(divergence, dtype):
    g = _gen(1)
    s = (4 * torch.randn(37, 5003, generator=g)).to(dtype)  # rows are split 3 or more to a thread
    t = (4 * torch.randn(37, 5003, generator=g)).to(dtype)
    labels = torch.randint(0, 5003, (37,), generator=g)
    labels[5] = -100
    kw = {} if divergence != "taid" else {"taid_lambda": 0.3}

    def run():
        leaf = s.clone().requires_grad_()
        loss, stats = flashkd.distill_loss(leaf, t, divergence=divergence, temperature=2.0, labels=labels,
                                           hard_weight=0.3, soft_weight=0.7, return_stats=True, **kw)
        loss.backward()
        return [loss.detach(), leaf.grad, *stats.values()]

    assert_same_bits(results_per_thread_count(run))


@pytest.mark.parametrize("mode", ["mean", "wavg"])
def test_tome_plan_merge_and_backward(mode):
    g = _gen(2)
    x = torch.randn(5, 197, 96, generator=g)  # 985 token rows: the merge kernels split them
    metric = torch.randn(5, 197, 32, generator=g)  # plans split over the batch
    size = torch.rand(5, 197, 1, generator=g) + 0.5

    def run():
        leaf = x.clone().requires_grad_()
        merge, unmerge = flashkd.tome.bipartite_soft_matching(metric, 16, class_token=True)
        if mode == "wavg":
            y, y_size = flashkd.tome.merge_wavg(merge, leaf, size)
            out = [y_size]
        else:
            y = merge(leaf, mode="mean")
            out = [unmerge(y).detach()]
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return [y.detach(), leaf.grad, *out]

    assert_same_bits(results_per_thread_count(run))


def test_topk_tokens_with_remainder():
    g = _gen(3)
    x = torch.randn(5, 197, 96, generator=g)
    scores = torch.rand(5, 197, generator=g)

    def run():
        leaf, score_leaf = x.clone().requires_grad_(), scores.clone().requires_grad_()
        kept, index = flashkd.prune.topk_tokens(leaf, score_leaf, 98, fuse_remainder=True)
        (kept * torch.linspace(-1, 1, kept.shape[-1])).sum().backward()
        return [kept.detach(), index, leaf.grad, score_leaf.grad]

    assert_same_bits(results_per_thread_count(run))


@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_quant_linear_on_flashkd_kernels(scheme):
    """Training form (forward and STE backward) and frozen form, on flashkd's
    own GEMMs (not oneDNN's, which the automatic choice takes from 32 rows)."""
    torch.manual_seed(4)
    # Row counts past the kernels' per-thread grain (16384 / in_features rows), so that they split.
    layer = QuantLinear(200, 333, scheme=scheme, group_size=64)
    frozen = QuantLinear(200, 333, scheme=scheme, group_size=64)
    frozen.load_state_dict(layer.state_dict())
    frozen.freeze()
    x = torch.randn(300, 200, generator=_gen(5))

    def run():
        leaf = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(leaf)
        y.square().sum().backward()
        return [y.detach(), leaf.grad, layer.weight.grad, layer.bias.grad, frozen(x).detach()]

    torch.ops.flashkd.quant_cpu_gemm("flashkd")
    try:
        assert_same_bits(results_per_thread_count(run))
    finally:
        torch.ops.flashkd.quant_cpu_gemm("", True)
