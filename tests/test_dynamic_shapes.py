"""torch.compile(dynamic=True) of every op family: one graph serves every token
count (sequence lengths vary between training steps), and each call equals eager.

The fake (meta) implementations must then compute output shapes from symbolic
sizes without specializing on them; a `if n > ...` on a size in Python glue, or
an op whose fake result is sized from data, would recompile per shape or break
the graph. Compiled with aot_eager: the fake implementations and the autograd
registration are what is under test, not Inductor's code generation.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flashkd
import flashkd.tome as tome
from flashkd.prune import topk_tokens
from flashkd.quant import QuantLinear


def assert_compiled_once(fn, make_args, sizes, n_leaves, rtol=1e-5, atol=1e-6):
    """Calls fn compiled with dynamic=True on make_args(n) for each n in sizes, each
    time against eager (the output, a scalar to backpropagate, and the gradients of the
    first n_leaves arguments); no size after the first may compile anything. Sizes
    start at 2: torch compiles sizes 0 and 1 apart from the rest by design."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    graphs_after_first = None
    for n in sizes:
        results = []
        for f in (fn, compiled):
            args = make_args(n)
            for a in args[:n_leaves]:
                a.requires_grad_(True)
            out = f(*args)
            out.backward()
            results.append([out.detach()] + [a.grad for a in args[:n_leaves]])
        for i, (want, got) in enumerate(zip(*results)):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"n={n}, output {i}")
        graphs_after_first = graphs_after_first or counter.frame_count
        assert counter.frame_count == graphs_after_first, f"size {n} compiled again"
    assert graphs_after_first > 0, "nothing was compiled"


def seeded(n):
    return torch.Generator().manual_seed(1000 + n)


def test_distill_loss(device):
    def f(s, t, labels):
        loss, stats = flashkd.distill_loss(s, t, divergence="jsd", labels=labels, hard_weight=0.5,
                                           temperature=2.0, return_stats=True)
        return loss + stats["student_entropy"].mean()

    def args(n):
        g = seeded(n)
        s, t = torch.randn(2, n, 37, generator=g), torch.randn(2, n, 37, generator=g)
        return [x.to(device) for x in (s, t, torch.randint(0, 37, (2, n), generator=g))]

    assert_compiled_once(f, args, (3, 7, 12), 1)


def test_distill_loss_per_token(device):
    def f(s, t, labels):
        return (flashkd.distill_loss(s, t, divergence="rkl", labels=labels, hard_weight=0.3,
                                     reduction="none") * 1.5).sum()

    def args(n):
        g = seeded(n)
        s, t = torch.randn(n, 29, generator=g), torch.randn(n, 29, generator=g)
        return [x.to(device) for x in (s, t, torch.randint(0, 29, (n,), generator=g))]

    assert_compiled_once(f, args, (4, 9, 16), 1)


def test_linear_losses(device):
    """Both linear losses, shifted, with several chunks per call at every size."""
    budget = 3 * 31 * 4  # three float32 rows of 31 logits: chunks of 3 tokens

    def f(h, w, th, tw, labels):
        ce = flashkd.linear_cross_entropy(h, w, labels, shift=True, chunk_budget_bytes=budget)
        kd = flashkd.linear_distill_loss(h, w, th, tw, labels=labels, hard_weight=0.5, divergence="fkl",
                                         chunk_budget_bytes=budget)
        return ce + kd

    def args(n):
        g = seeded(n)
        xs = (torch.randn(2, n, 16, generator=g), torch.randn(31, 16, generator=g) / 4,
              torch.randn(2, n, 12, generator=g), torch.randn(35, 12, generator=g) / 4,
              torch.randint(0, 31, (2, n), generator=g))
        return [x.to(device) for x in xs]

    assert_compiled_once(f, args, (5, 8, 13), 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_quant_linear(scheme, device):
    layer = QuantLinear(40, 24, scheme=scheme, group_size=8).to(device)

    def f(x):
        return layer(x).square().mean()

    def args(n):
        return [torch.randn(n, 40, generator=seeded(n)).to(device)]

    assert_compiled_once(f, args, (2, 6, 11), 1)


def test_token_merging_over_token_counts(device):
    """ToMe's merge and unmerge, and top-k pruning keeping half the tokens, as the
    image size (the token count) varies: the sizes reach the ops as symbols."""
    def f(metric, x):
        merge, unmerge = tome.bipartite_soft_matching(metric, 4, class_token=True)
        y, size = tome.merge_wavg(merge, x)
        kept, _ = topk_tokens(x, metric.norm(dim=-1), x.shape[1] // 2)
        return unmerge(y).square().sum() + size.sum() + kept.sum()

    def args(t):
        g = seeded(t)
        return [torch.randn(2, t, 8, generator=g).to(device), torch.randn(2, t, 6, generator=g).to(device)]

    assert_compiled_once(f, args, (17, 33, 50), 2)


def test_token_merging_over_batches(device):
    """ToMe's merge in a ViT block: the batch varies, the token count (the image's)
    does not; top-k pruning alike."""
    def f(metric, x):
        merge, unmerge = tome.bipartite_soft_matching(metric, 5, class_token=True)
        y, size = tome.merge_wavg(merge, x)
        kept, _ = topk_tokens(x, metric.norm(dim=-1), 6)
        return unmerge(y).square().sum() + size.sum() + kept.sum()

    def args(b):
        g = seeded(b)
        return [torch.randn(b, 17, 8, generator=g).to(device), torch.randn(b, 17, 6, generator=g).to(device)]

    assert_compiled_once(f, args, (2, 3, 5), 2)
