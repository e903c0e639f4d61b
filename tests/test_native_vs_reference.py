"""The native kernels equal their pure-PyTorch twins, on every SIMD level this machine has.

Integer codes, scales, zero points and fake-quantized values must agree bit
for bit; error sums agree within rtol 1e-5 (the native core sums in another
order, in float blocks flushed to double).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixquant
from conftest import simd_levels

LEVELS = simd_levels()
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def weights(draw, max_c: int = 9, max_k: int = 300) -> torch.Tensor:
    """Random weight tensors with odd sizes, special channels, wide magnitudes, other dtypes and layouts."""
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=g, dtype=torch.float64)
    magnitude = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-30, 1e30, 1e-20]))
    w = w * magnitude
    if draw(st.booleans()):
        w = w + draw(st.sampled_from([0.5, -2.0, 3.0])) * magnitude  # one-signed ranges
    special = draw(st.sampled_from(["none", "zero_row", "const_row", "all_zero", "skewed", "halves"]))
    if special == "zero_row":
        w[draw(st.integers(0, c - 1))] = 0
    elif special == "const_row":
        w[draw(st.integers(0, c - 1))] = 0.7 * magnitude
    elif special == "all_zero":
        w.zero_()
    elif special == "skewed":
        w[:, 0] *= 1e6
    elif special == "halves":  # values on .5 boundaries exercise round-half-to-even
        w = torch.round(w / magnitude * 4) / 8 * magnitude
    dtype = draw(st.sampled_from(DTYPES))
    w = w.to(dtype)
    if not torch.isfinite(w).all():  # a float16 overflow from the magnitude: keep the example finite
        w = torch.nan_to_num(w, posinf=1e4, neginf=-1e4) if dtype == torch.float16 else w.clamp(-1e30, 1e30)
        w = torch.nan_to_num(w, posinf=0.0, neginf=0.0)
    if draw(st.booleans()) and c > 1:  # a non-contiguous view with the same values
        w = w.t().contiguous().t()
    return w


def assert_close_sums(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    assert np.all(np.abs(a - b) <= rtol * scale + 1e-300), (a, b)


bits_lists = st.lists(st.integers(1, 16), min_size=1, max_size=7, unique=True)


@pytest.mark.parametrize("level", LEVELS)
@SETTINGS
@given(w=weights(), bits=bits_lists, per_channel=st.booleans(), symmetric=st.booleans())
def test_roundoff_error(level, w, bits, per_channel, symmetric):
    with mixquant.use_simd_level(level):
        nat = mixquant.roundoff_error(w, bits, per_channel=per_channel, symmetric=symmetric, backend="native")
    ref = mixquant.roundoff_error(w, bits, per_channel=per_channel, symmetric=symmetric, backend="reference")
    np.testing.assert_array_equal(nat.scale, ref.scale)
    np.testing.assert_array_equal(nat.zero_point, ref.zero_point)
    assert_close_sums(nat.channel_sse, ref.channel_sse)
    np.testing.assert_allclose(nat.channel_max_abs, ref.channel_max_abs, rtol=1e-6, atol=0)
    assert_close_sums(nat.norm, ref.norm)


@pytest.mark.parametrize("level", LEVELS)
@SETTINGS
@given(w=weights(max_k=120), bits=st.lists(st.integers(2, 8), min_size=1, max_size=3, unique=True),
       per_channel=st.booleans(), symmetric=st.booleans(), p=st.sampled_from([2.0, 2.4, 1.0, 3.0]),
       grid=st.sampled_from([(1, 0.01), (7, 0.1), (20, 0.02)]))
def test_clip_search(level, w, bits, per_channel, symmetric, p, grid):
    n_grid, step = grid
    kw = dict(per_channel=per_channel, symmetric=symmetric, p=p, n_grid=n_grid, step=step)
    with mixquant.use_simd_level(level):
        nat = mixquant.clip_search(w, bits, backend="native", **kw)
    ref = mixquant.clip_search(w, bits, backend="reference", **kw)
    assert_close_sums(nat.lp_err.numpy(), ref.lp_err.numpy(), rtol=1e-5)
    same = nat.best_index == ref.best_index  # near-ties may pick another ratio of equal error
    assert torch.equal(nat.scale[same], ref.scale[same])
    assert torch.equal(nat.zero_point[same], ref.zero_point[same])


@pytest.mark.parametrize("level", LEVELS)
@SETTINGS
@given(w=weights(), bits=st.integers(1, 16), per_channel=st.booleans(), symmetric=st.booleans())
def test_qparams_fake_quantize_codes(level, w, bits, per_channel, symmetric):
    kw = dict(per_channel=per_channel, symmetric=symmetric)
    with mixquant.use_simd_level(level):
        scale, zp = mixquant.choose_qparams(w, bits, backend="native", **kw)
        fq = mixquant.fake_quantize_tensor(w, scale, zp, bits, backend="native")
        codes = mixquant.quantize_tensor(w, scale, zp, bits, backend="native")
        deq = mixquant.dequantize_tensor(codes, scale, zp, backend="native")
    r_scale, r_zp = mixquant.choose_qparams(w, bits, backend="reference", **kw)
    assert torch.equal(scale, r_scale) and torch.equal(zp, r_zp)
    assert torch.equal(fq, mixquant.fake_quantize_tensor(w, scale, zp, bits, backend="reference"))
    r_codes = mixquant.quantize_tensor(w, scale, zp, bits, backend="reference")
    assert codes.dtype == r_codes.dtype and torch.equal(codes, r_codes)
    assert int(codes.max()) <= 2**bits - 1
    assert torch.equal(deq, fq)
    assert torch.equal(deq, mixquant.dequantize_tensor(codes, scale, zp, backend="reference"))


@SETTINGS
@given(bits=st.integers(1, 16), n=st.integers(0, 2000), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=n)
    packed = mixquant.pack_bits(codes, bits, backend="native")
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(packed, mixquant.pack_bits(codes, bits, backend="reference"))
    for backend in ("native", "reference"):
        out = mixquant.unpack_bits(packed, bits, n, backend=backend)
        np.testing.assert_array_equal(out.astype(np.int64), codes)


def test_fake_quantize_matches_torch_formula():
    w = torch.randn(16, 75)
    for bits in range(2, 9):
        scale, zp = mixquant.choose_qparams(w, bits)
        expected = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, 0, 2**bits - 1)
        assert torch.equal(mixquant.fake_quantize_tensor(w, scale, zp, bits), expected)


def test_conv_transpose_channel_axis():
    w = torch.randn(4, 6, 3, 3)  # ConvTranspose2d layout: output channels on axis 1
    scale, zp = mixquant.choose_qparams(w, 4, ch_axis=1)
    assert scale.shape == (6,)
    fq = mixquant.fake_quantize_tensor(w, scale, zp, 4, ch_axis=1)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zp, 1, 0, 15)
    assert torch.equal(fq, expected)


# ------------------------------------------------------------------ groups ----
group_sizes = st.sampled_from([1, 3, 7, 32, 64, 128, 1000])
GROUP_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("level", LEVELS)
@GROUP_SETTINGS
@given(w=weights(), bits=bits_lists, group_size=group_sizes, symmetric=st.booleans())
def test_group_roundoff_error(level, w, bits, group_size, symmetric):
    kw = dict(per_channel=True, symmetric=symmetric, group_size=group_size)
    with mixquant.use_simd_level(level):
        nat = mixquant.roundoff_error(w, bits, backend="native", **kw)
    ref = mixquant.roundoff_error(w, bits, backend="reference", **kw)
    np.testing.assert_array_equal(nat.scale, ref.scale)
    np.testing.assert_array_equal(nat.zero_point, ref.zero_point)
    assert nat.scale.shape == (len(bits), w.shape[0] * -(-w[0].numel() // group_size))
    assert_close_sums(nat.channel_sse, ref.channel_sse)
    np.testing.assert_allclose(nat.channel_max_abs, ref.channel_max_abs, rtol=1e-6, atol=0)
    assert_close_sums(nat.norm, ref.norm)


@pytest.mark.parametrize("level", LEVELS)
@GROUP_SETTINGS
@given(w=weights(max_k=120), bits=st.lists(st.integers(2, 8), min_size=1, max_size=3, unique=True),
       group_size=group_sizes, symmetric=st.booleans(), p=st.sampled_from([2.0, 2.4, 1.0]),
       grid=st.sampled_from([(1, 0.01), (7, 0.1), (20, 0.02)]))
def test_group_clip_search_and_mse_table(level, w, bits, group_size, symmetric, p, grid):
    n_grid, step = grid
    kw = dict(per_channel=True, symmetric=symmetric, p=p, n_grid=n_grid, step=step, group_size=group_size)
    with mixquant.use_simd_level(level):
        nat = mixquant.clip_search(w, bits, backend="native", **kw)
        nat_err = mixquant.roundoff_error(w, bits, clip="mse", backend="native", **kw)
    ref = mixquant.clip_search(w, bits, backend="reference", **kw)
    ref_err = mixquant.roundoff_error(w, bits, clip="mse", backend="reference", **kw)
    assert_close_sums(nat.lp_err.numpy(), ref.lp_err.numpy(), rtol=1e-5)
    same = nat.best_index == ref.best_index  # near-ties may pick another ratio of equal error
    assert torch.equal(nat.scale[same], ref.scale[same])
    assert torch.equal(nat.zero_point[same], ref.zero_point[same])
    if bool(same.all()):
        assert_close_sums(nat_err.channel_sse, ref_err.channel_sse)


@pytest.mark.parametrize("level", LEVELS)
@GROUP_SETTINGS
@given(w=weights(), bits=st.integers(1, 16), group_size=group_sizes, symmetric=st.booleans())
def test_group_qparams_fake_quantize_codes(level, w, bits, group_size, symmetric):
    kw = dict(per_channel=True, symmetric=symmetric, group_size=group_size)
    gs = dict(group_size=group_size)
    with mixquant.use_simd_level(level):
        scale, zp = mixquant.choose_qparams(w, bits, backend="native", **kw)
        fq = mixquant.fake_quantize_tensor(w, scale, zp, bits, backend="native", **gs)
        codes = mixquant.quantize_tensor(w, scale, zp, bits, backend="native", **gs)
        deq = mixquant.dequantize_tensor(codes, scale, zp, backend="native", **gs)
    r_scale, r_zp = mixquant.choose_qparams(w, bits, backend="reference", **kw)
    assert scale.shape == (w.shape[0], -(-w[0].numel() // group_size))
    assert torch.equal(scale, r_scale) and torch.equal(zp, r_zp)
    assert torch.equal(scale, scale.bfloat16().float())  # stored as bfloat16 without loss
    assert torch.equal(fq, mixquant.fake_quantize_tensor(w, scale, zp, bits, backend="reference", **gs))
    r_codes = mixquant.quantize_tensor(w, scale, zp, bits, backend="reference", **gs)
    assert codes.dtype == r_codes.dtype and torch.equal(codes, r_codes)
    assert int(codes.max()) <= 2**bits - 1
    assert torch.equal(deq, fq)
    assert torch.equal(deq, mixquant.dequantize_tensor(codes, scale, zp, backend="reference", **gs))


def test_group_size_at_least_the_row_is_one_group_per_row():
    w = torch.randn(6, 40)
    g = mixquant.roundoff_error(w, range(2, 9), per_channel=True, group_size=40)
    big = mixquant.roundoff_error(w, range(2, 9), per_channel=True, group_size=4096)
    np.testing.assert_array_equal(g.scale, big.scale)
    np.testing.assert_array_equal(g.channel_sse, big.channel_sse)
    assert g.scale.shape == (7, 6)
# -- the fused AdaRound step (csrc/rounding_*.cpp vs core/reference.py) ------------------


def _flat_rounding(seed: int):
    from mixquant.core.rounding import FlatRounding

    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (5, 7), (3, 1, 2, 2), (37,)]
    Vs, fl, sc, lo, hi = [], [], [], [], []
    for i, shape in enumerate(shapes):
        V = torch.randn(shape, generator=g) * 3
        V.view(-1)[:3] = torch.tensor([0.0, 40.0, -95.0])  # h = 0.5 (|2h - 1| = 0), saturated either way
        f = torch.floor(torch.randn(shape, generator=g) * 3)
        per = (shape[0],) + (1,) * (len(shape) - 1) if i != 3 else (1,)  # per channel, and one per-tensor
        s = torch.rand(per, generator=g) + 0.05
        z = torch.randint(0, 4, per, generator=g).float()
        Vs.append(V)
        fl.append(f)
        sc.append(s)
        lo.append(-z)
        hi.append(3.0 - z)  # 2 bits: floor + h is clamped for many elements (at both ends)
    return FlatRounding.build(Vs, fl, sc, lo, hi), g


@pytest.mark.skipif(not LEVELS, reason="native core not built")
def test_rounding_step_native_matches_reference(simd):
    from mixquant.core.rounding import rounding_step, rounding_weight

    ref, g = _flat_rounding(0)
    nat, _ = _flat_rounding(0)
    rounding_weight(ref, backend="reference")
    rounding_weight(nat, backend="native")
    torch.testing.assert_close(nat.w, ref.w, rtol=2e-6, atol=1e-7)
    for it in range(12):
        gw = torch.randn(ref.V.shape, generator=g)
        coef, beta = (0.0, 20.0) if it < 4 else (0.05, 20.0 - it)  # warm-up, then the regulariser
        for state, be in ((ref, "reference"), (nat, "native")):
            rounding_step(state, gw, lr=1e-2, coef=coef, beta=beta, backend=be)
        for name in ("V", "exp_avg", "exp_avg_sq", "w"):
            torch.testing.assert_close(getattr(nat, name), getattr(ref, name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name} after step {it}: {m}")
    assert nat.steps == ref.steps == 12


@pytest.mark.skipif(not LEVELS, reason="native core not built")
def test_rounding_step_same_bits_on_every_level():
    from mixquant.core.rounding import rounding_step

    results = []
    for level in LEVELS:
        state, g = _flat_rounding(1)
        with mixquant.use_simd_level(level):
            for it in range(5):
                rounding_step(state, torch.randn(state.V.shape, generator=g), lr=1e-2, coef=0.01, beta=7.5,
                              num_threads=2, backend="native")
        results.append(torch.cat([state.V, state.exp_avg, state.exp_avg_sq, state.w]))
    for r in results[1:]:
        assert torch.equal(r, results[0])  # IEEE operations only: every level, any thread count


@pytest.mark.skipif(not LEVELS, reason="native core not built")
def test_rounding_binding_refuses_bad_buffers():
    from mixquant import _core

    n = 10
    a = {k: np.zeros(n, np.float32) for k in ("V", "floor", "gw", "m", "v", "w")}
    sc, lo, hi = np.ones(n, np.float32), np.zeros(n, np.float32), np.ones(n, np.float32)
    consts = dict(coef=0.01, beta=2.0, beta_minus_1=1.0, lerp_w=0.1, beta2=0.999, one_minus_beta2=0.001,
                  neg_step=-1e-3, bc2_sqrt=0.03, eps=1e-8, num_threads=1)

    def step(**over):
        kw = dict(V=a["V"], floor=a["floor"], scale=sc, lo=lo, hi=hi, grad_w=a["gw"], exp_avg=a["m"],
                  exp_avg_sq=a["v"], w=a["w"], **consts)
        kw.update(over)
        _core.rounding_step(**kw)

    step()
    bad = [
        ({"V": a["V"].astype(np.float64)}, "float32"),
        ({"V": np.zeros((2, 5), np.float32)}, "1-D"),
        ({"V": np.zeros(2 * n, np.float32)[::2]}, "contiguous"),
        ({"grad_w": np.zeros(n + 1, np.float32)}, "11"),
        ({"w": a["V"]}, "overlaps"),
        ({"exp_avg": a["gw"]}, "overlaps"),
        ({"lo": np.full(n, 2.0, np.float32)}, "lo <= hi"),
        ({"scale": np.zeros(n, np.float32)}, "scale"),
        ({"eps": 0.0}, "eps"),
        ({"neg_step": float("nan")}, "finite"),
        ({"coef": -1.0}, "coef"),
    ]
    for over, msg in bad:
        with pytest.raises(ValueError, match=msg):
            step(**over)
    ro = np.zeros(n, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        step(V=ro)
