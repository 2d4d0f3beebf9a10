"""Reference decoder LM (flashkd.models.lm)."""
import copy

import pytest
import torch

from flashkd.models import PRESETS, DecoderLM, LMConfig


def _tokens(cfg, batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


@pytest.mark.parametrize("tie_head", [True, False])
def test_shapes(tie_head):
    cfg = LMConfig.preset("tiny", tie_head=tie_head)
    model = DecoderLM(cfg, seed=1)
    x = _tokens(cfg, batch=3, seq=17)
    hidden = model(x)
    assert hidden.shape == (3, 17, cfg.dim) and hidden.dtype == torch.float32
    assert model.head_weight.shape == (cfg.vocab_size, cfg.dim)
    logits = model.logits(x)
    assert logits.shape == (3, 17, cfg.vocab_size)
    torch.testing.assert_close(logits, hidden @ model.head_weight.T)
    assert torch.isfinite(logits).all()


def test_tied_head_shares_storage():
    model = DecoderLM(LMConfig.preset("tiny", tie_head=True))
    assert model.head is None
    assert model.head_weight is model.embed.weight
    assert model.head_weight.data_ptr() == model.embed.weight.data_ptr()
    with torch.no_grad():
        model.embed.weight[3, 5] = 123.0
    assert model.head_weight[3, 5].item() == 123.0
    # counted once
    assert model.num_parameters() == model.config.num_parameters()
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()


def test_untied_head_is_separate():
    model = DecoderLM(LMConfig.preset("tiny", tie_head=False))
    assert model.head_weight is model.head.weight
    assert model.head_weight.data_ptr() != model.embed.weight.data_ptr()
    assert not torch.equal(model.head_weight, model.embed.weight)
    assert model.num_parameters() == model.config.num_parameters()


def test_gradients_reach_every_parameter():
    model = DecoderLM(LMConfig.preset("tiny", tie_head=False))
    x = _tokens(model.config)
    model.logits(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pos", [0, 5, 11])
def test_causal(pos):
    cfg = LMConfig.preset("tiny")
    model = DecoderLM(cfg, seed=2)
    x = _tokens(cfg, batch=2, seq=12)
    y = x.clone()
    y[:, pos] = (y[:, pos] + 1 + torch.arange(2)) % cfg.vocab_size
    hx, hy = model(x), model(y)
    torch.testing.assert_close(hx[:, :pos], hy[:, :pos], rtol=0, atol=1e-6)
    assert (hx[:, pos] - hy[:, pos]).abs().max() > 1e-4  # the changed position itself does change
    if pos + 1 < x.shape[1]:
        assert (hx[:, pos + 1:] - hy[:, pos + 1:]).abs().max() > 1e-4  # and so does what follows


def test_positions_matter():
    """Rotary embeddings make the model order-aware: same tokens, shifted order."""
    cfg = LMConfig.preset("tiny")
    model = DecoderLM(cfg)
    x = torch.tensor([[7, 7, 7, 9, 7, 7]])
    y = torch.tensor([[7, 7, 9, 7, 7, 7]])
    assert (model(x)[0, -1] - model(y)[0, -1]).abs().max() > 1e-5


def test_seeded_init():
    cfg = LMConfig.preset("tiny")
    state = torch.random.get_rng_state()
    a, b, c = DecoderLM(cfg, seed=5), DecoderLM(cfg, seed=5), DecoderLM(cfg, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state), "init must not touch the global RNG"
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(pa, pc), n
    d = copy.deepcopy(a)
    d.reset_parameters(6)
    for pd, pc in zip(d.parameters(), c.parameters()):
        assert torch.equal(pd, pc)


def test_batch_independent():
    cfg = LMConfig.preset("tiny")
    model = DecoderLM(cfg)
    x = _tokens(cfg, batch=3, seq=9)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-6)


def test_dtype_and_device_args():
    model = DecoderLM("tiny", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = _tokens(model.config)
    assert model(x).dtype == torch.float64
    ref = DecoderLM("tiny")
    torch.testing.assert_close(model(x).float(), ref(x), rtol=1e-4, atol=1e-5)


# preset name -> allowed parameter-count range
RANGES = {"tiny": (80_000, 120_000), "mini": (0.8e6, 1.2e6), "small": (5e6, 10e6), "medium": (30e6, 60e6),
          "gpt2-small": (110e6, 140e6)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    cfg = LMConfig.preset(name)
    lo, hi = RANGES[name]
    assert lo <= cfg.num_parameters() <= hi, (name, cfg.num_parameters())
    if name in ("tiny", "mini", "small"):  # cheap enough to build
        assert DecoderLM(cfg).num_parameters() == cfg.num_parameters()


def test_gpt2_small_shape():
    cfg = LMConfig.preset("gpt2-small")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.tie_head) == (768, 12, 12, 50257, True)
    # with meta tensors the full model is built without allocating memory
    with torch.device("meta"):
        model = DecoderLM(LMConfig.preset("gpt2-small", max_seq_len=16))
    assert model.num_parameters() == cfg.num_parameters()
    assert PRESETS["tiny"].num_parameters() < PRESETS["mini"].num_parameters() < PRESETS["small"].num_parameters() \
        < PRESETS["medium"].num_parameters() < cfg.num_parameters()


@pytest.mark.parametrize("bad, match", [
    (dict(dim=65), "divisible by n_heads"),
    (dict(dim=12, n_heads=4), "must be even"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(n_heads=2.0), "n_heads"),
    (dict(mlp_hidden=True), "mlp_hidden"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(init_std=-1.0), "init_std"),
    (dict(rope_base=1.0), "rope_base"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        LMConfig.preset("tiny", **bad)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown LM preset"):
        LMConfig.preset("huge")
    with pytest.raises(TypeError, match="LMConfig"):
        DecoderLM(42)
    model = DecoderLM(LMConfig.preset("tiny", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens must be integer token ids"):
        model(torch.zeros(1, 4))


def test_fused_losses_on_model():
    """The intended use: hidden + head weight into the fused linear losses."""
    from flashkd import reference
    from flashkd.nn import LinearCrossEntropyLoss, LinearDistillLoss

    cfg = LMConfig.preset("tiny")
    student = DecoderLM(LMConfig.preset("tiny", dim=32, n_heads=2, mlp_hidden=64), seed=1)
    teacher = DecoderLM(cfg, seed=2)
    x = _tokens(cfg, batch=2, seq=10)
    h, th = student(x), teacher(x).detach()
    ce = LinearCrossEntropyLoss(shift=True)(h, student.head_weight, x)
    torch.testing.assert_close(ce, reference.linear_cross_entropy(h, student.head_weight, x, shift=True))
    opts = dict(divergence="jsd", temperature=2.0, hard_weight=0.5, soft_weight=0.5, shift=True)
    kd = LinearDistillLoss(**opts)(h, student.head_weight, th, teacher.head_weight.detach(), labels=x)
    ref = reference.linear_distill_loss(h, student.head_weight, th, teacher.head_weight.detach(), labels=x, **opts)
    torch.testing.assert_close(kd, ref)
    g_kd = torch.autograd.grad(kd, student.head_weight, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, student.head_weight)[0]
    torch.testing.assert_close(g_kd, g_ref, rtol=1e-4, atol=1e-6)
