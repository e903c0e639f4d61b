"""Timed property fuzz of mixquant's binding and public kernels.

Draws random problems for a fixed time and checks, for each one:

* valid tensors (random shapes up to the channel/length limits below, float16/
  bfloat16/float32/float64, non-contiguous and negative-stride layouts, wide
  magnitudes, denormals, 1e-30 next to 1e30, constant and zero channels): the
  native and reference backends agree (codes, scales, zero points and
  fake-quantized values bit for bit; error sums within 1e-5 relative plus the
  documented floor of n * 2**-149; max |e| exactly);
* NaN/Inf anywhere in a weight: every public kernel raises ValueError naming
  the tensor, on both backends;
* the same with group-wise scales (``group_size``) on some per-channel problems;
* the packed matrix-vector product on random widths, shapes, parameter kinds
  and input magnitudes: native within ``MATVEC_TOLERANCE`` of its float64 twin
  on every SIMD level;
* junk arguments to the raw ``mixquant._core`` functions (wrong types, ranks,
  lengths, dtypes, negative/huge sizes and thread counts, bits 0/17, NaN
  parameters): ValueError or TypeError, never a crash.

Run under tools/sanitize.sh to get the ASan/UBSan build; on its own it tests
whatever mixquant is importable.

    python tools/fuzz/fuzz_binding.py --seconds 60 [--seed N]

Exit status 1 on the first violation (the seed and case are printed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

import mixquant
from mixquant import _core

FLOOR = 2.0**-149
DTYPES = [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]
LEVELS = mixquant.supported_simd_levels()


class Violation(AssertionError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Violation(msg)


def sum_floor(scale, p: float, n_terms: int) -> np.ndarray:
    """Documented absolute floor of a native error sum: terms are accumulated in float after
    an exact power-of-two range scaling by 2**-E (E = ilogb(scale), applied only for extreme
    scales, as ops.cpp's range_exponent decides), so each term may lose 2**-149 * 2**(p*E)."""
    e = np.frexp(np.asarray(scale, np.float64))[1] - 1.0
    scaled = ~((p * (e - 24) > -100) & (p * (e + 34) < 100))
    return n_terms * FLOOR * np.where(scaled, np.exp2(p * e), 1.0)


def sums_close(a, b, floor, what: str, rtol: float = 1e-5) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    ok = both_inf | (np.abs(a - b) <= rtol * np.maximum(np.abs(a), np.abs(b)) + floor)
    check(bool(ok.all()), f"{what}: native {a[~ok][:4]} vs reference {b[~ok][:4]}")


# ----------------------------------------------------------------- weights --
def draw_shape(rng: np.random.Generator) -> tuple:
    kind = rng.integers(0, 10)
    if kind == 0:  # many channels, short rows (channel-count limit side)
        return (int(rng.integers(1, 20000)), int(rng.integers(1, 3)))
    if kind == 1:  # one long row (chunked reduction paths)
        return (1, int(rng.integers(30000, 200000)))
    if kind == 2:  # conv-like 4-D
        return tuple(int(x) for x in rng.integers(1, 9, size=4))
    if kind == 3:
        return (int(rng.integers(1, 100)),)
    return (int(rng.integers(1, 40)), int(rng.integers(1, 700)))


def draw_values(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape))
    style = rng.integers(0, 8)
    mag = float(10.0 ** rng.uniform(-30, 30)) if rng.random() < 0.3 else 1.0
    if style == 0:
        v = rng.standard_normal(n) * mag
    elif style == 1:  # heavy tails
        v = rng.standard_cauchy(n) * mag
    elif style == 2:  # extreme dynamic range inside one channel
        v = rng.choice([1e-30, -1e-30, 1e30, -1e30, 3.7e-25, 0.5, -2.0], size=n) * rng.uniform(0.5, 1.5, n)
    elif style == 3:  # denormals
        v = rng.integers(-2**20, 2**20, size=n) * 2.0**-149
    elif style == 4:  # ties of round-half-to-even
        v = np.round(rng.standard_normal(n) * 8) / 16 * mag
    elif style == 5:  # one-signed
        v = np.abs(rng.standard_normal(n)) * mag + mag
    elif style == 6:  # all zero or constant
        v = np.full(n, 0.0 if rng.random() < 0.5 else 0.7 * mag)
    else:  # up to the float32 range edge where the grid still fits
        v = rng.standard_normal(n) * 1e37
    v = v.reshape(shape)
    if len(shape) >= 2 and rng.random() < 0.3:  # special channels
        v[int(rng.integers(0, shape[0]))] = 0.0
    return v


def draw_tensor(rng: np.random.Generator) -> torch.Tensor:
    shape = draw_shape(rng)
    v = draw_values(rng, shape)
    dtype = DTYPES[int(rng.integers(0, len(DTYPES)))]
    t = torch.from_numpy(v).to(dtype)
    t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # float16 overflow -> keep finite
    layout = rng.integers(0, 4)
    if layout == 1 and t.dim() >= 2:  # transposed storage, same logical tensor
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == 2 and t.dim() >= 1:  # strided slice of a bigger tensor
        big = torch.zeros((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
        big[::2] = t
        t = big[::2]
    return t


# ------------------------------------------------------------------ checks --
def check_public(rng: np.random.Generator, w: torch.Tensor) -> None:
    bits = sorted(set(int(b) for b in rng.integers(1, 17, size=int(rng.integers(1, 5)))))
    per_channel = bool(rng.random() < 0.6)
    symmetric = bool(rng.random() < 0.3)
    # Group-wise scales on some per-channel problems (the last group of a row often short).
    gs = int(rng.choice([1, 3, 16, 64, 128, 5000])) if per_channel and w.dim() >= 1 and rng.random() < 0.4 else None
    level = LEVELS[int(rng.integers(0, len(LEVELS)))]
    nt = int(rng.integers(1, 4))
    n = w.numel()
    ch = w.shape[0] if (per_channel and w.dim() >= 1) else 1
    with mixquant.use_simd_level(level):
        try:
            nat = mixquant.roundoff_error(w, bits, per_channel=per_channel, symmetric=symmetric, group_size=gs,
                                          backend="native", num_threads=nt)
        except ValueError as exc:  # only for grids overflowing float32 (|w| near FLT_MAX)
            check("not finite" in str(exc), f"unexpected ValueError: {exc}")
            return
    ref = mixquant.roundoff_error(w, bits, per_channel=per_channel, symmetric=symmetric, group_size=gs,
                                  backend="reference")
    check(np.array_equal(nat.scale, ref.scale), "scale differs")
    check(np.array_equal(nat.zero_point, ref.zero_point), "zero point differs")
    row = max(1, n // max(1, w.shape[0] if w.dim() else 1))
    row_scale = nat.scale if gs is None else nat.scale.reshape(len(bits), ch, -1).max(axis=2)
    sums_close(nat.channel_sse, ref.channel_sse, sum_floor(row_scale, 2.0, row), "channel sse")
    check(np.array_equal(nat.channel_max_abs, ref.channel_max_abs), "max_abs differs")
    check(np.isfinite(nat.sse).all() and np.isfinite(nat.norm).all(), "non-finite error table")
    # Elementwise ops at one bit-width with the table's parameters.
    b = bits[int(rng.integers(0, len(bits)))]
    i = bits.index(b)
    scale, zp = torch.from_numpy(nat.scale[i].copy()), torch.from_numpy(nat.zero_point[i].copy())
    g = dict(group_size=gs)
    with mixquant.use_simd_level(level):
        fq = mixquant.fake_quantize_tensor(w, scale, zp, b, backend="native", num_threads=nt, **g)
        q = mixquant.quantize_tensor(w, scale, zp, b, backend="native", num_threads=nt, **g)
        dq = mixquant.dequantize_tensor(q, scale, zp, backend="native", num_threads=nt, **g)
    check(torch.equal(fq, mixquant.fake_quantize_tensor(w, scale, zp, b, backend="reference", **g)), "fake_quantize")
    check(torch.equal(q, mixquant.quantize_tensor(w, scale, zp, b, backend="reference", **g)), "quantize")
    check(torch.equal(dq, fq), "dequantize(quantize) != fake_quantize")
    check(int(q.max()) <= 2**b - 1 and int(q.min()) >= 0, "code out of range")
    packed = mixquant.pack_bits(q, b)
    check(len(packed) == (n * b + 7) // 8, "packed length")
    check(np.array_equal(mixquant.unpack_bits(packed, b, n).astype(np.int64), q.reshape(-1).numpy().astype(np.int64)),
          "unpack(pack)")
    # Clipping search on small problems (the reference is slow).
    if n <= 4000:
        grid = int(rng.integers(1, 30))
        step = float(rng.uniform(0.001, 1.0 / grid))
        p = float(rng.choice([2.0, 1.0, 2.4, 0.7, 4.0]))
        kw = dict(per_channel=per_channel, symmetric=symmetric, p=p, n_grid=grid, step=step, group_size=gs)
        with mixquant.use_simd_level(level):
            cn = mixquant.clip_search(w, bits, backend="native", num_threads=nt, **kw)
        cr = mixquant.clip_search(w, bits, backend="reference", **kw)
        check(bool(((cn.best_index >= 0) & (cn.best_index < grid)).all()), "best_index range")
        finite = torch.isfinite(cr.lp_err)
        # Floor from the widest candidate's scale (doubled: shrunk candidates may round up an exponent).
        widest = np.stack([mixquant.choose_qparams(w, bb, per_channel=per_channel, symmetric=symmetric,
                                                   group_size=gs)[0].numpy().reshape(-1) for bb in bits])
        floor = sum_floor(2.0 * widest, p, n if not per_channel else max(1, n // ch) if gs is None else gs)
        sums_close(cn.lp_err[finite].numpy(), cr.lp_err[finite].numpy(), floor[finite.numpy()], "lp_err", rtol=2e-5)
        same = cn.best_index == cr.best_index
        check(torch.equal(cn.scale[same], cr.scale[same]), "clip scale")


def check_nonfinite(rng: np.random.Generator, w: torch.Tensor) -> None:
    w = w.clone()
    flat = w.view(-1) if w.is_contiguous() else None
    if flat is None:
        w = w.contiguous()
        flat = w.view(-1)
    bad = float(rng.choice([math.nan, math.inf, -math.inf]))
    for _ in range(int(rng.integers(1, 4))):
        flat[int(rng.integers(0, flat.numel()))] = bad
    scale, zp = torch.tensor([0.1]), torch.tensor([3])
    for backend in ("native", "reference"):
        calls = {
            "roundoff_error": lambda: mixquant.roundoff_error(w, [4], backend=backend, name="victim"),
            "clip_search": lambda: mixquant.clip_search(w, [4], n_grid=4, backend=backend, name="victim"),
            "choose_qparams": lambda: mixquant.choose_qparams(w, 4, backend=backend, name="victim"),
            "choose_qparams_mse": lambda: mixquant.choose_qparams(w, 4, clip="mse", n_grid=4, backend=backend,
                                                                  name="victim"),
            "fake_quantize": lambda: mixquant.fake_quantize_tensor(w, scale, zp, 4, backend=backend),
            "quantize": lambda: mixquant.quantize_tensor(w, scale, zp, 4, backend=backend),
        }
        for label, call in calls.items():
            try:
                call()
            except ValueError as exc:
                check("non-finite" in str(exc) and ("victim" in str(exc) or "w " in str(exc)),
                      f"{label}/{backend}: unclear message {exc}")
            else:
                raise Violation(f"{label}/{backend} accepted a {bad}")


JUNK = [None, "x", 3.5, -1, 0, 2**62, [], [[1.0]], [1.5, 2.5], np.zeros((2, 2, 2), np.float32),
        np.zeros((0, 3), np.float32), np.array([np.nan], np.float32), np.array([1e-45], np.float32),
        np.array(["a"]), np.zeros(3, np.complex64), np.ones(5, np.int64), np.ones((3, 4), np.float64)[:, ::2],
        np.ones((3, 4), np.float32)[::-1], object()]


def check_raw_junk(rng: np.random.Generator) -> None:
    w = np.ones((3, 4), np.float32)
    good = {
        "channel_minmax": (w, 1),
        "qparams": (np.zeros(3, np.float32), np.ones(3, np.float32), 4, False),
        "error_table": (w, np.ones((1, 3), np.float32), np.zeros((1, 3), np.int64), [4], 1),
        "clip_search": (w, np.zeros(3, np.float32), np.ones(3, np.float32), [4], False, 5, 0.1, 2.0, 1),
        "fake_quantize": (w, np.ones(3, np.float32), np.zeros(3, np.int64), 4, 1),
        "quantize": (w, np.ones(3, np.float32), np.zeros(3, np.int64), 4, 1),
        "dequantize": (np.zeros((3, 4), np.uint8), np.ones(3, np.float32), np.zeros(3, np.int64), 4, 1),
        "pack_bits": (np.zeros(7, np.uint8), 3),
        "group_minmax": (w, 2, 1),
        "group_qparams": (np.zeros(6, np.float32), np.ones(6, np.float32), 4, False),
        "group_minmax_error_table": (w, [4], 3, False, 1),
        "group_error_table": (w, np.ones((1, 6), np.float32), np.zeros((1, 6), np.int64), [4], 3, 1),
        "group_clip_search": (w, np.zeros(6, np.float32), np.ones(6, np.float32), [4], 3, False, 5, 0.1, 2.0, 1),
        "group_fake_quantize": (w, np.ones(6, np.float32), np.zeros(6, np.int64), 4, 3, 1),
        "group_quantize": (w, np.ones(6, np.float32), np.zeros(6, np.int64), 4, 3, 1),
        "group_dequantize": (np.zeros((3, 4), np.uint8), np.ones(6, np.float32), np.zeros(6, np.int64), 4, 3, 1),
        "unpack_bits": (np.zeros(7, np.uint8), 3, 10),
        "unpack_dequantize": (np.zeros(8, np.uint8), 4, 1, 2, 8, 8, np.ones(2, np.float32), np.zeros(2, np.int64),
                              1, np.empty(16, np.float32)),
        "packed_matvec": (np.zeros(8, np.uint8), 4, 2, 8, 8, np.ones(2, np.float32), np.zeros(2, np.int64),
                          np.ones(8, np.float32), 1, np.empty(2, np.float32)),
        # V, floor, scale, lo, hi, [grad_w, exp_avg, exp_avg_sq,] w
        "rounding_weight": tuple(np.full(6, v, np.float32) for v in (0, 0, 1, 0, 1, 0)) + (1,),
        "rounding_step": tuple(np.full(6, v, np.float32) for v in (0, 0, 1, 0, 1, 0.5, 0, 0, 0))
        + (0.01, 2.0, 1.0, 0.1, 0.999, 0.001, -1e-3, 0.03, 1e-8, 1),
    }
    name = list(good)[int(rng.integers(0, len(good)))]
    args = list(good[name])
    for _ in range(int(rng.integers(1, 3))):
        args[int(rng.integers(0, len(args)))] = JUNK[int(rng.integers(0, len(JUNK)))]
    try:
        getattr(_core, name)(*args)
    except (ValueError, TypeError, MemoryError):
        pass  # MemoryError: e.g. unpack_bits(n=2**62) asks numpy for exabytes


def check_matvec(rng: np.random.Generator) -> None:
    from mixquant.core.kernels import MATVEC_TOLERANCE

    bits = int(rng.integers(1, 17))
    c, k, n = int(rng.integers(1, 10)), int(rng.integers(1, 301)), int(rng.integers(1, 7))
    codes = rng.integers(0, 2**bits, size=(c, k))
    packed = torch.from_numpy(mixquant.pack_bits(codes.reshape(-1), bits))
    kind = ["tensor", "channel", "blocked"][int(rng.integers(0, 3))]
    block = int(rng.integers(1, k + 1)) if kind == "blocked" else None
    groups = -(-k // block) if block else 1
    count = 1 if kind == "tensor" else c * groups
    scale = torch.from_numpy((10.0 ** rng.uniform(-4, 1, size=count)).astype(np.float32))
    zp = torch.from_numpy(rng.integers(0, 2**bits, size=count).astype(np.int32))
    x = rng.standard_normal((n, k)) * float(rng.choice([1.0, 1e-3, 1e3, 1e-20, 1e20]))
    x = torch.from_numpy(x.astype(np.float32))
    ref = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block, backend="reference")
    if count == 1:
        s_el, z_el = np.full((c, k), float(scale[0])), np.full((c, k), float(zp[0]))
    else:
        idx = np.arange(c)[:, None] * groups + np.arange(k)[None, :] // (block or k)
        s_el, z_el = scale.double().numpy()[idx], zp.double().numpy()[idx]
    tol = MATVEC_TOLERANCE[0] * (np.abs(x.double().numpy()) @ ((codes + z_el) * s_el).T) \
        + MATVEC_TOLERANCE[1] * np.abs(ref.double().numpy()) + FLOOR
    for level in LEVELS:
        with mixquant.use_simd_level(level):
            nat = mixquant.packed_matvec(packed, bits, (c, k), scale, zp, x, block_size=block,
                                         num_threads=int(rng.integers(1, 4)))
        err = np.abs(nat.double().numpy() - ref.double().numpy())
        check(bool((err <= tol).all()), f"packed_matvec {level} bits={bits} {(c, k, n)} {kind} block={block}: "
                                        f"error {err.max()} over the bound")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    deadline = time.monotonic() + args.seconds
    case = 0
    torch.set_num_threads(1)
    while time.monotonic() < deadline:
        rng = np.random.default_rng([seed, case])
        try:
            w = draw_tensor(rng)
            what = int(rng.integers(0, 5))
            if what <= 1:
                check_public(rng, w)
            elif what == 2:
                check_nonfinite(rng, w)
            elif what == 3:
                check_matvec(rng)
            else:
                check_raw_junk(rng)
        except Exception as exc:  # Violation or an unexpected exception type
            print(f"fuzz_binding: FAILED at seed={seed} case={case} "
                  f"(rerun: --seed {seed}; rng = default_rng([{seed}, {case}]))", file=sys.stderr)
            traceback.print_exception(exc)
            return 1
        case += 1
    print(f"fuzz_binding: {case} cases in {args.seconds:.0f} s, no finding (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
