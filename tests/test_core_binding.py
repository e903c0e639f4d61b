"""Direct tests of the native module ``mixquant._core``.

Every kernel is checked on every SIMD level this machine can run against
small, independent numpy / torch computations written here (the package's
own reference module is tested against the kernels elsewhere).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixquant import _core

LEVELS = _core.supported_simd_levels()
FLT_MIN = np.finfo(np.float32).tiny
FLT_MAX = np.finfo(np.float32).max


@pytest.fixture(params=LEVELS)
def level(request: pytest.FixtureRequest):
    """Run the test with each supported SIMD level in turn, then restore."""
    before = _core.simd_level()
    _core.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        _core.set_simd_level(before)


def rand_w(c: int, k: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, k)).astype(np.float32) * np.float32(scale)
    if c > 1:
        w[1] *= np.float32(5.0)  # rows with different ranges
    return w


# ------------------------------------------------------------- references ----
def _f32_scale(d: float) -> np.float32:
    # cast to float32 and clamp to [FLT_MIN, FLT_MAX] (clamping the double first is equivalent)
    return np.float32(min(max(d, float(FLT_MIN)), float(FLT_MAX)))


def ref_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[np.float32, int]:
    qmax = 2**bits - 1
    lo = min(np.float32(lo), np.float32(0.0))
    hi = max(np.float32(hi), np.float32(0.0))
    if symmetric:
        amax = max(-lo, hi)
        zp = 2 ** (bits - 1)
        if amax == 0:
            return np.float32(1.0), zp
        return _f32_scale(float(amax) * 2.0 / qmax), zp
    if float(hi) - float(lo) == 0.0:
        return np.float32(1.0), 0
    s = _f32_scale((float(hi) - float(lo)) / qmax)
    zp = int(np.clip(np.rint(-float(lo) / float(s)), 0, qmax))
    return s, zp


def ref_fake(w: np.ndarray, scale, zp, bits: int) -> np.ndarray:
    """torch's fake-quant formula in float32 numpy; scale/zp broadcast over rows."""
    scale = np.asarray(scale, np.float32).reshape(-1, 1)
    zpf = np.asarray(zp, np.float32).reshape(-1, 1)
    inv = np.float32(1.0) / scale
    q = np.clip(np.rint(w * inv) + zpf, np.float32(0), np.float32(2**bits - 1))
    return ((q - zpf) * scale).astype(np.float32)


def torch_fake(w: np.ndarray, scale, zp, bits: int) -> np.ndarray:
    c = w.shape[0]
    s = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float32), (c,)).copy())
    z = torch.as_tensor(np.broadcast_to(np.asarray(zp, np.int32), (c,)).copy())
    out = torch.fake_quantize_per_channel_affine(torch.from_numpy(w), s, z, 0, 0, 2**bits - 1)
    return out.numpy()


def lp_sum(e: np.ndarray, p: float) -> float:
    return float(torch.from_numpy(np.abs(e)).double().pow(p).sum())


# ----------------------------------------------------------------- dispatch --
def test_levels_and_openmp() -> None:
    assert LEVELS[0] == "scalar"
    assert LEVELS == [lv for lv in ("scalar", "avx2", "avx512") if lv in LEVELS]
    assert _core.simd_level() in LEVELS
    assert isinstance(_core.has_openmp(), bool)
    with pytest.raises(ValueError, match="SIMD level"):
        _core.set_simd_level("sse9")


def _core_path() -> str:
    return _core.__file__


@pytest.mark.parametrize(
    ("env", "expected"),
    [("scalar", "scalar"), ("avx2", "avx2"), ("AVX512", "avx512"), ("bogus", "best"), ("", "best")],
)
def test_env_var_caps_level(env: str, expected: str) -> None:
    # Load the extension by path so the subprocess does not import torch.
    code = (
        "import importlib.machinery, importlib.util, sys\n"
        f"loader = importlib.machinery.ExtensionFileLoader('mixquant._core', {_core_path()!r})\n"
        "spec = importlib.util.spec_from_loader('mixquant._core', loader)\n"
        "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
        "print(m.simd_level())\n"
    )
    envd = dict(os.environ, MIXQUANT_SIMD=env)
    out = subprocess.run([sys.executable, "-c", code], env=envd, capture_output=True, text=True, check=True)
    got = out.stdout.strip()
    if expected == "best":
        assert got == LEVELS[-1]
    else:
        order = ["scalar", "avx2", "avx512"]
        want = max((lv for lv in LEVELS if order.index(lv) <= order.index(expected)), key=order.index)
        assert got == want


def test_pyi_matches_module() -> None:
    pyi = Path(_core.__file__).parent / "_core.pyi"
    if not pyi.exists():  # editable installs keep the .pyi in the source tree
        pyi = Path(__file__).resolve().parents[1] / "python" / "mixquant" / "_core.pyi"
    tree = ast.parse(pyi.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert stubbed == public


# ------------------------------------------------------------------ minmax ---
def test_channel_minmax(level: str) -> None:
    w = rand_w(5, 1003)
    w[2, 7] = np.nan
    w[3, 0] = np.inf
    w[3, 1] = -np.inf
    w[4, :] = np.nan
    lo, hi, bad = _core.channel_minmax(w, 2)
    assert bad == 1 + 2 + 1003
    fin = np.where(np.isfinite(w), w, np.nan)
    np.testing.assert_array_equal(lo[:4], np.nanmin(fin[:4], axis=1))
    np.testing.assert_array_equal(hi[:4], np.nanmax(fin[:4], axis=1))
    assert lo[4] == 0 and hi[4] == 0  # no finite value
    assert lo.dtype == np.float32 and hi.dtype == np.float32


def test_channel_minmax_long_row_chunks(level: str) -> None:
    w = rand_w(1, 100_001, seed=3)
    lo, hi, bad = _core.channel_minmax(w, 2)
    assert bad == 0 and lo[0] == w.min() and hi[0] == w.max()


# ----------------------------------------------------------------- qparams ---
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 13, 16])
def test_qparams(symmetric: bool, bits: int) -> None:
    lo = np.array([-1.0, 0.0, 0.0, 0.5, -3.0, -1e-30, -1e38, -0.3], np.float32)
    hi = np.array([2.0, 0.0, 1.5, 2.0, -1.0, 1e-30, 3e38, 0.7], np.float32)
    s, z = _core.qparams(lo, hi, bits, symmetric)
    assert s.dtype == np.float32 and z.dtype == np.int32
    for i in range(lo.size):
        rs, rz = ref_qparams(lo[i], hi[i], bits, symmetric)
        assert s[i] == rs, (i, s[i], rs)
        assert z[i] == rz, (i, z[i], rz)


def test_qparams_examples() -> None:
    lo = np.array([-2.5, -3.5, 0.0, -1.0], np.float32)
    hi = np.array([252.5, 251.5, 0.0, 1.0], np.float32)
    s, z = _core.qparams(lo, hi, 8, False)
    assert (s[:2] == 1.0).all() and z[0] == 2 and z[1] == 4  # 2.5 -> 2, 3.5 -> 4 (half to even)
    assert s[2] == 1.0 and z[2] == 0  # zero range
    assert s[3] == np.float32(2.0 / 255) and z[3] == 127  # 1 / f32(2/255) = 127.49999...
    s, z = _core.qparams(np.array([-1.0, 0.0], np.float32), np.array([0.5, 0.0], np.float32), 8, True)
    assert s[0] == np.float32(2.0 / 255) and z[0] == 128
    assert s[1] == 1.0 and z[1] == 128
    s, z = _core.qparams(np.array([-1.0], np.float32), np.array([1.0], np.float32), 1, True)
    assert z[0] == 1 and s[0] == 2.0


# ------------------------------------------------------------ fake quantize --
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(4, 1), (3, 7), (5, 257), (1, 5000)])
def test_fake_quantize_matches_torch(level: str, bits: int, shape: tuple[int, int]) -> None:
    w = rand_w(*shape, seed=bits)
    lo, hi, _ = _core.channel_minmax(w, 1)
    lo = lo * np.float32(0.7)  # clip part of the range so clamping is exercised
    for symmetric in (False, True):
        s, z = _core.qparams(lo, hi, bits, symmetric)
        got = _core.fake_quantize(w, s, z, bits, 2)
        np.testing.assert_array_equal(got, torch_fake(w, s, z, bits))
        # per-tensor
        got1 = _core.fake_quantize(w, s[:1], z[:1], bits, 2)
        ref1 = torch.fake_quantize_per_tensor_affine(
            torch.from_numpy(w), float(s[0]), int(z[0]), 0, 2**bits - 1
        ).numpy()
        np.testing.assert_array_equal(got1, ref1)


@pytest.mark.parametrize("bits", [1, 9, 12, 16])
def test_fake_quantize_high_bits(level: str, bits: int) -> None:
    w = rand_w(3, 1001, seed=bits)
    lo, hi, _ = _core.channel_minmax(w, 1)
    s, z = _core.qparams(lo, hi, bits, False)
    np.testing.assert_array_equal(_core.fake_quantize(w, s, z, bits, 1), ref_fake(w, s, z, bits))


def test_fake_quantize_half_even_ties(level: str) -> None:
    w = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.49999997] * 3], np.float32)
    s = np.array([1.0], np.float32)
    z = np.array([8], np.int32)
    got = _core.fake_quantize(w, s, z, 4, 1)
    np.testing.assert_array_equal(got, np.rint(w))
    np.testing.assert_array_equal(got, torch_fake(w, s, z, 4))


# --------------------------------------------------------- quantize round trip
@pytest.mark.parametrize("bits", [1, 3, 8, 9, 16])
def test_quantize_dequantize_round_trip(level: str, bits: int) -> None:
    w = rand_w(6, 333, seed=bits)
    lo, hi, _ = _core.channel_minmax(w, 2)
    s, z = _core.qparams(lo, hi, bits, bits > 1)
    codes = _core.quantize(w, s, z, bits, 2)
    assert codes.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert codes.shape == w.shape and int(codes.max()) <= 2**bits - 1
    inv = np.float32(1.0) / s.reshape(-1, 1)
    ref = np.clip(np.rint(w * inv) + z.reshape(-1, 1).astype(np.float32), 0, 2**bits - 1)
    np.testing.assert_array_equal(codes, ref.astype(codes.dtype))
    deq = _core.dequantize(codes, s, z, bits, 2)
    np.testing.assert_array_equal(deq, _core.fake_quantize(w, s, z, bits, 2))
    # per-tensor parameters, uint16 codes for a small bit-width
    codes1 = _core.quantize(w, s[:1], z[:1], bits, 1)
    deq1 = _core.dequantize(codes1.astype(np.uint16), s[:1], z[:1], bits, 1)
    np.testing.assert_array_equal(deq1, ref_fake(w, s[:1], z[:1], bits))


# ------------------------------------------------------------- error table ---
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 1000), (2, 5000), (1, 40_001)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_error_table(level: str, shape: tuple[int, int], per_channel: bool) -> None:
    w = rand_w(*shape, seed=shape[1])
    bits = np.array([2, 3, 4, 8, 16], np.int64)
    lo, hi, _ = _core.channel_minmax(w, 2)
    if not per_channel:
        lo, hi = lo.min(keepdims=True), hi.max(keepdims=True)
    sc, zp = zip(*[_core.qparams(lo, hi, int(b), False) for b in bits])
    scale, zero_point = np.stack(sc), np.stack(zp)
    sse, mx = _core.error_table(w, scale, zero_point, bits, 2)
    assert sse.shape == mx.shape == (bits.size, shape[0])
    assert sse.dtype == np.float64 and mx.dtype == np.float32
    for i, b in enumerate(bits):
        wt = torch.from_numpy(w)
        w_hat = torch.from_numpy(torch_fake(w, scale[i], zero_point[i], int(b)))
        e = wt - w_hat
        np.testing.assert_allclose(sse[i], e.double().pow(2).sum(1).numpy(), rtol=1e-5, atol=0)
        np.testing.assert_array_equal(mx[i], e.abs().amax(1).numpy())
    # bit-identical for any thread count
    sse1, mx1 = _core.error_table(w, scale, zero_point, bits, 1)
    np.testing.assert_array_equal(sse1, sse)
    np.testing.assert_array_equal(mx1, mx)


# ----------------------------------------------------- fused min/max table ---
def two_pass_table(w: np.ndarray, bits: np.ndarray, per_channel: bool, symmetric: bool):
    """channel_minmax -> qparams -> error_table: what minmax_error_table fuses."""
    lo, hi, bad = _core.channel_minmax(w, 1)
    assert bad == 0
    glo, ghi = (lo, hi) if per_channel else (lo.min(keepdims=True), hi.max(keepdims=True))
    sc, zp = zip(*[_core.qparams(glo, ghi, int(b), symmetric) for b in bits])
    scale, zero_point = np.stack(sc), np.stack(zp)
    sse, mx = _core.error_table(w, scale, zero_point, bits, 1)
    return lo, hi, scale, zero_point, sse, mx


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 64), (7, 513), (3, 5000), (2, 40_001)])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_error_table_equals_two_passes(level: str, shape, per_channel: bool, symmetric: bool) -> None:
    """The fused call (one pass per row, clamps skipped where provably no-ops,
    next row prefetched) gives exactly the two-pass results, on every level and
    thread count; its energy is sum(w**2) per row."""
    w = rand_w(*shape, seed=shape[0] * 7 + shape[1])
    w[0, 0] = 0.0  # keep a zero in every case
    bits = np.array([1, 2, 3, 4, 5, 6, 7, 8, 12, 16], np.int32)
    want = two_pass_table(w, bits, per_channel, symmetric)
    for nt in (1, 2, 3):
        got = _core.minmax_error_table(w, bits, per_channel, symmetric, nt)
        lo, hi, scale, zp, sse, mx, energy, bad = got
        assert bad == 0
        for a, b in zip((lo, hi, scale, zp, sse, mx), want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(energy, (w.astype(np.float64) ** 2).sum(1), rtol=1e-6, atol=0)


def test_minmax_error_table_at_grid_edge_ties(level: str) -> None:
    """Rows whose extreme lands on a .5 tie just past the grid (symmetric: hi * inv =
    qmax/2 + 0.5 rounds to one code too many, so the clamp is not a no-op there) and
    rows of values on .5 steps: the table equals torch's fake-quantization error."""
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, (12, 300)).astype(np.float32)
    w[:6, 0] = 1.0   # amax = hi = 1: hi * inv = 127.5 at 8 bits, a tie rounding to 128 > 127
    w[6:] = np.round(w[6:] * 8) / 16  # many exact ties at every bit-width
    bits = np.arange(1, 9, dtype=np.int32)
    for symmetric in (True, False):
        _, _, scale, zp, sse, mx, _, _ = _core.minmax_error_table(w, bits, True, symmetric, 1)
        for i, b in enumerate(bits):
            e = torch.from_numpy(w) - torch.from_numpy(torch_fake(w, scale[i], zp[i], int(b)))
            np.testing.assert_allclose(sse[i], e.double().pow(2).sum(1).numpy(), rtol=1e-5, atol=0)
            np.testing.assert_array_equal(mx[i], e.abs().amax(1).numpy())


@pytest.mark.parametrize("shape", [(6, 1), (6, 300), (6, 40_001)])
def test_row_energy(level: str, shape) -> None:
    """sum(w**2) per row in double, without overflow or underflow at the float32 extremes."""
    w = rand_w(*shape, seed=shape[1])
    w[1] *= np.float32(1e30)
    w[2] *= np.float32(1e-30)
    w[3] = np.float32(FLT_MAX) * np.sign(w[3] + 0.5)
    w[4] = 0.0
    w[5, 0] = np.float32(1e-45)  # a subnormal next to normal values
    lo, hi, _ = _core.channel_minmax(w, 1)
    want = (w.astype(np.float64) ** 2).sum(1)
    for nt in (1, 2):
        got = _core.row_energy(w, lo, hi, nt)
        assert got.dtype == np.float64 and got.shape == (shape[0],)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("per_channel", [True, False])
def test_minmax_error_table_reports_nonfinite(level: str, per_channel: bool) -> None:
    w = rand_w(4, 100)
    w[2, 17] = np.nan
    w[3, 5] = np.inf
    _, _, scale, zp, sse, mx, energy, bad = _core.minmax_error_table(w, [2, 8], per_channel, False, 2)
    assert bad == 2
    for out in (scale, zp, sse, mx, energy):  # nothing half-filled or uninitialised
        assert not out.any()


# ------------------------------------------------------------- clip search ---
def brute_clip(w, lo, hi, bits, symmetric, n_grid, step, p):
    """Independent loop: returns best index, scale, zp, err arrays [B, S]."""
    groups = [w] if lo.size == 1 else list(w)
    out = np.zeros((4, len(bits), lo.size))
    errs = np.zeros((len(bits), lo.size, n_grid))
    for bi, b in enumerate(bits):
        for g, x in enumerate(groups):
            x = x.reshape(1, -1)
            for i in range(n_grid):
                f = 1.0 - i * step
                lo_i = np.float32(float(min(lo[g], np.float32(0))) * f)
                hi_i = np.float32(float(max(hi[g], np.float32(0))) * f)
                s, z = ref_qparams(lo_i, hi_i, b, symmetric)
                errs[bi, g, i] = lp_sum(x - ref_fake(x, s, z, b), p)
            best = int(np.argmin(errs[bi, g]))
            f = 1.0 - best * step
            s, z = ref_qparams(
                np.float32(float(min(lo[g], np.float32(0))) * f),
                np.float32(float(max(hi[g], np.float32(0))) * f),
                b,
                symmetric,
            )
            out[:, bi, g] = best, s, z, errs[bi, g, best]
    return out, errs


@pytest.mark.parametrize("p", [2.0, 2.4, 1.0, 0.5])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_vs_brute_force(level: str, p: float, per_channel: bool, symmetric: bool) -> None:
    w = rand_w(3, 301, seed=7)
    w[2, 5] = 40.0  # an outlier makes clipping worthwhile
    bits = [2, 4, 8]
    lo, hi, _ = _core.channel_minmax(w, 1)
    if not per_channel:
        lo, hi = lo.min(keepdims=True), hi.max(keepdims=True)
    n_grid, step = 25, 0.03
    best, scale, zp, err = _core.clip_search(w, lo, hi, bits, symmetric, n_grid, step, p, 2)
    assert best.dtype == np.int32 and scale.dtype == np.float32
    assert zp.dtype == np.int32 and err.dtype == np.float64
    assert best.shape == (len(bits), lo.size)
    ref, errs = brute_clip(w, lo, hi, bits, symmetric, n_grid, step, p)
    for bi in range(len(bits)):
        for g in range(lo.size):
            np.testing.assert_allclose(err[bi, g], ref[3, bi, g], rtol=1e-5)
            # the chosen candidate's own brute-force error equals the reported one
            np.testing.assert_allclose(errs[bi, g, best[bi, g]], err[bi, g], rtol=1e-5)
            if best[bi, g] == ref[0, bi, g]:
                assert scale[bi, g] == ref[1, bi, g] and zp[bi, g] == ref[2, bi, g]
    again = _core.clip_search(w, lo, hi, bits, symmetric, n_grid, step, p, 1)
    for a, b in zip(again, (best, scale, zp, err)):
        np.testing.assert_array_equal(a, b)


def test_clip_search_chunked_paths(level: str) -> None:
    # long single row (chunk-parallel path) and a per-tensor search over chunks
    w = rand_w(1, 70_001, seed=11)
    lo, hi, _ = _core.channel_minmax(w, 1)
    for nt in (1, 2):
        best, scale, zp, err = _core.clip_search(w, lo, hi, [3], False, 4, 0.1, 2.0, nt)
        ref, _ = brute_clip(w, lo, hi, [3], False, 4, 0.1, 2.0)
        np.testing.assert_allclose(err[0, 0], ref[3, 0, 0], rtol=1e-5)
    w2 = rand_w(3, 40_000, seed=12)
    lo2, hi2 = np.array([w2.min()]), np.array([w2.max()])
    r1 = _core.clip_search(w2, lo2, hi2, [4, 6], True, 3, 0.2, 2.4, 1)
    r2 = _core.clip_search(w2, lo2, hi2, [4, 6], True, 3, 0.2, 2.4, 2)
    for a, b in zip(r1, r2):
        np.testing.assert_array_equal(a, b)


def test_clip_search_zero_rows_tie_to_lowest(level: str) -> None:
    w = np.zeros((2, 9), np.float32)
    best, scale, zp, err = _core.clip_search(w, np.zeros(2), np.zeros(2), [4], False, 10, 0.05, 2.0, 1)
    assert (best == 0).all() and (scale == 1.0).all() and (zp == 0).all() and (err == 0).all()


@pytest.mark.parametrize("p", [0.3, 1.7, 2.4, 3.5])
@pytest.mark.parametrize("magnitude", [1e-6, 1e-2, 1.0, 1e3])
def test_general_p_accuracy(level: str, p: float, magnitude: float) -> None:
    w = rand_w(2, 999, seed=5, scale=magnitude)
    lo, hi, _ = _core.channel_minmax(w, 1)
    for b in (2, 8, 16):
        _, _, _, err = _core.clip_search(w, lo, hi, [b], False, 1, 0.5, p, 1)
        s, z = _core.qparams(lo, hi, b, False)
        e = w - ref_fake(w, s, z, b)
        for g in range(2):
            np.testing.assert_allclose(err[0, g], lp_sum(e[g], p), rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e30])
def test_extreme_magnitudes_do_not_underflow(level: str, magnitude: float) -> None:
    # e^2 of 1e-30 weights underflows float32 and of 1e30 overflows: the core
    # scales errors by a power of two before accumulating them.
    w = rand_w(3, 257, seed=9, scale=magnitude)
    lo, hi, _ = _core.channel_minmax(w, 1)
    bits = [2, 8, 16]
    sc, zp = zip(*[_core.qparams(lo, hi, b, False) for b in bits])
    sse, _ = _core.error_table(w, np.stack(sc), np.stack(zp), bits, 2)
    for i, b in enumerate(bits):
        e = w - ref_fake(w, sc[i], zp[i], b)
        np.testing.assert_allclose(sse[i], [lp_sum(r, 2.0) for r in e], rtol=1e-5)
    for p in (2.0, 2.4):
        _, _, _, err = _core.clip_search(w, lo, hi, bits, True, 5, 0.1, p, 2)
        ref, _ = brute_clip(w, lo, hi, bits, True, 5, 0.1, p)
        np.testing.assert_allclose(err, ref[3], rtol=1e-5)


# --------------------------------------------------------------- bit packing -
def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    bitmat = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(bitmat.astype(np.uint8).ravel(), bitorder="little")


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 1001])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes = rng.integers(0, 2**bits, size=n).astype(dtype)
    packed = _core.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(packed, ref_pack(codes, bits))
    back = _core.unpack_bits(packed, bits, n)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, codes)
    if bits <= 8:  # uint16 input with small codes packs the same
        np.testing.assert_array_equal(_core.pack_bits(codes.astype(np.uint16), bits), packed)


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match="codes"):
        _core.pack_bits(np.array([0, 4], np.uint8), 2)
    with pytest.raises(ValueError, match="codes"):
        _core.pack_bits(np.array([1, 2], np.int64), 4)
    with pytest.raises(ValueError, match="too short"):
        _core.unpack_bits(np.zeros(2, np.uint8), 3, 6)
    with pytest.raises(ValueError, match="bits"):
        _core.pack_bits(np.zeros(3, np.uint8), 0)
    with pytest.raises(ValueError, match="packed"):
        _core.unpack_bits(np.zeros(4, np.int32), 3, 2)


# ------------------------------------------------------------------ groups ----
def bf16_up(x: np.float32) -> np.float32:
    """Smallest bfloat16 >= a positive float32 (written independently of the package)."""
    u = int(np.float32(x).view(np.uint32))
    r = (u + 0xFFFF) & 0xFFFF0000
    return np.uint32(min(r, 0x7F7F0000)).view(np.float32)


def ref_group_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[np.float32, int]:
    s, zp = ref_qparams(lo, hi, bits, symmetric)
    s = bf16_up(s)
    if not symmetric and s != 1.0:
        zp = int(np.clip(np.rint(-float(min(np.float32(lo), np.float32(0))) / float(s)), 0, 2**bits - 1))
    return s, zp


def naive_groups(w: np.ndarray, gs: int):
    """(row, first column, segment) of every group, in (row, group) order."""
    return [(c, k, w[c, k:k + gs]) for c in range(w.shape[0]) for k in range(0, w.shape[1], gs)]


@pytest.mark.parametrize(("shape", "gs"), [((1, 1), 1), ((3, 7), 2), ((4, 256), 128), ((5, 300), 128),
                                           ((2, 1000), 33), ((3, 40_001), 32768), ((2, 9), 100)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_table_against_naive_loop(level: str, shape, gs: int, symmetric: bool) -> None:
    """Every group (the last one of a row possibly short) gets the min/max quantizer of its own
    range with a bfloat16 scale rounded up; sse and max_abs are per row; any thread count."""
    w = rand_w(*shape, seed=shape[1] + gs)
    bits = np.array([1, 2, 3, 4, 8, 12, 16], np.int32)
    segs = naive_groups(w, gs)
    lo_w = np.array([s.min() for _, _, s in segs], np.float32)
    hi_w = np.array([s.max() for _, _, s in segs], np.float32)
    for nt in (1, 2, 3):
        lo, hi, scale, zp, sse, mx, energy, bad = _core.group_minmax_error_table(w, bits, gs, symmetric, nt)
        assert bad == 0 and scale.shape == (bits.size, len(segs)) and sse.shape == (bits.size, shape[0])
        np.testing.assert_array_equal(lo, lo_w)
        np.testing.assert_array_equal(hi, hi_w)
        np.testing.assert_allclose(energy, (w.astype(np.float64) ** 2).sum(1), rtol=1e-6, atol=0)
        for i, b in enumerate(bits):
            want = [ref_group_qparams(a, z, int(b), symmetric) for a, z in zip(lo_w, hi_w)]
            np.testing.assert_array_equal(scale[i], np.array([s for s, _ in want], np.float32))
            np.testing.assert_array_equal(zp[i], np.array([z for _, z in want], np.int32))
            w_hat = np.concatenate([ref_fake(seg[None], scale[i, j], zp[i, j], int(b))[0]
                                    for j, (_, _, seg) in enumerate(segs)]).reshape(shape)
            e = w.astype(np.float64) - w_hat.astype(np.float64)
            np.testing.assert_allclose(sse[i], (e ** 2).sum(1), rtol=1e-5, atol=0)
            np.testing.assert_array_equal(mx[i], np.abs(e).max(1).astype(np.float32))
            if i == 3:  # the element-wise ops with the same parameters
                fq = _core.group_fake_quantize(w, scale[i], zp[i], int(b), gs, nt)
                np.testing.assert_array_equal(fq, w_hat)
                codes = _core.group_quantize(w, scale[i].reshape(shape[0], -1), zp[i], int(b), gs, nt)
                np.testing.assert_array_equal(_core.group_dequantize(codes, scale[i], zp[i], int(b), gs, nt), w_hat)
        sse2, mx2 = _core.group_error_table(w, scale, zp, bits, gs, nt)
        np.testing.assert_array_equal(sse2, sse)
        np.testing.assert_array_equal(mx2, mx)


def test_group_scales_cover_the_range(level: str) -> None:
    """Rounding the scale up keeps every group's range on the grid: no element is clipped by more
    than half a step, and a scale just above a bfloat16 value moves to the next one."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    for b in (2, 4, 8):
        lo, hi, scale, zp, _, mx, _, _ = _core.group_minmax_error_table(w, [b], 64, False, 1)
        s = scale[0].astype(np.float64)
        assert np.all(s >= (np.maximum(hi, 0) - np.minimum(lo, 0)) / (2**b - 1))
        assert np.all(mx[0] <= 0.5 * s.reshape(64, -1).max(1) * (1 + 1e-6))
    x = np.float32(1.0) + np.float32(2.0**-20)
    s, _ = _core.group_qparams(np.array([0.0], np.float32), np.array([x * 3], np.float32), 2, False)
    assert s[0] == np.float32(1.0 + 2.0**-7)


def test_group_clip_search_against_brute_force(level: str) -> None:
    w = rand_w(3, 100, seed=9)
    gs, bits, n_grid, step, p = 30, np.array([3, 4], np.int32), 12, 0.05, 2.4
    lo, hi, _ = _core.group_minmax(w, gs, 1)
    best, scale, zp, err = _core.group_clip_search(w, lo, hi, bits, gs, False, n_grid, step, p, 2)
    for j, (_, _, seg) in enumerate(naive_groups(w, gs)):
        for i, b in enumerate(bits):
            cands = []
            for k in range(n_grid):
                f = 1.0 - k * step
                a = np.float32(float(min(lo[j], np.float32(0))) * f)
                z = np.float32(float(max(hi[j], np.float32(0))) * f)
                cs, cz = ref_group_qparams(a, z, int(b), False)
                cands.append(lp_sum(seg - ref_fake(seg[None], cs, cz, int(b))[0], p))
            assert err[i, j] <= min(cands) * (1 + 2e-5)
            np.testing.assert_allclose(err[i, j], cands[best[i, j]], rtol=2e-5)


def test_group_minmax_reports_nonfinite(level: str) -> None:
    w = rand_w(4, 100)
    w[2, 17] = np.nan
    w[3, 5] = np.inf
    assert _core.group_minmax(w, 16, 2)[2] == 2
    _, _, scale, zp, sse, mx, energy, bad = _core.group_minmax_error_table(w, [2, 8], 16, False, 2)
    assert bad == 2
    for out in (scale, zp, sse, mx, energy):  # nothing half-filled or uninitialised
        assert not out.any()


# --------------------------------------------------------------- bad inputs --
def _bad_calls():
    w = rand_w(3, 8)
    s3, z3 = np.ones(3, np.float32), np.zeros(3, np.int32)
    s2d, z2d = np.ones((1, 3), np.float32), np.zeros((1, 3), np.int32)
    lo, hi = -np.ones(3, np.float32), np.ones(3, np.float32)
    return [
        ("w", lambda: _core.channel_minmax(w[0], 1)),
        ("w", lambda: _core.channel_minmax(np.zeros((3, 0), np.float32), 1)),
        ("w", lambda: _core.channel_minmax(np.zeros((0, 4), np.float32), 1)),
        ("num_threads", lambda: _core.channel_minmax(w, 0)),
        ("bits", lambda: _core.qparams(lo, hi, 0, False)),
        ("bits", lambda: _core.qparams(lo, hi, 17, False)),
        ("lo and hi", lambda: _core.qparams(lo, hi[:2], 4, False)),
        ("lo", lambda: _core.qparams(np.array([np.nan], np.float32), hi[:1], 4, False)),
        ("lo", lambda: _core.qparams(lo.reshape(1, 3), hi.reshape(1, 3), 4, False)),
        ("scale", lambda: _core.error_table(w, np.ones((1, 2), np.float32), np.zeros((1, 2), np.int32), [4], 1)),
        ("scale", lambda: _core.error_table(w, s3, z3, [4], 1)),
        ("zero_point", lambda: _core.error_table(w, s2d, np.zeros((1, 1), np.int32), [4], 1)),
        ("zero_point", lambda: _core.error_table(w, s2d, np.full((1, 3), 16, np.int32), [4], 1)),
        ("zero_point", lambda: _core.error_table(w, s2d, np.zeros((1, 3), np.float32), [4], 1)),
        ("scale", lambda: _core.error_table(w, np.zeros((1, 3), np.float32), z2d, [4], 1)),
        ("scale", lambda: _core.error_table(w, np.full((1, 3), np.nan, np.float32), z2d, [4], 1)),
        ("bits", lambda: _core.error_table(w, s2d, z2d, [], 1)),
        ("bits", lambda: _core.error_table(w, s2d, z2d, [20], 1)),
        ("bits", lambda: _core.error_table(w, s2d, z2d, [[4]], 1)),
        ("num_threads", lambda: _core.error_table(w, s2d, z2d, [4], -1)),
        ("lo and hi", lambda: _core.row_energy(w, lo[:2], hi, 1)),
        ("lo", lambda: _core.row_energy(w, np.full(3, np.nan, np.float32), hi, 1)),
        ("num_threads", lambda: _core.row_energy(w, lo, hi, 0)),
        ("bits", lambda: _core.minmax_error_table(w, [], True, False, 1)),
        ("bits", lambda: _core.minmax_error_table(w, [0], True, False, 1)),
        ("w", lambda: _core.minmax_error_table(w[:, :0], [4], True, False, 1)),
        ("w", lambda: _core.minmax_error_table(w[0], [4], True, False, 1)),
        ("num_threads", lambda: _core.minmax_error_table(w, [4], True, False, 0)),
        ("n_grid", lambda: _core.clip_search(w, lo, hi, [4], False, 0, 0.01, 2.0, 1)),
        ("step", lambda: _core.clip_search(w, lo, hi, [4], False, 10, 0.0, 2.0, 1)),
        ("step", lambda: _core.clip_search(w, lo, hi, [4], False, 10, -0.1, 2.0, 1)),
        ("n_grid - 1\\) \\* step", lambda: _core.clip_search(w, lo, hi, [4], False, 11, 0.1, 2.0, 1)),
        ("p", lambda: _core.clip_search(w, lo, hi, [4], False, 10, 0.01, 0.0, 1)),
        ("p", lambda: _core.clip_search(w, lo, hi, [4], False, 10, 0.01, -2.0, 1)),
        ("lo", lambda: _core.clip_search(w, lo[:2], hi[:2], [4], False, 10, 0.01, 2.0, 1)),
        ("hi", lambda: _core.clip_search(w, lo, hi[:1], [4], False, 10, 0.01, 2.0, 1)),
        ("bits", lambda: _core.clip_search(w, lo, hi, [], False, 10, 0.01, 2.0, 1)),
        ("w", lambda: _core.clip_search(w[:, :0], lo, hi, [4], False, 10, 0.01, 2.0, 1)),
        ("num_threads", lambda: _core.clip_search(w, lo, hi, [4], False, 10, 0.01, 2.0, 0)),
        ("scale", lambda: _core.fake_quantize(w, np.ones(2, np.float32), z3[:2], 4, 1)),
        ("zero_point", lambda: _core.fake_quantize(w, s3, z3[:1], 4, 1)),
        ("zero_point", lambda: _core.fake_quantize(w, s3, np.full(3, -1), 4, 1)),
        ("bits", lambda: _core.fake_quantize(w, s3, z3, 0, 1)),
        ("w", lambda: _core.fake_quantize(w.reshape(3, 2, 4), s3, z3, 4, 1)),
        ("w", lambda: _core.fake_quantize(np.full((3, 8), "x"), s3, z3, 4, 1)),
        ("bits", lambda: _core.quantize(w, s3, z3, 17, 1)),
        ("codes", lambda: _core.dequantize(np.zeros((3, 8), np.int32), s3, z3, 4, 1)),
        ("codes", lambda: _core.dequantize(np.full((3, 8), 16, np.uint8), s3, z3, 4, 1)),
        ("codes", lambda: _core.dequantize(np.zeros(8, np.uint8), s3, z3, 4, 1)),
        ("n", lambda: _core.unpack_bits(np.zeros(4, np.uint8), 3, -1)),
        ("group_size", lambda: _core.group_minmax(w, 0, 1)),
        ("group_size", lambda: _core.group_minmax_error_table(w, [4], -3, False, 1)),
        ("w", lambda: _core.group_minmax_error_table(w[:, :0], [4], 4, False, 1)),
        ("bits", lambda: _core.group_minmax_error_table(w, [17], 4, False, 1)),
        ("scale", lambda: _core.group_error_table(w, np.ones((1, 3), np.float32), np.zeros((1, 3), np.int32),
                                                  [4], 4, 1)),
        ("zero_point", lambda: _core.group_error_table(w, np.ones((1, 6), np.float32),
                                                       np.full((1, 6), 16, np.int32), [4], 4, 1)),
        ("scale", lambda: _core.group_fake_quantize(w, s3, z3, 4, 4, 1)),
        ("scale", lambda: _core.group_fake_quantize(w, np.zeros(6, np.float32), np.zeros(6, np.int32), 4, 4, 1)),
        ("zero_point", lambda: _core.group_quantize(w, np.ones(6, np.float32), np.zeros(5, np.int32), 4, 4, 1)),
        ("codes", lambda: _core.group_dequantize(np.full((3, 8), 16, np.uint8), np.ones(6, np.float32),
                                                 np.zeros(6, np.int32), 4, 4, 1)),
        ("lo and hi", lambda: _core.group_clip_search(w, lo, hi, [4], 4, False, 10, 0.01, 2.0, 1)),
        ("n_grid", lambda: _core.group_clip_search(w, np.zeros(6, np.float32), np.ones(6, np.float32), [4], 4,
                                                   False, 0, 0.01, 2.0, 1)),
        ("lo and hi", lambda: _core.group_qparams(lo, hi[:2], 4, False)),
    ]


@pytest.mark.parametrize(("name", "call"), _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_value_error(name: str, call) -> None:
    with pytest.raises(ValueError, match=name):
        call()


def test_float64_and_noncontiguous_inputs_are_converted() -> None:
    w64 = rand_w(4, 50).astype(np.float64)
    wt = np.asfortranarray(w64.astype(np.float32))
    a = _core.channel_minmax(w64, 1)
    b = _core.channel_minmax(wt, 1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_widen_16_is_exact_for_every_bit_pattern() -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    for kind, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        want = torch.from_numpy(bits.view(np.int16).copy()).view(dtype).float().numpy()
        for nt in (1, 3):
            out = np.full(2**16 + 5, 7.0, np.float32)
            _core.widen_16(bits, kind, out, nt)
            nan = np.isnan(want)
            np.testing.assert_array_equal(np.isnan(out[:2**16]), nan)
            np.testing.assert_array_equal(out[:2**16][~nan].view(np.uint32), want[~nan].view(np.uint32))
            assert (out[2**16:] == 7.0).all()  # nothing written past src.size
    for bad, match in [(lambda: _core.widen_16(bits, "float32", np.empty(2**16, np.float32), 1), "kind"),
                       (lambda: _core.widen_16(bits.astype(np.int32), "float16", np.empty(2**16, np.float32), 1),
                        "src"),
                       (lambda: _core.widen_16(bits, "float16", np.empty(10, np.float32), 1), "out holds"),
                       (lambda: _core.widen_16(bits, "float16", np.empty(2**16, np.float64), 1), "out must"),
                       (lambda: _core.widen_16(bits, "float16", np.empty((2, 2**16), np.float32)[:, ::2], 1),
                        "out must")]:
        with pytest.raises(ValueError, match=match):
            bad()
