"""The native packed matrix-vector product equals its float64 twin within its stated bound, on every SIMD level.

The bound (``mixquant.core.kernels.MATVEC_TOLERANCE``) is
``|y - y64| <= 2**-18 * sum_k scale * (code + zp) * |x| + 2**-23 * |y64|``: every
float32 partial sum of ``code * x`` takes at most 64 terms (at most 64 roundings),
the rest is double, and both results are rounded to float32 once. Sums that are
exact in float32 (small integers, power-of-two scales) must agree bit for bit,
which no dropped, repeated or misplaced code survives. An independent numpy
dequantize-then-matmul in float64 checks the twin itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixquant
from mixquant import _core
from mixquant.core.kernels import MATVEC_TOLERANCE

LOOSE, REL = MATVEC_TOLERANCE


def make_case(rng, bits, c, k, kind, block=None, n=1, integer=False):
    codes = rng.integers(0, 2**bits, size=c * k)
    packed = torch.from_numpy(mixquant.pack_bits(codes, bits))
    count = 1 if kind == "tensor" else c * (-(-k // block) if kind == "blocked" else 1)
    if integer:
        scale = torch.from_numpy(2.0 ** rng.integers(-3, 2, size=count)).float()
        top = 8 if bits <= 8 else 1  # 64 terms of code * x stay below 2**24: exact float32 partial sums
        x = torch.from_numpy(rng.integers(-top, top + 1, size=(n, k))).float()
    else:
        scale = torch.from_numpy((rng.random(count) * 0.1 + 1e-3).astype(np.float32))
        x = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    zp = torch.from_numpy(rng.integers(0, 2**bits, size=count).astype(np.int32))
    return codes.reshape(c, k), packed, scale, zp, x


def params_per_element(scale, zp, c, k, block):
    s, z = scale.double().numpy(), zp.numpy().astype(np.float64)
    if s.size == 1:
        return np.full((c, k), s[0]), np.full((c, k), z[0])
    groups = -(-k // block)
    idx = np.arange(c)[:, None] * groups + np.arange(k)[None, :] // block
    return s[idx], z[idx]


def numpy_matvec(codes, scale, zp, x, block):
    """Independent: the float64 weight (code - zp) * scale, then a float64 matrix product."""
    c, k = codes.shape
    s, z = params_per_element(scale, zp, c, k, block)
    return x.double().numpy() @ ((codes - z) * s).T


def bound(codes, scale, zp, x, block, y64):
    c, k = codes.shape
    s, z = params_per_element(scale, zp, c, k, block)
    return LOOSE * (np.abs(x.double().numpy()) @ ((codes + z) * s).T) + REL * np.abs(y64)


SHAPES = [(1, 1), (1, 7), (3, 8), (5, 13), (4, 64), (2, 100), (7, 257), (1, 4099), (9, 1000), (6, 31)]


_CASES: dict = {}


def reference_cases(bits, kind):
    """The random cases of one (bits, kind) with their reference results and bounds, made once for every level."""
    if (bits, kind) not in _CASES:
        rng = np.random.default_rng([bits, len(kind)])
        cases = []
        for i, (c, k) in enumerate(SHAPES[bits % 2::2]):  # half the shapes for each width, all over the widths
            block = max(1, min(k, 1 + k // 3)) if kind == "blocked" else None
            for n in (1, 2 + 3 * (i % 2)):  # 5: more rows than one decode pass takes (4)
                codes, packed, scale, zp, x = make_case(rng, bits, c, k, kind, block, n)
                ref = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block,
                                             backend="reference")
                y64 = numpy_matvec(codes, scale, zp, x, block or k)
                np.testing.assert_allclose(ref.double().numpy(), y64, rtol=2**-23, atol=1e-30)
                cases.append((c, k, n, block, packed, scale, zp, x, ref, bound(codes, scale, zp, x, block or k, y64)))
        _CASES[bits, kind] = cases
    return _CASES[bits, kind]


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("kind", ["tensor", "channel", "blocked"])
def test_native_within_bound_of_reference(simd, bits, kind):
    for c, k, n, block, packed, scale, zp, x, ref, tol in reference_cases(bits, kind):
        nat = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block, backend="native",
                                     num_threads=2)
        assert nat.dtype == torch.float32 and tuple(nat.shape) == (n, c) == tuple(ref.shape)
        err = np.abs(nat.double().numpy() - ref.double().numpy())
        assert (err <= tol + 2**-149).all(), (c, k, n, err.max())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 16])
def test_exact_sums_agree_bit_for_bit(simd, bits):
    """Small integer inputs and power-of-two scales: every sum is exact, so the results must be equal."""
    rng = np.random.default_rng(100 + bits)
    for c, k in [(3, 1), (2, 9), (4, 67), (1, 4099), (5, 130), (3, 200)]:  # 200: byte fields and a tail
        for kind, block in (("tensor", None), ("channel", None), ("blocked", 5), ("blocked", 64)):
            block = min(block, k) if block else None
            codes, packed, scale, zp, x = make_case(rng, bits, c, k, kind, block, n=3, integer=True)
            nat = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block)
            ref = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block, backend="reference")
            assert torch.equal(nat, ref), (c, k, kind)
            assert torch.equal(nat, torch.from_numpy(numpy_matvec(codes, scale, zp, x, block or k)).float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # the byte-field, gather and widening decoders
def test_partial_sums_are_flushed_every_64_terms(simd, bits):
    """One large term, then terms that float32 cannot add to it (2**-25 < half an ulp of 1).

    The partial sum holding the large term loses at most its next 63 terms before
    it is flushed into a double; every other partial sum is exact. Longer float32
    runs would lose more: this is what the 2**-18 bound rests on.
    """
    k = 16384
    x = torch.full((k,), 2.0**-25)
    x[0] = 1.0
    packed = torch.from_numpy(mixquant.pack_bits(np.ones(k, np.uint8), bits))
    y = mixquant.packed_matvec(packed, bits, (1, k), torch.ones(1), torch.zeros(1, dtype=torch.int32), x)
    exact = 1.0 + (k - 1) * 2.0**-25
    assert abs(float(y) - exact) <= (63 + 4) * 2.0**-25  # 63 lost terms, then two roundings to float32 (2 ulp/2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_bits(simd, threads):
    rng = np.random.default_rng(threads)
    for bits in (3, 4, 8):
        _, packed, scale, zp, x = make_case(rng, bits, 37, 4099, "channel", n=2)
        one = mixquant.packed_matvec(packed, bits, (37, 4099), scale, zp, x, num_threads=1)
        got = mixquant.packed_matvec(packed, bits, (37, 4099), scale, zp, x, num_threads=threads)
        assert torch.equal(one, got)


def test_per_tensor_equals_repeated_per_channel(simd):
    rng = np.random.default_rng(7)
    _, packed, scale, zp, x = make_case(rng, 5, 6, 77, "tensor", n=2)
    a = mixquant.packed_matvec(packed, 5, (6, 77), scale, zp, x)
    b = mixquant.packed_matvec(packed, 5, (6, 77), scale.expand(6).clone(), zp.expand(6).clone(), x)
    assert torch.equal(a, b)


def test_reads_only_its_bytes(simd):
    """A stream exactly ceil(C*K*bits/8) long gives the same result as one followed by junk."""
    rng = np.random.default_rng(5)
    for bits in range(1, 17):
        for c, k in ((1, 8), (2, 16), (1, 17), (3, 40), (2, 129)):
            _, packed, scale, zp, x = make_case(rng, bits, c, k, "channel")
            exact = packed[: (c * k * bits + 7) // 8].clone()
            padded = torch.cat([exact, torch.full((64,), 0xFF, dtype=torch.uint8)])
            a = mixquant.packed_matvec(exact, bits, (c, k), scale, zp, x)
            b = mixquant.packed_matvec(padded, bits, (c, k), scale, zp, x)
            assert torch.equal(a, b)


def test_vector_input_out_and_empty():
    rng = np.random.default_rng(1)
    codes, packed, scale, zp, x = make_case(rng, 4, 8, 9, "channel")
    out = torch.full((8,), float("nan"))
    got = mixquant.packed_matvec(packed, 4, (8, 9), scale, zp, x[0], out=out)
    assert got.shape == (8,) and got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    assert torch.equal(got, mixquant.packed_matvec(packed, 4, (8, 9), scale, zp, x)[0])
    w = mixquant.unpack_dequantize(packed, 4, (8, 9), scale, zp)
    assert torch.allclose(got, w @ x[0], rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, dtype=torch.uint8)
    for backend in ("native", "reference"):
        y = mixquant.packed_matvec(empty, 4, (3, 0), torch.ones(3), torch.zeros(3, dtype=torch.int32),
                                   torch.zeros(2, 0), backend=backend)
        assert torch.equal(y, torch.zeros(2, 3))
        y = mixquant.packed_matvec(empty, 4, (0, 5), torch.ones(1), torch.zeros(1, dtype=torch.int32),
                                   torch.ones(5), backend=backend)
        assert y.shape == (0,)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_input(backend):
    packed = mixquant.pack_bits(np.zeros(12, np.uint8), 3)
    s, z, x = torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.ones(4)

    def call(**kw):
        return mixquant.packed_matvec(kw.get("packed", packed), kw.get("bits", 3), kw.get("shape", (3, 4)),
                                      kw.get("scale", s), kw.get("zp", z), kw.get("x", x),
                                      block_size=kw.get("block"), out=kw.get("out"), backend=backend)

    cases = [
        (dict(packed=packed[:-1]), ValueError, "bytes"),
        (dict(packed=packed.astype(np.int16)), TypeError, "uint8"),
        (dict(zp=torch.tensor([0, 8, 0])), ValueError, "zero_point"),
        (dict(scale=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "scale"),
        (dict(scale=torch.tensor([1.0, 0.0, 1.0])), ValueError, "scale"),
        (dict(scale=torch.ones(2), zp=torch.zeros(2, dtype=torch.int32)), ValueError, "per channel"),
        (dict(block=3), ValueError, "need 6 scales"),
        (dict(block=5), ValueError, "block_size"),
        (dict(bits=17), ValueError, "bits"),
        (dict(shape=(3, 4, 1)), ValueError, "shape"),
        (dict(x=torch.ones(5)), ValueError, "x must be"),
        (dict(x=torch.ones(2, 2, 4)), ValueError, "x must be"),
        (dict(x=torch.ones(4, dtype=torch.float64)), TypeError, "float32"),
        (dict(x=torch.ones(8)[::2]), ValueError, "contiguous"),
        (dict(x=torch.ones(4, 2).t()), ValueError, "contiguous"),
        (dict(x=[1.0, 1.0, 1.0, 1.0]), TypeError, "x"),
        (dict(out=torch.empty(2)), ValueError, "out"),
        (dict(out=torch.empty(6)[::2]), ValueError, "out"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)


def test_binding_checks():
    packed = np.zeros(8, np.uint8)
    s, z = np.ones(2, np.float32), np.zeros(2, np.int64)
    x, out = np.ones(8, np.float32), np.empty(2, np.float32)
    _core.packed_matvec(packed, 4, 2, 8, 8, s, z, x, 1, out)
    assert np.array_equal(out, [0.0, 0.0])
    bad = [
        ((packed[:7], 4, 2, 8, 8, s, z, x, 1, out), "too short"),
        ((packed, 4, 2, 8, 0, s, z, x, 1, out), "block"),
        ((packed, 4, 2, 8, 9, s, z, x, 1, out), "block"),
        ((packed, 4, 2, 8, 4, s, z, x, 1, out), "entries"),
        ((packed, 4, 2, 8, 8, s, z[:1], x, 1, out), "entries"),
        ((packed, 4, -1, 8, 8, s, z, x, 1, out), ">= 0"),
        ((packed, 4, 2**40, 2**20, 8, s, z, x, 1, out), "too large"),
        ((packed, 4, 2, 8, 8, s, z, x, 1, np.empty(3, np.float32)), "elements"),
        ((packed, 4, 2, 8, 8, s, z, x, 1, np.empty(2, np.float64)), "float32"),
        ((packed, 4, 2, 8, 8, s, z, x, 1, np.empty(4, np.float32)[::2]), "contiguous"),
        ((packed, 4, 2, 8, 8, s, z, x.astype(np.float64), 1, out), "float32"),
        ((packed, 4, 2, 8, 8, s, z, np.ones(16, np.float32)[::2], 1, out), "C-contiguous"),
        ((packed, 4, 2, 8, 8, s, z, np.ones((8, 2), np.float32).T, 1, out), "C-contiguous"),
        ((packed, 4, 2, 8, 8, s, z, np.ones(7, np.float32), 1, out), "shape"),
        ((packed, 4, 2, 8, 8, s, z, np.ones((1, 1, 8), np.float32), 1, out), "shape"),
        ((packed, 4, 2, 8, 8, s, z, [1.0] * 8, 1, out), "numpy"),
        ((packed, 4, 2, 8, 8, s, np.array([0, 16]), x, 1, out), "zero_point"),
        ((packed, 4, 2, 8, 8, np.array([1.0, np.inf], np.float32), z, x, 1, out), "scale"),
        ((packed, 4, 2, 8, 8, s, z, x, 0, out), "num_threads"),
        ((packed, 0, 2, 8, 8, s, z, x, 1, out), "bits"),
    ]
    ro = np.empty(2, np.float32)
    ro.setflags(write=False)
    bad.append(((packed, 4, 2, 8, 8, s, z, x, 1, ro), "writable"))
    shared = np.ones(10, np.float32)
    bad.append(((packed, 4, 2, 8, 8, s, z, shared[:8], 1, shared[7:9]), "overlap x"))
    raw = np.zeros(64, np.uint8)
    bad.append(((raw[:8], 4, 2, 8, 8, s, z, x, 1, raw[:8].view(np.float32)), "overlap packed"))
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _core.packed_matvec(*args)


def test_large_row_against_dequantize_then_matmul(simd):
    """An LLM-like row length: the fused result and x @ W.T of the decoded weight agree closely."""
    rng = np.random.default_rng(11)
    codes, packed, scale, zp, x = make_case(rng, 4, 16, 11008, "channel")
    y = mixquant.packed_matvec(packed, 4, (16, 11008), scale, zp, x[0])
    w = mixquant.unpack_dequantize(packed, 4, (16, 11008), scale, zp)
    y64 = numpy_matvec(codes, scale, zp, x, 11008)[0]
    assert (np.abs(y.double().numpy() - y64) <= bound(codes, scale, zp, x, 11008, y64)[0]).all()
    scale_sum = (w.abs() @ x[0].abs()).double().numpy()
    assert np.all(np.abs((w @ x[0]).double().numpy() - y.double().numpy()) <= 11008 * 2**-24 * scale_sum)
    assert math.isfinite(float(y.abs().max()))
