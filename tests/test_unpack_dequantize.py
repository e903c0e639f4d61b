"""The native unpack-and-dequantize kernel equals its reference twin and an independent decoding, on every SIMD level.

The values must agree bit for bit: both compute ``(float(code) - float(zp)) * scale``
in float32. The independent decoding is numpy's ``unpackbits`` plus a per-element
parameter lookup written out in this file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixquant
from mixquant import _core
from mixquant.core.kernels import packed_layout


def numpy_decode(packed: np.ndarray, bits: int, shape, ch_axis: int, scale, zp, block=None) -> np.ndarray:
    """Independent decoding: bit matrix from np.unpackbits, parameters looked up element by element."""
    n = math.prod(shape)
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    codes = (stream << np.arange(bits)).sum(axis=1).reshape(shape)
    s, z = np.asarray(scale, np.float32).reshape(-1), np.asarray(zp, np.int64).reshape(-1)
    if s.size == 1:
        idx = np.zeros(shape, np.int64)
    else:
        inner = math.prod(shape[ch_axis + 1:])
        block = block or max(inner, 1)
        groups = max(1, -(-inner // block))
        c = np.indices(shape)[ch_axis]
        r = np.arange(n).reshape(shape) % max(inner, 1)
        idx = c * groups + r // block
    return ((codes.astype(np.float32) - z[idx].astype(np.float32)) * s[idx]).astype(np.float32)


def make_case(rng, bits, shape, ch_axis, kind, block=None):
    n = math.prod(shape)
    codes = rng.integers(0, 2**bits, size=n)
    packed = mixquant.pack_bits(codes, bits)
    if kind == "tensor":
        count = 1
    else:
        inner = math.prod(shape[ch_axis + 1:])
        count = shape[ch_axis] * (max(1, -(-inner // block)) if kind == "blocked" else 1)
    scale = torch.from_numpy((rng.random(count) * 0.1 + 1e-3).astype(np.float32))
    zp = torch.from_numpy(rng.integers(0, 2**bits, size=count).astype(np.int32))
    return codes, packed, scale, zp


SHAPES = [  # (shape, ch_axis): Linear, Conv2d, depthwise, ConvTranspose (axis 1), odd sizes across chunks
    ((7, 13), 0), ((16, 8, 3, 3), 0), ((32, 1, 3, 3), 0), ((6, 5, 3, 3), 1), ((3, 4099), 0), ((2, 1, 9001), 0),
    ((1,), 0), ((5, 0), 0),
]


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("shape,ch_axis", SHAPES)
@pytest.mark.parametrize("kind", ["tensor", "channel", "blocked"])
def test_native_equals_reference_and_numpy(simd, bits, shape, ch_axis, kind):
    rng = np.random.default_rng([bits, len(shape), ch_axis, sum(shape)])
    inner = math.prod(shape[ch_axis + 1:])
    block = max(1, min(inner, 1 + inner // 3)) if kind == "blocked" else None
    _, packed, scale, zp = make_case(rng, bits, shape, ch_axis, kind, block)
    kw = dict(ch_axis=ch_axis, block_size=block)
    nat = mixquant.unpack_dequantize(packed, bits, shape, scale, zp, backend="native", num_threads=2, **kw)
    ref = mixquant.unpack_dequantize(packed, bits, shape, scale, zp, backend="reference", **kw)
    assert nat.dtype == torch.float32 and tuple(nat.shape) == shape
    assert torch.equal(nat, ref)
    np.testing.assert_array_equal(nat.numpy(), numpy_decode(packed, bits, shape, ch_axis, scale, zp, block))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 11, 16])
def test_equals_unpack_then_dequantize_tensor(simd, bits):
    """The fused call is the two existing kernels in a row (per channel, channel axis 0 and 1)."""
    rng = np.random.default_rng(bits)
    for shape, ch_axis in (((24, 40), 0), ((4, 6, 5), 1)):
        codes, packed, scale, zp = make_case(rng, bits, shape, ch_axis, "channel")
        fused = mixquant.unpack_dequantize(packed, bits, shape, scale, zp, ch_axis=ch_axis)
        codes_t = torch.from_numpy(mixquant.unpack_bits(packed, bits, codes.size).astype(np.int64)).reshape(shape)
        assert torch.equal(fused, mixquant.dequantize_tensor(codes_t, scale, zp, ch_axis=ch_axis))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_chunk_edges(simd, threads):
    """Rows that straddle the 4096-code work items and the SIMD windows; any thread count, same bits."""
    rng = np.random.default_rng(threads)
    for bits in (3, 7, 13):
        shape = (37, 4099)
        _, packed, scale, zp = make_case(rng, bits, shape, 0, "channel")
        got = mixquant.unpack_dequantize(packed, bits, shape, scale, zp, num_threads=threads)
        np.testing.assert_array_equal(got.numpy(), numpy_decode(packed, bits, shape, 0, scale, zp))


def test_reads_only_its_bytes(simd):
    """A stream exactly ceil(n*bits/8) long decodes (no window reads past it); trailing junk is ignored."""
    rng = np.random.default_rng(5)
    for bits in range(1, 16):
        for n in (8, 16, 17, 40, 129):
            _, packed, scale, zp = make_case(rng, bits, (n,), 0, "tensor")
            exact = np.ascontiguousarray(packed[: (n * bits + 7) // 8])
            padded = np.concatenate([exact, np.full(32, 0xFF, np.uint8)])
            a = mixquant.unpack_dequantize(exact, bits, (n,), scale, zp)
            b = mixquant.unpack_dequantize(padded, bits, (n,), scale, zp)
            assert torch.equal(a, b)


def test_out_in_place():
    rng = np.random.default_rng(1)
    _, packed, scale, zp = make_case(rng, 4, (8, 9), 0, "channel")
    out = torch.full((72,), float("nan"))
    got = mixquant.unpack_dequantize(packed, 4, (8, 9), scale, zp, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    assert torch.equal(got, mixquant.unpack_dequantize(packed, 4, (8, 9), scale, zp, backend="reference"))


def test_layout_rules():
    assert packed_layout((6, 5, 3, 3), 1, 5) == (6, 5, 9, 9)
    assert packed_layout((6, 5, 3, 3), 0, 1) == (1, 1, 270, 270)
    assert packed_layout((4, 10), 0, 12, block_size=4) == (1, 4, 10, 4)  # ceil(10/4) = 3 blocks a row
    with pytest.raises(ValueError, match="per channel"):
        packed_layout((4, 10), 0, 3)
    with pytest.raises(ValueError, match="need 12 scales"):
        packed_layout((4, 10), 0, 8, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        packed_layout((4, 10), 0, 4, block_size=11)
    with pytest.raises(ValueError, match="ch_axis"):
        packed_layout((4, 10), 2, 4)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_input(backend):
    packed = mixquant.pack_bits(np.zeros(12, np.uint8), 3)
    s, z = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    call = lambda **kw: mixquant.unpack_dequantize(  # noqa: E731
        kw.get("packed", packed), kw.get("bits", 3), kw.get("shape", (3, 4)), kw.get("scale", s),
        kw.get("zp", z), backend=backend)
    with pytest.raises(ValueError, match="bytes"):
        call(packed=packed[:-1])
    with pytest.raises(TypeError, match="uint8"):
        call(packed=packed.astype(np.int16))
    with pytest.raises(ValueError, match="zero_point"):
        call(zp=torch.tensor([0, 8, 0]))
    with pytest.raises(ValueError, match="scale"):
        call(scale=torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="scale"):
        call(scale=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="bits"):
        call(bits=17)
    with pytest.raises(ValueError, match="out"):
        mixquant.unpack_dequantize(packed, 3, (3, 4), s, z, out=torch.empty(11), backend=backend)


def test_binding_checks():
    packed = np.zeros(8, np.uint8)
    s, z = np.ones(2, np.float32), np.zeros(2, np.int64)
    out = np.empty(16, np.float32)
    _core.unpack_dequantize(packed, 4, 1, 2, 8, 8, s, z, 1, out)
    bad = [
        ((packed[:7], 4, 1, 2, 8, 8, s, z, 1, out), "too short"),
        ((packed, 4, 1, 2, 8, 0, s, z, 1, out), "block"),
        ((packed, 4, 1, 2, 8, 9, s, z, 1, out), "block"),
        ((packed, 4, 1, 2, 8, 4, s, z, 1, out), "entries"),
        ((packed, 4, -1, 2, 8, 8, s, z, 1, out), ">= 0"),
        ((packed, 4, 2**40, 2**20, 2**10, 8, s, z, 1, out), "too large"),
        ((packed, 4, 1, 2, 8, 8, s, z, 1, np.empty(15, np.float32)), "elements"),
        ((packed, 4, 1, 2, 8, 8, s, z, 1, np.empty(16, np.float64)), "float32"),
        ((packed, 4, 1, 2, 8, 8, s, z, 1, np.empty(32, np.float32)[::2]), "contiguous"),
        ((packed, 4, 1, 2, 8, 8, s, np.array([0, 16]), 1, out), "zero_point"),
        ((packed, 4, 1, 2, 8, 8, s, z, 0, out), "num_threads"),
    ]
    ro = np.empty(16, np.float32)
    ro.setflags(write=False)
    bad.append(((packed, 4, 1, 2, 8, 8, s, z, 1, ro), "writable"))
    shared = np.zeros(64, np.uint8)
    bad.append(((shared[:8], 4, 1, 2, 8, 8, s, z, 1, shared.view(np.float32)), "overlap"))
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _core.unpack_dequantize(*args)
