"""Reference ViT (flashkd.models.vit) and the ToMe / pruning patches on it
(flashkd.tome.patch, flashkd.prune.patch): the patched model on flashkd's
kernels against the same weights with the pure-torch oracle patched in."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import flashkd.prune
import flashkd.tome
from flashkd.models import VIT_PRESETS, VisionTransformer, ViTConfig
from flashkd.models.vit import Attention
from flashkd.reference import tome as oracle

# 8x8 grid of 4-pixel patches: 65 tokens, enough for several layers of merging.
GRID = dict(img_size=32, patch_size=4, dim=48, depth=4, n_heads=3, mlp_hidden=96)


def _model(device, seed=0, **overrides):
    return VisionTransformer(ViTConfig.preset("tiny", **{**GRID, **overrides}), seed=seed, device=device)


def _images(model, batch=3, seed=1, device="cpu"):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)


def _token_counts(model, images):
    """Tokens entering each block, then leaving the last one."""
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])) for b in model.blocks]
    try:
        out = model.features(images)
    finally:
        for h in hooks:
            h.remove()
    return counts + [out.shape[1]]


def _patched_pair(device, patch, **kwargs):
    """The same weights patched with flashkd's kernels and with the oracle."""
    fast = _model(device)
    slow = copy.deepcopy(fast)
    patch(fast, **kwargs)
    patch(slow, **kwargs, impl=oracle)
    return fast, slow


# --- the model itself -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_and_dtypes(device, dtype):
    model = VisionTransformer("tiny", seed=0, device=device, dtype=dtype)
    cfg = model.config
    images = _images(model, batch=5, device=device).to(dtype)
    logits = model(images)
    assert logits.shape == (5, cfg.num_classes) and logits.dtype == dtype
    assert torch.isfinite(logits).all()
    features = model.features(images)
    assert features.shape == (5, cfg.num_tokens, cfg.dim)
    torch.testing.assert_close(logits, model.head(features[:, 0]))


def test_presets_and_parameter_count():
    assert ViTConfig.preset("vit-b16").num_tokens == 197
    assert ViTConfig.preset("vit-s16", num_classes=10).dim == 384
    for name, cfg in VIT_PRESETS.items():
        if name in ("tiny", "vit-ti16"):
            assert VisionTransformer(cfg).num_parameters() == cfg.num_parameters(), name
    with torch.device("meta"):  # shape-only: the big presets count without allocating
        assert VisionTransformer("vit-b16").num_parameters() == VIT_PRESETS["vit-b16"].num_parameters()
    assert 86e6 < VIT_PRESETS["vit-b16"].num_parameters() < 87e6


@pytest.mark.parametrize("field, value", [("patch_size", 5), ("n_heads", 5), ("depth", 0), ("dim", 1.5),
                                          ("norm_eps", 0.0), ("init_std", -1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ViTConfig.preset("tiny", **{field: value})


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown ViT preset"):
        ViTConfig.preset("vit-h14")
    with pytest.raises(TypeError, match="config"):
        VisionTransformer(64)


def test_seeded_init_is_reproducible_and_leaves_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = VisionTransformer("tiny", seed=4), VisionTransformer("tiny", seed=4), VisionTransformer("tiny", seed=5)
    assert torch.equal(torch.rand(1), before)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name and "bias" not in name:
            assert not torch.equal(pa, pc), name


def test_bad_images_raise():
    model = VisionTransformer("tiny")
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 16, 16))


def test_attention_extras_match_the_explicit_attention_matrix(device):
    torch.manual_seed(0)
    cfg = ViTConfig.preset("tiny")
    attn = Attention(cfg).to(device)
    x = torch.randn(2, 9, cfg.dim, device=device)
    bias = torch.rand(2, 1, 1, 9, device=device).log()
    plain = attn(x)
    assert plain.metric is None and plain.cls_attn is None  # only computed when asked
    out = attn(x, bias, metric=True, cls_attn=True)
    q, k, v = attn.qkv(x).view(2, 9, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-1, -2)) * cfg.head_dim ** -0.5 + bias).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 9, cfg.dim))
    torch.testing.assert_close(out.out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metric, k.mean(1))
    torch.testing.assert_close(out.cls_attn, probs[:, :, 0].mean(1), rtol=1e-5, atol=1e-6)


# --- ToMe ---------------------------------------------------------------------

def test_parse_r_matches_tome():
    parse_r = flashkd.tome.parse_r
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, [5, 1]) == [5, 1, 0, 0]
    assert parse_r(4, (3, 0)) == [3, 3, 3, 3]
    # ToMe: low = int(r (1 - inflection)), high = 2 r - low, linear in between, truncated.
    assert parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r(4, (8, 1)) == [0, 5, 10, 16]
    assert parse_r(5, (10, 0.5)) == [5, 7, 10, 12, 15]
    assert parse_r(1, (4, -1)) == [8]


@pytest.mark.parametrize("r, match", [(-1, "r must"), (1.5, "r must"), ([1, -2], r"r\[1\]"),
                                      ([1] * 5, "5 layers"), ((2, 1.5), "inflection"), ((2, 0, 1), "tuple")])
def test_bad_r_raises(r, match):
    with pytest.raises(ValueError, match=match):
        flashkd.tome.patch(VisionTransformer("tiny"), r)


def test_patch_rejects_other_models_and_flags():
    with pytest.raises(TypeError, match="model"):
        flashkd.tome.patch(torch.nn.Linear(2, 2), 2)
    with pytest.raises(TypeError, match="prop_attn"):
        flashkd.tome.patch(VisionTransformer("tiny"), 2, prop_attn=1)


def _expected_counts(tokens, schedule):
    counts = [tokens]
    for r in schedule:  # ToMe merges at most half of the non-class tokens
        counts.append(counts[-1] - min(r, (counts[-1] - 1) // 2))
    return counts


@pytest.mark.parametrize("r", [4, [40, 0, 9, 3], (6, -1), (5, 0.5)], ids=["int", "list", "decreasing", "inflect"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_matches_oracle(device, r, prop_attn):
    fast, slow = _patched_pair(device, flashkd.tome.patch, r=r, prop_attn=prop_attn, trace_source=True)
    images = _images(fast, device=device)
    out = fast(images)
    torch.testing.assert_close(out, slow(images), rtol=1e-5, atol=1e-5)
    schedule = flashkd.tome.parse_r(fast.config.depth, r)
    expected = _expected_counts(fast.config.num_tokens, schedule)
    assert _token_counts(fast, images) == expected
    # Sources and sizes are those of the last forward, and agree with each other.
    fast(images)
    slow(images)
    source, size = fast.token_reduction.source, fast.token_reduction.size
    assert source.shape == (3, expected[-1], fast.config.num_tokens)
    torch.testing.assert_close(source, slow.token_reduction.source)
    torch.testing.assert_close(size, slow.token_reduction.size)
    torch.testing.assert_close(size[..., 0], source.sum(-1))
    assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))  # every input token lands exactly once
    assert source[:, 0, 0].eq(1).all() and size[:, 0, 0].eq(1).all()  # the class token stays alone, first


def test_r_zero_and_unpatch_give_the_plain_model(device):
    model = _model(device)
    images = _images(model, device=device)
    plain = model(images)
    flashkd.tome.patch(model, 0)
    assert torch.equal(model(images), plain)
    assert _token_counts(model, images) == [model.config.num_tokens] * (model.config.depth + 1)
    flashkd.tome.patch(model, 8)
    assert not torch.allclose(model(images), plain)
    flashkd.tome.unpatch(model)
    assert model.token_reduction is None and torch.equal(model(images), plain)


def test_tome_bf16_model_runs(device):
    model = flashkd.tome.patch(_model(device).to(torch.bfloat16), 6)
    logits = model(_images(model, device=device).to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_tome_compiles(device):
    model = flashkd.tome.patch(_model(device), 6)
    images = _images(model, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)


# --- pruning --------------------------------------------------------------------

def _expected_pruned_counts(tokens, depth, keep_rate, layers, fuse):
    counts = [tokens]
    for layer in range(depth):
        t = counts[-1]
        keep = 1 + math.ceil(keep_rate * (t - 1))
        counts.append(keep + int(fuse) if layer in layers and keep < t else t)
    return counts


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_rate, layers", [(0.7, (1, 2)), (0.5, (0, 1, 3)), (1.0, (0,))])
def test_prune_matches_oracle(device, keep_rate, layers, fuse):
    fast, slow = _patched_pair(device, flashkd.prune.patch, keep_rate=keep_rate, layers=layers,
                               fuse_remainder=fuse)
    images = _images(fast, device=device)
    torch.testing.assert_close(fast(images), slow(images), rtol=1e-5, atol=1e-5)
    expected = _expected_pruned_counts(fast.config.num_tokens, fast.config.depth, keep_rate, layers, fuse)
    assert _token_counts(fast, images) == expected


def test_prune_keeps_the_most_attended_tokens(device):
    """With one pruning layer at the input, the kept tokens are the class token
    then the patches in descending class attention, read from the block itself."""
    model = flashkd.prune.patch(_model(device), 0.25, [0])
    images = _images(model, device=device)
    block = model.blocks[0]
    x = model.tokens(images)
    attn = block.attn(block.norm1(x), cls_attn=True)
    order = attn.cls_attn[:, 1:].argsort(dim=1, descending=True)[:, :16] + 1
    kept = torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)
    residual = x + attn.out
    expected = residual.gather(1, kept[..., None].expand(-1, -1, residual.shape[-1]))
    got = block(x, model.token_reduction.start(x))
    torch.testing.assert_close(got, expected + block.mlp(block.norm2(expected)))


@pytest.mark.parametrize("patch, kwargs", [
    (flashkd.tome.patch, dict(r=(6, -1))),
    (flashkd.prune.patch, dict(keep_rate=0.6, layers=(1, 2), fuse_remainder=True)),
], ids=["tome", "prune"])
def test_gradients_match_oracle(patch, kwargs, device):
    """Every parameter's gradient through the fused-kernel patch equals the oracle patch's."""
    fast, slow = _patched_pair(device, patch, **kwargs)
    images = _images(fast, device=device)
    for model in (fast, slow):
        F.cross_entropy(model(images), torch.tensor([1, 2, 3], device=device)).backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep_rate=0.0, layers=[1]), ValueError, "keep_rate"),
    (dict(keep_rate=1.5, layers=[1]), ValueError, "keep_rate"),
    (dict(keep_rate=0.5, layers=[4]), ValueError, "layers"),
    (dict(keep_rate=0.5, layers=[True]), ValueError, "layers"),
    (dict(keep_rate=0.5, layers=[1], fuse_remainder="yes"), TypeError, "fuse_remainder"),
])
def test_bad_prune_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        flashkd.prune.patch(VisionTransformer("tiny"), **kwargs)
