"""Weight quantizers and packing of flashkd.quant against flashkd.reference.quant:
codes, scales and packed bytes bit-exact; pack/unpack exact inverses."""
import pytest
import torch

from flashkd.quant import formats, pack, unpack
from flashkd.reference import quant as ref
from checks import assert_same_bits, results_per_cpu_isa
from quant_cases import gen, randn

KS = [1, 3, 4, 5, 130, 257]


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("k", KS)
def test_ternary_weights_exact(k, per_tensor, device):
    w = randn((7, k), gen("tern", k, per_tensor), device=device, scale=0.05)
    w[0] = 0.0  # all-zero row: gamma clipped to 1e-5
    wq, scale = formats.ternary_weights(w, per_tensor)
    wq_ref, scale_ref = ref.ternary_weights(w.cpu(), per_tensor)
    assert torch.equal(wq.cpu(), wq_ref) and torch.equal(scale.cpu(), scale_ref)
    assert scale.shape == ((1,) if per_tensor else (7,))


def test_ternary_scale_is_float64_mean():
    w = torch.tensor([[1.0, 1e-8, -1e-8, 3.0]])
    _, scale = formats.ternary_weights(w)
    assert scale.item() == torch.tensor((1.0 + 1e-8 + 1e-8 + 3.0) / 4, dtype=torch.float32).item()


def test_ternary_scale_is_the_same_on_every_cpu_isa():
    # Rows whose mean |w| is a float32 midpoint (2^24 + 1, times K) plus tiny
    # entries: a float64 sum keeps or drops each tiny entry depending on which
    # partial sum it joins, and that decides the rounding. While the sum's
    # order was left to the vectorizer, AVX2 and AVX-512 gave different scales
    # here (for 2 to 65 of 256 such rows, by the exponent of the tiny entries).
    g = torch.Generator().manual_seed(11)
    k = 256
    rows = []
    for exponent in range(29, 37):
        for _ in range(32):
            w = torch.zeros(k)
            order = torch.randperm(k, generator=g)
            w[order[0]], w[order[1]] = 2.0 ** 24, 1.0
            w[order[2:2 + int(torch.randint(1, 200, (1,), generator=g))]] = 2.0 ** -exponent
            rows.append(w * k)
    w = torch.stack(rows) * (torch.randint(0, 2, (len(rows), k), generator=g) * 2 - 1)
    results = results_per_cpu_isa(lambda: formats.ternary_weights(w))
    assert_same_bits(results)
    wq, scale = next(iter(results.values()))
    # The oracle sums in its own order: within one float32 step of it.
    _, scale_ref = ref.ternary_weights(w)
    inf = torch.tensor(float("inf"))
    near = (scale == scale_ref) | (scale == torch.nextafter(scale_ref, inf)) | (scale == torch.nextafter(scale_ref, -inf))
    assert near.all()


@pytest.mark.parametrize("k", KS)
def test_int8_weights_exact(k, device):
    w = randn((6, k), gen("int8w", k), device=device)
    wq, scale = formats.int8_weights(w)
    wq_ref, scale_ref = ref.int8_weights(w.cpu())
    assert torch.equal(wq.cpu(), wq_ref) and torch.equal(scale.cpu(), scale_ref)
    assert int(wq.abs().max()) <= 127


@pytest.mark.parametrize("group_size", [1, 4, 32, 128])
@pytest.mark.parametrize("k", KS)
def test_int4_weights_exact(k, group_size, device):
    w = randn((5, k), gen("int4w", k, group_size), device=device)
    w[1] = 0.25  # constant rows: max - min clipped to 1e-5
    q, scale, zero = formats.int4_weights(w, group_size)
    q_ref, scale_ref, zero_ref = ref.int4_weights(w.cpu(), group_size)
    groups = -(-k // group_size)
    assert scale.shape == zero.shape == (5, groups)
    for got, want in ((q, q_ref), (scale, scale_ref), (zero, zero_ref)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_non_finite_weights_reach_their_scales(scheme, bad, device):
    """A NaN or infinite weight makes the scale of its row (int4: of its group,
    and its zero) what the oracle's is, NaN or inf, so that the outputs it
    reaches are not finite; a NaN-dropping max had quantized a NaN into valid
    codes. The other rows are bit-exact; a NaN's own codes are 0."""
    w = randn((5, 24), gen("nonfinite", scheme), device=device)
    w[2, 7] = bad
    got = formats.quantize_weight(w, scheme, 8)
    want = {"w1.58a8": lambda: ref.ternary_weights(w.cpu()), "w8a8": lambda: ref.int8_weights(w.cpu()),
            "w4a16": lambda: ref.int4_weights(w.cpu(), 8)}[scheme]()
    codes, params = got[0].cpu(), [t.cpu() for t in got[1:]]
    for a, b in zip(params, want[1:]):  # scale (and zero): NaN where the oracle's is NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(params[0][2]).all()
    clean = [0, 1, 3, 4]
    assert torch.equal(codes[clean], want[0][clean])
    if bad != bad:
        assert codes[2, 7] == 0
        if scheme != "w4a16":  # the whole row's scale is NaN: every code of the row is 0
            assert (codes[2] == 0).all()


@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_dequantized_weight(scheme, per_tensor):
    if per_tensor and scheme != "w1.58a8":
        pytest.skip("per_tensor is a w1.58a8 option")
    w = randn((9, 37), gen("deq", scheme, per_tensor))
    torch.testing.assert_close(formats.dequantized_weight(w, scheme, 8, per_tensor),
                               ref.dequantized_weight(w, scheme, 8, per_tensor), rtol=0, atol=0)


@pytest.mark.parametrize("k", KS)
def test_pack_unpack_ternary(k, device):
    wq = torch.randint(-1, 2, (6, k), generator=gen("packt", k)).to(torch.int8).to(device)
    packed = pack(wq, "w1.58a8")
    assert packed.dtype == torch.uint8 and packed.shape == (6, -(-k // 4))
    assert torch.equal(packed.cpu(), ref.pack_ternary(wq.cpu()))
    assert torch.equal(unpack(packed, "w1.58a8", k), wq)
    assert torch.equal(ref.unpack_ternary(packed.cpu(), k), wq.cpu())


@pytest.mark.parametrize("k", KS)
def test_pack_unpack_int4(k, device):
    q = torch.randint(0, 16, (6, k), generator=gen("pack4", k)).to(torch.uint8).to(device)
    packed = pack(q, "w4a16")
    assert packed.dtype == torch.uint8 and packed.shape == (6, -(-k // 2))
    assert torch.equal(packed.cpu(), ref.pack_int4(q.cpu()))
    assert torch.equal(unpack(packed, "w4a16", k), q)
    assert torch.equal(ref.unpack_int4(packed.cpu(), k), q.cpu())


def test_pack_unpack_int8():
    q = torch.randint(-127, 128, (3, 5), generator=gen("pack8")).to(torch.int8)
    assert torch.equal(unpack(pack(q, "w8a8"), "w8a8", 5), q)


def test_packing_bit_layout():
    # codes w + 1 at bits 2 * (k % 4); padding codes 1 (w = 0)
    assert pack(torch.tensor([[-1, 0, 1, 1, 1]]), "w1.58a8").tolist() == [[0b10_10_01_00, 0b01_01_01_10]]
    # even k in the low nibble, padding nibble 0
    assert pack(torch.tensor([[3, 12, 7]]), "w4a16").tolist() == [[0xC3, 0x07]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="scheme"):
        pack(torch.zeros(2, 2, dtype=torch.int8), "w2a8")
    with pytest.raises(ValueError, match="w_int"):
        pack(torch.full((2, 2), 2, dtype=torch.int8), "w1.58a8")
    with pytest.raises(ValueError, match="w_int"):
        pack(torch.full((2, 2), 16), "w4a16")
    with pytest.raises(TypeError, match="w_int"):
        pack(torch.zeros(2, 2), "w4a16")
    with pytest.raises(ValueError, match="w_int"):
        pack(torch.zeros(4, dtype=torch.int8), "w1.58a8")
    with pytest.raises(ValueError, match="packed"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), "w1.58a8", 5)  # needs 2 bytes per row
    with pytest.raises(ValueError, match="packed"):
        unpack(torch.zeros(2, 2, dtype=torch.int8), "w4a16", 4)
    with pytest.raises(ValueError, match="in_features"):
        unpack(torch.zeros(2, 2, dtype=torch.uint8), "w4a16", -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_quantize_weight_16bit_and_strided(scheme, dtype, device):
    """16-bit latent weights and a transposed (non-contiguous) view quantize like
    their float32 values in the oracle."""
    w = randn((40, 33), gen("qw16", scheme, dtype), dtype, device).t()  # (33, 40), strided
    got = formats.quantize_weight(w, scheme, 8)
    want = {"w1.58a8": lambda: ref.ternary_weights(w.cpu()), "w8a8": lambda: ref.int8_weights(w.cpu()),
            "w4a16": lambda: ref.int4_weights(w.cpu(), 8)}[scheme]()
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    if scheme == "w1.58a8":  # the per-tensor gamma, summed over the 16-bit values
        for a, b in zip(formats.ternary_weights(w, True), ref.ternary_weights(w.cpu(), True)):
            assert torch.equal(a.cpu(), b)


def test_quantize_weight_opcheck(device):
    w = randn((5, 37), gen("qw-opcheck"), device=device)
    for scheme, per_tensor in (("w1.58a8", False), ("w1.58a8", True), ("w8a8", False), ("w4a16", False)):
        torch.library.opcheck(torch.ops.flashkd.quantize_weight.default, (w, scheme, 8, per_tensor))


def test_quantize_weight_bad_inputs():
    op = torch.ops.flashkd.quantize_weight
    with pytest.raises(ValueError, match="scheme"):
        op(torch.zeros(2, 2), "w2a8")
    with pytest.raises(ValueError, match="group_size"):
        op(torch.zeros(2, 2), "w4a16", 0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        op(torch.zeros(4), "w8a8")
    with pytest.raises(TypeError, match="weight"):
        op(torch.zeros(2, 2, dtype=torch.int32), "w8a8")
