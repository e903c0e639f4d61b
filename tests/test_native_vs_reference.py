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
