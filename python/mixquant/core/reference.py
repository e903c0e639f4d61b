"""Pure-PyTorch twins of every native kernel (the reference path).

Each function here computes exactly what its C++ counterpart computes, with
the same floating-point steps, so that the two can be held equal by tests:
integer codes, scales and zero points agree bit for bit; error sums agree to
rounding (the native core sums in a different order).

Conventions (see README, "Search rules"): weights are a float32 matrix
``w[C, K]``; a parameter row ``S`` is ``C`` (per channel) or ``1`` (per
tensor); codes are unsigned in ``[0, 2**bits - 1]``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .limits import ADAROUND_GAMMA as GAMMA
from .limits import ADAROUND_ZETA as ZETA

FLT_MIN = torch.finfo(torch.float32).tiny
FLT_MAX = torch.finfo(torch.float32).max

__all__ = [
    "channel_minmax",
    "qparams",
    "fake_quantize",
    "quantize",
    "dequantize",
    "error_table",
    "weighted_error_table",
    "clip_search",
    "pack_bits",
    "unpack_bits",
    "unpack_dequantize",
    "packed_matvec",
    "bf16_ceil",
    "group_view",
    "group_minmax",
    "group_qparams",
    "group_fake_quantize",
    "group_quantize",
    "group_dequantize",
    "group_error_table",
    "group_clip_search",
    "rounding_weight",
    "rounding_grad",
    "adam_update",
]


def channel_minmax(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row minimum and maximum over finite values, and the count of non-finite values."""
    finite = torch.isfinite(w)
    n_nonfinite = int(w.numel() - finite.sum().item())
    if n_nonfinite:
        lo = torch.where(finite, w, torch.full_like(w, float("inf"))).amin(dim=1)
        hi = torch.where(finite, w, torch.full_like(w, float("-inf"))).amax(dim=1)
    else:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
    return lo, hi, n_nonfinite


def _to_float32_scale(scale_d: torch.Tensor) -> torch.Tensor:
    # Clamp in double first: a double above FLT_MAX must not become inf.
    return scale_d.clamp(FLT_MIN, FLT_MAX).to(torch.float32)


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) from a raw range; zero is always representable."""
    qmax = float(2**bits - 1)
    lo_d = torch.clamp(lo.to(torch.float32), max=0.0).double()
    hi_d = torch.clamp(hi.to(torch.float32), min=0.0).double()
    if symmetric:
        amax = torch.maximum(-lo_d, hi_d)
        scale = torch.where(amax == 0, 1.0, _to_float32_scale(amax * 2.0 / qmax))
        zp = torch.full_like(lo_d, float(2 ** (bits - 1)))
    else:
        width = hi_d - lo_d
        scale = torch.where(width == 0, 1.0, _to_float32_scale(width / qmax))
        zp = torch.clamp(torch.round(-lo_d / scale.double()), 0.0, qmax)
    return scale, zp.to(torch.int32)


def _codes_float(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    # torch.fake_quantize's formula: multiply by the float32 reciprocal, round half to even.
    inv = 1.0 / scale.view(-1, 1)
    q = torch.round(w * inv) + zp.view(-1, 1).to(torch.float32)
    return torch.clamp(q, 0.0, float(2**bits - 1))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``w[C, K]`` (float32 arithmetic)."""
    q = _codes_float(w, scale, zp, bits)
    return (q - zp.view(-1, 1).to(torch.float32)) * scale.view(-1, 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w[C, K]``: uint8 for bits <= 8, else int32."""
    q = _codes_float(w, scale, zp, bits)
    return q.to(torch.uint8 if bits <= 8 else torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Float32 values of integer codes ``codes[C, K]``."""
    q = codes.to(torch.float32)
    return (q - zp.view(-1, 1).to(torch.float32)) * scale.view(-1, 1)


def error_table(
    w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (bit-width, row): sum of squared error (float64) and max |error| (float32).

    ``scale``/``zp`` are ``[B, S]`` with ``S`` = C or 1.
    """
    sse = torch.empty(len(bits), w.shape[0], dtype=torch.float64)
    max_abs = torch.empty(len(bits), w.shape[0], dtype=torch.float32)
    for i, b in enumerate(bits):
        err = w - fake_quantize(w, scale[i], zp[i], int(b))
        sse[i] = err.double().square().sum(dim=1)
        max_abs[i] = err.abs().amax(dim=1)
    return sse, max_abs


def weighted_error_table(
    w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: Sequence[int]
) -> torch.Tensor:
    """Per (bit-width, row): ``sum_k v[k] * (w - w_hat)^2`` in float64; ``v`` is ``[K]`` or ``[C, K]``."""
    out = torch.empty(len(bits), w.shape[0], dtype=torch.float64)
    vd = v.double()
    for i, b in enumerate(bits):
        err = w - fake_quantize(w, scale[i], zp[i], int(b))
        out[i] = (err.double().square() * vd).sum(dim=1)
    return out


def _lp(err: torch.Tensor, p: float) -> torch.Tensor:
    a = err.abs().double()
    return (a.square() if p == 2.0 else a.pow(p)).sum(dim=1)


def clip_search(
    w: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: Sequence[int],
    symmetric: bool,
    n_grid: int,
    step: float,
    p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best shrunken range per (bit-width, group) by lowest sum |e|^p.

    Candidate ``i`` shrinks the zero-including range by ``1 - i*step``; ties keep the
    smallest ``i``. Groups are rows (``S == C``) or the whole matrix (``S == 1``).
    Returns ``best_index [B, S]``, ``scale [B, S]``, ``zero_point [B, S]``, ``lp_err [B, S]``.
    """
    per_tensor = lo.numel() == 1 and w.shape[0] != 1
    rows = w.reshape(1, -1) if per_tensor else w
    return _clip_rows(rows, lo, hi, bits, symmetric, n_grid, step, p, qparams)


def _clip_rows(rows, lo, hi, bits, symmetric, n_grid, step, p, make_qparams):
    """The clipping search with one range per row of ``rows``; ``make_qparams(lo, hi, bits, symmetric)``."""
    groups = lo.numel()
    lo_d = torch.clamp(lo.to(torch.float32), max=0.0).double()
    hi_d = torch.clamp(hi.to(torch.float32), min=0.0).double()
    out_idx = torch.zeros(len(bits), groups, dtype=torch.int32)
    out_scale = torch.empty(len(bits), groups, dtype=torch.float32)
    out_zp = torch.empty(len(bits), groups, dtype=torch.int32)
    out_err = torch.full((len(bits), groups), float("inf"), dtype=torch.float64)
    for bi, b in enumerate(bits):
        for i in range(n_grid):
            factor = 1.0 - i * step
            scale, zp = make_qparams((lo_d * factor).float(), (hi_d * factor).float(), int(b), symmetric)
            err = _lp(rows - fake_quantize(rows, scale, zp, int(b)), p)
            better = err < out_err[bi]
            out_err[bi] = torch.where(better, err, out_err[bi])
            out_idx[bi] = torch.where(better, torch.full_like(out_idx[bi], i), out_idx[bi])
            out_scale[bi] = torch.where(better, scale, out_scale[bi])
            out_zp[bi] = torch.where(better, zp, out_zp[bi])
    return out_idx, out_scale, out_zp, out_err


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D codes into an LSB-first bit stream of ``ceil(n*bits/8)`` bytes."""
    n = codes.numel()
    c = codes.reshape(-1).to(torch.int64)
    if n and int(c.max()) >= 2**bits or n and int(c.min()) < 0:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((c.view(-1, 1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    nbytes = (n * bits + 7) // 8
    stream = torch.cat([stream, torch.zeros(nbytes * 8 - stream.numel(), dtype=torch.uint8)])
    weights = (2 ** torch.arange(8, dtype=torch.int64)).view(1, 8)
    return (stream.view(-1, 8).to(torch.int64) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes (uint8 for bits <= 8, else int32), on ``packed``'s device."""
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"packed buffer holds {packed.numel()} bytes, {(n * bits + 7) // 8} needed")
    dev = packed.device
    stream = (packed.reshape(-1, 1).to(torch.int64) >> torch.arange(8, dtype=torch.int64, device=dev)) & 1
    stream = stream.reshape(-1)[: n * bits].view(n, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int64, device=dev)).sum(dim=1)
    return codes.to(torch.uint8 if bits <= 8 else torch.int32)


def unpack_dequantize(
    packed: torch.Tensor, bits: int, outer: int, channels: int, inner: int, block: int,
    scale: torch.Tensor, zp: torch.Tensor,
) -> torch.Tensor:
    """Float32 ``(code - zp) * scale`` of ``outer * channels * inner`` packed codes (flat).

    Element ``(a, c, r)`` of the ``[outer, channels, inner]`` layout takes the
    parameters ``scale[c * G + r // block]``, ``G = max(1, ceil(inner / block))``.
    """
    n = outer * channels * inner
    codes = unpack_bits(packed, bits, n).to(torch.float32).view(outer, channels, inner)
    groups = max(1, -(-inner // block))
    dev = packed.device
    index = (torch.arange(channels, device=dev).view(-1, 1) * groups
             + torch.arange(inner, device=dev).view(1, -1) // block)
    s = scale.reshape(-1).to(device=dev, dtype=torch.float32)[index]
    z = zp.reshape(-1).to(device=dev, dtype=torch.float32)[index]
    return ((codes - z) * s).reshape(-1)


def packed_matvec(
    packed: torch.Tensor, bits: int, rows: int, cols: int, block: int, scale: torch.Tensor, zp: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """``y[r, c] = sum_k (code[c, k] - zp[i]) * scale[i] * x[r, k]`` in float64, rounded once to float32 (``[N, rows]``).

    The codes are the ``[rows, cols]`` matrix packed row-major; ``i = c * G + k // block``
    (``G = ceil(cols / block)``), or 0 when there is one parameter set. Computed
    block by block as ``scale * (sum code * x - zp * sum x)``, the native
    kernel's form, but in float64 throughout (each product is exact; the sums
    carry about 1e-16 relative error), so the native result is held to its
    float32 partial sums' bound against this one.
    """
    n = rows * cols
    x64 = x.reshape(x.shape[0] if x.dim() == 2 else 1, cols).to(torch.float64)
    if n == 0:
        return torch.zeros(x64.shape[0], rows, dtype=torch.float32, device=x.device)
    groups = -(-cols // block)
    codes = unpack_bits(packed, bits, n).to(device=x.device, dtype=torch.float64).view(rows, cols)
    pad = groups * block - cols
    cg = torch.nn.functional.pad(codes, (0, pad)).view(rows, groups, block)
    xg = torch.nn.functional.pad(x64, (0, pad)).view(-1, groups, block)
    s = scale.reshape(-1).to(device=x.device, dtype=torch.float64)
    z = zp.reshape(-1).to(device=x.device, dtype=torch.float64)
    if s.numel() == 1:
        s, z = s.expand(rows * groups), z.expand(rows * groups)
    s, z = s.reshape(rows, groups), z.reshape(rows, groups)
    cx = (cg.unsqueeze(0) * xg.unsqueeze(1)).sum(dim=3)        # sum code * x per block: [N, rows, G]
    sx = xg.sum(dim=2)                                         # sum x per block
    return ((cx - z * sx[:, None, :]) * s).sum(dim=2).to(torch.float32)


# ---------------------------------------------------------------- groups ----
# A row of K weights is cut into G = ceil(K / group_size) groups of group_size
# consecutive elements, the last one possibly short. The twins below pad each
# row with zeros to G * group_size and view the matrix as [C * G, group_size],
# one group per row, then reuse the per-row functions above. Zero padding is
# neutral: zero is inside every (zero-including) range and exactly on every
# grid, so it changes no range, parameter, error or energy.


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w[C, K]`` as ``[C * G, group_size]``, the last group of each row zero-padded."""
    c, k = w.shape
    g = -(-k // group_size)
    if g * group_size != k:
        w = torch.nn.functional.pad(w, (0, g * group_size - k))
    return w.reshape(c * g, group_size)


def _ungroup(v: torch.Tensor, c: int, k: int) -> torch.Tensor:
    return v.reshape(c, -1)[:, :k]


def bf16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each positive float32 scale (the largest finite bfloat16 above it)."""
    bits = scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    bits = torch.clamp((bits + 0xFFFF) & 0xFFFF0000, max=0x7F7F0000)
    return bits.to(torch.int32).view(torch.float32)


def group_minmax(w: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-group min/max over finite values ``[C * G]`` and the count of non-finite values."""
    c, k = w.shape
    pad = -(-k // group_size) * group_size - k
    # Pad the short last group with copies of its own last element: its min/max stay the same.
    padded = torch.cat([w, w[:, -1:].expand(c, pad)], dim=1) if pad else w
    lo, hi, _ = channel_minmax(padded.reshape(-1, group_size))
    none = lo > hi  # a group without any finite value reports (0, 0)
    return torch.where(none, 0.0, lo), torch.where(none, 0.0, hi), channel_minmax(w)[2]


def group_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams` with the scale rounded up to bfloat16 and the zero point computed from it."""
    scale, zp = qparams(lo, hi, bits, symmetric)
    scale = bf16_ceil(scale)
    if not symmetric:
        qmax = float(2**bits - 1)
        lo_d = torch.clamp(lo.to(torch.float32), max=0.0).double()
        zp = torch.where(scale == 1.0, zp.double(), torch.clamp(torch.round(-lo_d / scale.double()), 0.0, qmax))
    return scale, zp.to(torch.int32)


def group_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                        group_size: int) -> torch.Tensor:
    """:func:`fake_quantize` with one ``[C * G]`` parameter per group."""
    out = fake_quantize(group_view(w, group_size), scale.reshape(-1), zp.reshape(-1), bits)
    return _ungroup(out, *w.shape)


def group_quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """:func:`quantize` with one ``[C * G]`` parameter per group."""
    out = quantize(group_view(w, group_size), scale.reshape(-1), zp.reshape(-1), bits)
    return _ungroup(out, *w.shape)


def group_dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`dequantize` with one ``[C * G]`` parameter per group."""
    out = dequantize(group_view(codes, group_size), scale.reshape(-1), zp.reshape(-1))
    return _ungroup(out, *codes.shape)


def group_error_table(
    w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: Sequence[int], group_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (bit-width, row) sum of squared error and max |error| of group parameters ``[B, C * G]``."""
    c = w.shape[0]
    sse, max_abs = error_table(group_view(w, group_size), scale, zp, bits)
    return sse.reshape(len(bits), c, -1).sum(dim=2), max_abs.reshape(len(bits), c, -1).amax(dim=2)


def group_clip_search(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: Sequence[int], group_size: int, symmetric: bool,
    n_grid: int, step: float, p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`clip_search` per group (ranges ``lo``/``hi`` ``[C * G]``) with bfloat16 scales; outputs ``[B, C * G]``."""
    return _clip_rows(group_view(w, group_size), lo, hi, bits, symmetric, n_grid, step, p, group_qparams)
# ----------------------------------------------------------------- AdaRound step
# The twins of csrc/rounding_*.cpp. They repeat, operation for operation, what
# autograd and torch.optim.Adam (single-tensor, the CPU default) compute for
#   loss = L(w) + coef * sum(1 - |2 h - 1|**beta),
#   h = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  w = scale * clamp(floor + h, lo, hi),
# so that a step built from them is bit-identical to the autograd one. scale,
# lo and hi may be per-channel tensors broadcast against V.


def rounding_weight(V: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor) -> torch.Tensor:
    """AdaRound's soft-rounded weight of ``V``."""
    h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return scale * torch.clamp(floor + h, lo, hi)


def rounding_grad(V: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  grad_w: torch.Tensor, coef: float, beta: float) -> torch.Tensor:
    """d(L + coef * regulariser)/dV from ``grad_w = dL/dw``, as autograd computes it (``coef=0``: no regulariser)."""
    s = torch.sigmoid(V)
    hr = s * (ZETA - GAMMA) + GAMMA
    h = torch.clamp(hr, 0.0, 1.0)
    q = floor + h
    zero = torch.zeros((), dtype=V.dtype)
    g = torch.where((q >= lo) & (q <= hi), grad_w * scale, zero)  # Mul-, Clamp-, AddBackward
    if coef:
        u = 2.0 * h - 1.0
        # SumBackward (expand), RsubBackward (-grad), PowBackward (grad * (beta * |u|^(beta-1))),
        # AbsBackward (* sgn), MulBackward (* 2); coef reaches the sum as a float32 scalar.
        up = torch.full_like(h, -float(torch.tensor(coef, dtype=torch.float32)))
        g = g + up * (u.abs().pow(beta - 1) * beta) * u.sgn() * 2.0
    g = torch.where((hr >= 0.0) & (hr <= 1.0), g, zero)
    return torch.ops.aten.sigmoid_backward(g * (ZETA - GAMMA), s)


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, betas: Tuple[float, float], eps: float) -> None:
    """torch.optim.Adam's single-tensor update of ``param`` in place (no weight decay); ``step`` counts from 1."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = float(torch.tensor(float(step), dtype=torch.float32))  # Adam counts steps in a float32 tensor
    step_size = lr / (1 - beta1**t)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
