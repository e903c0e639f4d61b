"""The weighted error table (data-aware sensitivities): native kernel == pure-PyTorch twin, on every SIMD level.

``sum_k v[c, k] * (w[c, k] - w_hat[c, k])**2`` with one weight per column
(``sensitivity="input"``) or one per element (``"fisher"``), for the
quantizers of a roundoff-error table (min/max or clipping search, per channel
or per tensor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixquant
from conftest import simd_levels
from mixquant import _core
from mixquant.core.error import weighted_errors
from test_native_vs_reference import assert_close_sums, weights

LEVELS = simd_levels()
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _weights_for(w: torch.Tensor, per_element: bool, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = tuple(w.shape) if per_element else (w.reshape(w.shape[0], -1).shape[1],)
    v = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "tiny":
        v = v * 1e-30
    elif kind == "huge":
        v = v * 1e30
    elif kind == "sparse":
        v = v * (v > 0.8)
    elif kind == "zero":
        v = v * 0
    return v.float()


@pytest.mark.parametrize("level", LEVELS)
@SETTINGS
@given(w=weights(), bits=st.lists(st.integers(1, 16), min_size=1, max_size=7, unique=True),
       per_channel=st.booleans(), clip=st.sampled_from(["minmax", "mse"]), per_element=st.booleans(),
       kind=st.sampled_from(["plain", "tiny", "huge", "sparse", "zero"]), seed=st.integers(0, 2**31 - 1))
def test_weighted_table_native_equals_reference(level, w, bits, per_channel, clip, per_element, kind, seed):
    v = _weights_for(w, per_element, kind, seed)
    table = mixquant.roundoff_error(w, bits, per_channel=per_channel, clip=clip, n_grid=8, backend="reference")
    with mixquant.use_simd_level(level):
        nat = weighted_errors(w, v, table, backend="native")
    ref = weighted_errors(w, v, table, backend="reference")
    assert nat.shape == ref.shape == (len(table.bits), w.shape[0])
    assert_close_sums(nat, ref)


def test_weighted_table_by_hand():
    # Exact arithmetic: power-of-two scales and integer-valued errors, summed in any order.
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, -4.0, 4.0, 1.0]])
    scale = np.array([[2.0, 4.0]], np.float32)
    zp = np.array([[0, 4]], np.int64)
    v = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    out = _core.weighted_error_table(w.numpy(), v, scale, zp, [3], 1)
    # row 0, scale 2, zp 0: w_hat = 0, 0 (1*0.5 = 0.5 rounds to 0), 2, 4 -> e = 0, 1, 0, -1
    # row 1, scale 4, zp 4: w_hat = 0, -4, 4, 0 -> e = 0, 0, 0, 1
    np.testing.assert_array_equal(out, [[1 * 0 + 2 * 1 + 4 * 0 + 8 * 1, 8 * 1]])
    per_row = np.array([[1, 1, 1, 1], [0, 0, 0, 3]], np.float32)
    np.testing.assert_array_equal(_core.weighted_error_table(w.numpy(), per_row, scale, zp, [3], 1), [[2, 3]])


def test_unit_weights_give_the_plain_table():
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    table = mixquant.roundoff_error(w, range(2, 9), per_channel=True)
    got = weighted_errors(w, torch.ones(200), table)
    assert_close_sums(got, table.channel_sse)
    got = weighted_errors(w, torch.ones_like(w), table)
    assert_close_sums(got, table.channel_sse)


def test_weights_follow_the_channel_axis():
    # A ConvTranspose weight [in, out, k, k] has its channels on axis 1: the per-element
    # weights are moved with it, so that each row meets its own weights.
    w = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.rand(3, 5, 2, 2, generator=torch.Generator().manual_seed(1))
    table = mixquant.roundoff_error(w, [3], per_channel=True, ch_axis=1)
    got = weighted_errors(w, v, table, ch_axis=1)
    wm, vm = w.movedim(1, 0).reshape(5, -1), v.movedim(1, 0).reshape(5, -1)
    fq = mixquant.fake_quantize_tensor(wm, torch.from_numpy(table.scale[0]), torch.from_numpy(table.zero_point[0]), 3)
    np.testing.assert_allclose(got[0], ((wm - fq).double() ** 2 * vm.double()).sum(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_weights_are_refused(bad):
    w = torch.randn(4, 8)
    table = mixquant.roundoff_error(w, [4], per_channel=True)
    v = torch.ones(8)
    v[3] = bad
    for backend in ("native", "reference"):
        with pytest.raises(ValueError, match="finite and >= 0"):
            weighted_errors(w, v, table, backend=backend, name="w")
    with pytest.raises(ValueError, match="finite and >= 0"):
        _core.weighted_error_table(w.numpy(), v.numpy(), table.scale, table.zero_point.astype(np.int64), [4], 1)


def test_bad_shapes_are_refused():
    w = torch.randn(4, 8)
    table = mixquant.roundoff_error(w, [4], per_channel=True)
    for v in (torch.ones(7), torch.ones(4, 7), torch.ones(2, 2, 2, 2, 2)):
        with pytest.raises(ValueError):
            weighted_errors(w, v, table)
    with pytest.raises(ValueError, match="shape"):
        _core.weighted_error_table(w.numpy(), np.ones((3, 8), np.float32), table.scale,
                                   table.zero_point.astype(np.int64), [4], 1)


def test_threads_do_not_change_the_result():
    w = torch.randn(3, 200_000, generator=torch.Generator().manual_seed(5))  # long rows: chunked in parallel
    v = torch.rand(200_000, generator=torch.Generator().manual_seed(6))
    table = mixquant.roundoff_error(w, [2, 4, 8], per_channel=False)
    a = weighted_errors(w, v, table, num_threads=1)
    assert all(np.array_equal(a, weighted_errors(w, v, table, num_threads=n)) for n in (2, 3))
