"""Concurrent calls from several Python threads equal serial calls, and thread use stays bounded.

The native calls release the GIL, so Python threads really run the core at the
same time; every result must still be bit-identical to the serial one (the
reductions are deterministic for any thread count, docs/SAFETY.md).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import mixquant
import mixquant._core
from conftest import simd_levels

LEVELS = simd_levels()


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, 3 * 3 * 32, generator=g),
        torch.randn(1, 70_000, generator=g) * 1e-3,        # one long row: chunked parallel path
        torch.randn(300, 17, generator=g).t().contiguous(),  # many short rows
        torch.randn(8, 4, 3, 3, generator=g) * 1e20,
    ]


def _job(kind: str, w: torch.Tensor, nt: int):
    if kind == "error_table":
        r = mixquant.roundoff_error(w, range(2, 9), per_channel=True, num_threads=nt)
        return ("table", r.channel_sse.copy(), r.channel_max_abs.copy(), r.scale.copy())
    if kind == "error_table_tensor":
        r = mixquant.roundoff_error(w, [3, 4, 8], per_channel=False, num_threads=nt)
        return ("table", r.channel_sse.copy(), r.channel_max_abs.copy(), r.scale.copy())
    if kind == "clip_search":
        r = mixquant.clip_search(w, [2, 4], n_grid=16, p=2.4, num_threads=nt)
        return ("clip", r.best_index.clone(), r.scale.clone(), r.lp_err.clone())
    if kind == "fake_quantize":
        s, z = mixquant.choose_qparams(w, 4, num_threads=nt)
        return ("fq", mixquant.fake_quantize_tensor(w, s, z, 4, num_threads=nt))
    if kind == "pack":
        s, z = mixquant.choose_qparams(w, 5, per_channel=False, num_threads=nt)
        codes = mixquant.quantize_tensor(w, s, z, 5, num_threads=nt)
        packed = mixquant.pack_bits(codes, 5)
        return ("pack", packed, mixquant.unpack_bits(packed, 5, codes.numel()))
    raise AssertionError(kind)


KINDS = ["error_table", "error_table_tensor", "clip_search", "fake_quantize", "pack"]


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    for x, y in zip(a[1:], b[1:]):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


@pytest.mark.parametrize("level", LEVELS)
def test_concurrent_calls_equal_serial_calls(level):
    tensors = _tensors()
    # 4 threads x 20 calls, mixing kinds, tensors and thread counts (1..3 OpenMP threads each).
    plan = [(KINDS[(t * 7 + i) % len(KINDS)], (t + i) % len(tensors), 1 + (t + 2 * i) % 3)
            for t in range(4) for i in range(20)]
    with mixquant.use_simd_level(level):
        # The serial answer, computed with one thread: results must not depend on the count.
        expected = {(k, ti): _job(k, tensors[ti], 1) for k, ti, _ in plan}
        start = threading.Barrier(4)

        def worker(t: int):
            start.wait()
            out = []
            with mixquant.use_simd_level(level):  # context-local: each thread enters it
                for kind, ti, nt in plan[t * 20:(t + 1) * 20]:
                    out.append(((kind, ti), _job(kind, tensors[ti], nt)))
            return out

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = [r for f in [pool.submit(worker, t) for t in range(4)] for r in f.result()]
    assert len(results) == 80
    for key, got in results:
        assert _same(got, expected[key]), key


def test_concurrent_calls_with_busy_torch_threads():
    # torch's own intra-op pool busy in another thread: same results.
    tensors = _tensors()
    expected = [_job("error_table", w, 2) for w in tensors]
    stop = threading.Event()

    def torch_load():
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a.t() * 1e-3)

    loader = threading.Thread(target=torch_load)
    loader.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            got = list(pool.map(lambda w: _job("error_table", w, 2), tensors * 3))
    finally:
        stop.set()
        loader.join()
    for i, g in enumerate(got):
        assert _same(g, expected[i % len(tensors)])


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.skipif(not mixquant._core.has_openmp(), reason="core built without OpenMP")
def test_thread_use_is_bounded_by_callers_times_num_threads():
    # N Python threads each calling with num_threads=k: OpenMP keeps one team
    # per calling thread, so at most N * (k - 1) worker threads are added.
    n_callers, k = 3, 2
    w = torch.randn(64, 40_000)
    mixquant.roundoff_error(w, [4], num_threads=1)  # warm up torch/OpenMP state
    base = _thread_count()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _thread_count())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=n_callers) as pool:
            list(pool.map(lambda _: mixquant.roundoff_error(w, range(2, 9), per_channel=True, num_threads=k),
                          range(3 * n_callers)))
    finally:
        stop.set()
        sampler.join()
    # + the pool's callers + the sampler; pools of earlier tests may already exist (counted in base).
    bound = base + n_callers + 1 + n_callers * (k - 1)
    assert peak[0] <= bound, (base, peak[0], bound)


def test_concurrent_simd_switch_never_mixes_levels():
    # A level switch while calls run: every call still matches one level's (identical) result.
    w = torch.randn(32, 5000)
    expected = _job("fake_quantize", w, 2)
    stop = threading.Event()
    original = mixquant.simd_level()

    def switcher():
        i = 0
        while not stop.is_set():
            mixquant.set_simd_level(LEVELS[i % len(LEVELS)])
            i += 1

    t = threading.Thread(target=switcher)
    t.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            got = list(pool.map(lambda _: _job("fake_quantize", w, 2), range(30)))
    finally:
        stop.set()
        t.join()
        mixquant.set_simd_level(original)
    assert all(_same(g, expected) for g in got)


def test_overlapping_simd_blocks_in_two_threads_stay_apart():
    # Thread A enters "scalar", thread B enters another level, A leaves first, then B: each
    # thread sees only its own level, and the process default is untouched afterwards (the
    # overrides used to be process-global and left the process stuck on "scalar").
    if len(LEVELS) < 2:
        pytest.skip("needs two SIMD levels")
    default = mixquant.simd_level()
    other = LEVELS[-1] if LEVELS[-1] != "scalar" else LEVELS[-2]
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    # Error sums differ between levels in their last bits (summation order): they tell which ran.
    with mixquant.use_simd_level("scalar"):
        expected_a = _job("error_table", w, 1)
    with mixquant.use_simd_level(other):
        expected_b = _job("error_table", w, 1)
    assert not _same(expected_a, expected_b)

    def a():
        with mixquant.use_simd_level("scalar"):
            a_in.set()
            b_in.wait(5)
            seen["a"] = (mixquant.simd_level(), mixquant._core.simd_level(), _job("error_table", w, 1))
        a_out.set()
        seen["a_after"] = mixquant.simd_level()

    def b():
        a_in.wait(5)
        with mixquant.use_simd_level(other):
            b_in.set()
            a_out.wait(5)
            seen["b"] = (mixquant.simd_level(), mixquant._core.simd_level(), _job("error_table", w, 1))
        seen["b_after"] = mixquant.simd_level()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"][:2] == ("scalar", "scalar") and seen["b"][:2] == (other, other)
    assert _same(seen["a"][2], expected_a) and _same(seen["b"][2], expected_b)
    assert seen["a_after"] == seen["b_after"] == default == mixquant.simd_level()
    assert mixquant._core.default_simd_level() == default


def test_backend_override_is_local_to_its_thread():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def holder():
        with mixquant.use_backend("reference"):
            seen["holder"] = mixquant.get_backend()
            inside.set()
            done.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    seen["other"] = mixquant.get_backend()
    done.set()
    t.join()
    assert seen == {"holder": "reference", "other": "native"}
    assert mixquant.get_backend() == "native"


def test_use_simd_level_refuses_unknown_levels_before_the_block():
    for bad, exc in (("sse9", ValueError), ("", ValueError), (3, TypeError)):
        with pytest.raises(exc):
            with mixquant.use_simd_level(bad):
                raise AssertionError("the block must not run")
    assert mixquant._core.simd_level() == mixquant._core.default_simd_level()
