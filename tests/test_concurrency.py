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
