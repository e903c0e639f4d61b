"""Type stubs for the native module ``mixquant._core`` (kept in sync by tests/test_core_binding.py).

All matrices are 2-D ``[C, K]`` with one output channel per row.  ``S`` is 1
(per-tensor parameters) or ``C`` (per-channel).  Float inputs are converted
to C-contiguous float32 (zero copy when they already are); invalid shapes,
dtypes or ranges raise ``ValueError`` naming the argument.
"""

from typing import Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_I32 = npt.NDArray[np.int32]
_U8 = npt.NDArray[np.uint8]
_Codes = Union[npt.NDArray[np.uint8], npt.NDArray[np.uint16]]
_Bits = Union[Sequence[int], npt.NDArray[np.integer]]

def simd_level() -> str:
    """Name of the SIMD level in use on the calling thread: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""

def supported_simd_levels() -> list[str]:
    """SIMD levels this CPU and build can run, in the order scalar, avx2, avx512."""

def set_simd_level(name: str) -> None:
    """Set the process default SIMD level; ``ValueError`` if unknown or unsupported."""

def default_simd_level() -> str:
    """The process default SIMD level (what a thread without an override uses)."""

def set_thread_simd_level(name: Optional[str]) -> None:
    """Override the level on the calling thread (``None``: back to the default); ``ValueError`` if unsupported."""

def has_openmp() -> bool:
    """Whether the core was built with OpenMP (otherwise ``num_threads`` is ignored)."""

def limits() -> dict[str, int]:
    """The limits the binding checks: ``min_bits``, ``max_bits``, ``min_act_bits``, ``max_act_bits``,
    ``max_n_grid``, ``max_clip_scratch_bytes`` (mirrors :mod:`mixquant.core.limits`)."""

def clip_grid_ok(n_grid: int, step: float) -> bool:
    """Whether every clipping factor ``1 - i*step`` (``0 <= i < n_grid``) is positive."""

def channel_minmax(w: npt.ArrayLike, num_threads: int) -> tuple[_F32, _F32, int]:
    """Per-row ``(lo[C], hi[C], n_nonfinite)`` over finite values; rows without any finite value give (0, 0)."""

def qparams(lo: npt.ArrayLike, hi: npt.ArrayLike, bits: int, symmetric: bool) -> tuple[_F32, _I32]:
    """``(scale[n] float32, zero_point[n] int32)`` from finite ranges after including zero (asymmetric or torch quint8 symmetric)."""

def error_table(
    w: npt.ArrayLike,
    scale: npt.ArrayLike,
    zero_point: npt.ArrayLike,
    bits: _Bits,
    num_threads: int,
) -> tuple[_F64, _F32]:
    """One fused pass: ``(sse[B, C] float64, max_abs[B, C] float32)`` of ``w - fake_quantize(w)`` for ``scale/zero_point[B, S]``, ``bits[B]``."""

def weighted_error_table(
    w: npt.ArrayLike, v: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: _Bits,
    num_threads: int,
) -> _F64:
    """Weighted squared errors ``wsse[b, c] = sum_k v[c, k] * (w[c, k] - w_hat[c, k])**2`` (float64 ``[B, C]``).

    ``v`` is ``(K,)`` (one weight per column, shared by every row) or ``(C, K)``; finite and >= 0.
    ``scale``/``zero_point`` are ``[B, S]`` as in :func:`error_table`.
    """

def row_energy(w: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike, num_threads: int) -> _F64:
    """``sum(w[c]**2)`` of every row (float64[C]); ``lo``/``hi`` bound each row's values (range scaling)."""

def minmax_error_table(
    w: npt.ArrayLike,
    bits: _Bits,
    per_channel: bool,
    symmetric: bool,
    num_threads: int,
) -> tuple[_F32, _F32, _F32, _I32, _F64, _F32, _F64, int]:
    """Min/max quantizers of every bit-width and their error table in one call.

    Returns ``(lo[C], hi[C], scale[B, S], zero_point[B, S], sse[B, C], max_abs[B, C],
    energy[C], n_nonfinite)``; S is C per channel, else 1. When ``n_nonfinite > 0`` every
    output but ``lo``/``hi`` is zero (the tensor must be refused).
    """

def clip_search(
    w: npt.ArrayLike,
    lo: npt.ArrayLike,
    hi: npt.ArrayLike,
    bits: _Bits,
    symmetric: bool,
    n_grid: int,
    step: float,
    p: float,
    num_threads: int,
) -> tuple[_I32, _F32, _I32, _F64]:
    """Grid search over range factors ``1 - i*step`` minimising ``sum |e|**p``: ``(best_index, scale, zero_point, lp_err)``, each ``[B, S]``."""

def fake_quantize(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, num_threads: int
) -> _F32:
    """``(clamp(nearbyint(w / scale) + zp, 0, 2**bits - 1) - zp) * scale``, bit-identical to torch.fake_quantize_*_affine."""

def quantize(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, num_threads: int
) -> _Codes:
    """Integer codes ``clamp(nearbyint(w / scale) + zp, 0, 2**bits - 1)``: uint8 when ``bits <= 8``, else uint16."""

def dequantize(
    codes: _Codes, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, num_threads: int
) -> _F32:
    """``(codes - zero_point) * scale`` as float32 ``[C, K]``; codes above ``2**bits - 1`` raise ``ValueError``."""

def pack_bits(codes: _Codes, bits: int) -> _U8:
    """Pack 1-D codes LSB-first (code j in bits ``[j*bits, (j+1)*bits)``) into ``uint8[ceil(n*bits/8)]``."""

def unpack_bits(packed: _U8, bits: int, n: int) -> _Codes:
    """Unpack ``n`` codes from an LSB-first bit stream: uint8 when ``bits <= 8``, else uint16."""

def unpack_dequantize(packed: _U8, bits: int, outer: int, channels: int, inner: int, block: int,
                      scale: npt.ArrayLike, zero_point: npt.ArrayLike, num_threads: int, out: _F32) -> None:
    """Decode ``outer * channels * inner`` codes packed LSB-first at ``bits`` into ``out`` (float32,
    C-contiguous, writable, in place): element ``(a, c, r)`` is ``(code - zero_point[i]) * scale[i]``,
    ``i = c * max(1, ceil(inner / block)) + r // block``; ``1 <= block <= inner``.  ``out`` must not
    overlap ``packed``."""

def packed_matvec(packed: _U8, bits: int, rows: int, cols: int, block: int, scale: npt.ArrayLike,
                  zero_point: npt.ArrayLike, x: _F32, num_threads: int, out: _F32) -> None:
    """``out[r, c] = sum_k (code[c, k] - zero_point[i]) * scale[i] * x[r, k]`` for the ``rows x cols`` codes
    packed LSB-first at ``bits`` (row-major), ``i = c * ceil(cols / block) + k // block`` (0 with one
    parameter set); ``x`` float32 ``[cols]`` or ``[N, cols]`` and ``out`` float32 ``[N * rows]`` (in place),
    both C-contiguous, ``out`` overlapping neither ``x`` nor ``packed``.  Per block
    ``scale * (sum code * x - zp * sum x)``: float32 partial sums of at most 64 terms added in double."""

# Group-wise quantizers: each row of w [C, K] is cut into G = ceil(K / group_size)
# groups of group_size consecutive elements (the last one possibly short);
# parameters are [C * G] (or [B, C * G]) in (row, group) order.  Group scales
# are rounded up to bfloat16 values, zero points computed from the rounded scale.

def group_minmax(w: npt.ArrayLike, group_size: int, num_threads: int) -> tuple[_F32, _F32, int]:
    """Per-group ``(lo[C*G], hi[C*G], n_nonfinite)`` over finite values; groups without any finite value give (0, 0)."""

def group_qparams(lo: npt.ArrayLike, hi: npt.ArrayLike, bits: int, symmetric: bool) -> tuple[_F32, _I32]:
    """``qparams`` with the scale rounded up to bfloat16 and the zero point computed from the rounded scale."""

def group_minmax_error_table(
    w: npt.ArrayLike, bits: _Bits, group_size: int, symmetric: bool, num_threads: int
) -> tuple[_F32, _F32, _F32, _I32, _F64, _F32, _F64, int]:
    """Fused group-wise table: ``(lo[S], hi[S], scale[B, S], zero_point[B, S], sse[B, C], max_abs[B, C], energy[C],
    n_nonfinite)`` with ``S = C * G``; each segment is read from memory once."""

def group_error_table(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: _Bits, group_size: int, num_threads: int
) -> tuple[_F64, _F32]:
    """``(sse[B, C], max_abs[B, C])`` of group parameters ``scale/zero_point [B, C * G]``."""

def group_clip_search(
    w: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike, bits: _Bits, group_size: int, symmetric: bool,
    n_grid: int, step: float, p: float, num_threads: int,
) -> tuple[_I32, _F32, _I32, _F64]:
    """Clipping search per group with bfloat16 scales: ``(best_index, scale, zero_point, lp_err)``, each ``[B, C * G]``."""

def group_fake_quantize(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, group_size: int, num_threads: int
) -> _F32:
    """Group-wise torch-exact fake quantization (float32 ``[C, K]``); parameters ``[C * G]`` or ``[C, G]``."""

def group_quantize(
    w: npt.ArrayLike, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, group_size: int, num_threads: int
) -> _Codes:
    """Group-wise integer codes ``[C, K]``: uint8 when ``bits <= 8``, else uint16."""

def group_dequantize(
    codes: _Codes, scale: npt.ArrayLike, zero_point: npt.ArrayLike, bits: int, group_size: int, num_threads: int
) -> _F32:
    """Group-wise ``(codes - zero_point) * scale`` as float32 ``[C, K]``."""

def widen_16(src: npt.NDArray[np.uint16], kind: str, out: _F32, num_threads: int) -> None:
    """Write the float32 values of ``src`` (bfloat16 or float16 bit patterns, ``kind``) into ``out[:src.size]``."""
def rounding_weight(V: _F32, floor: _F32, scale: _F32, lo: _F32, hi: _F32, w: _F32, num_threads: int) -> None:
    """AdaRound's soft weight ``scale * clamp(floor + h(V), lo, hi)`` written into ``w`` (1-D float32, one length)."""

def rounding_step(
    V: _F32, floor: _F32, scale: _F32, lo: _F32, hi: _F32, grad_w: _F32, exp_avg: _F32, exp_avg_sq: _F32, w: _F32,
    coef: float, beta: float, beta_minus_1: float, lerp_w: float, beta2: float, one_minus_beta2: float,
    neg_step: float, bc2_sqrt: float, eps: float, num_threads: int,
) -> None:
    """One fused AdaRound step in place: d(L + coef * regulariser)/dV from ``grad_w``, Adam on V, new ``w``."""
