"""Jobs of several ranks on this host (gloo over loopback): the split checkpoint search, and failures.

Each multi-rank test starts real processes (tests/_dist.py bounds every one in
time); the in-process tests check the pieces (environment, split, exchange).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pytest
import torch
from _dist import WORKER, run_ranks, torchrun
from safetensors.torch import save_file

import mixquant
from mixquant.cli import main as cli_main
from mixquant.allocation.tables import pack_totals, totals_size, unpack_totals
from mixquant.api.checkpoint import checkpoint_layers
from mixquant.io.checkpoint import list_tensors
from mixquant.parallel import RankFailure, comm, launch, shards
from mixquant.parallel.workers import SINGLE

OPTION_SETS = [
    {"avg_bits": 3.5},
    {"bits_per_weight": 4.4, "group_size": [None, 16, 32]},
    {"qem": 16.0, "keep": {"layers.1": 8}},
    {"avg_bits": 4.0, "per_channel": False, "clip": "mse"},
]


def _checkpoint(folder, layers: int = 7) -> str:
    """A folder of two shards: Linear weights of different sizes and ranges (one bfloat16), a bias, a norm."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        w = torch.randn(8 * (i % 3 + 1), 24 + 8 * i, generator=g) * (1 + i)
        w[0, 0] = 20.0 * (i % 2)
        state[f"layers.{i}.weight"] = w.to(torch.bfloat16) if i == 2 else w
        state[f"layers.{i}.bias"] = torch.randn(w.shape[0], generator=g)
    state["norm.weight"] = torch.ones(24)
    os.makedirs(folder, exist_ok=True)
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, os.path.join(folder, "a.safetensors"))
    save_file({k: state[k] for k in names[1::2]}, os.path.join(folder, "b.safetensors"))
    return str(folder)


def _fingerprint(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        st = os.stat(path)
        with open(path, "rb") as fh:
            out[f] = (hashlib.sha256(fh.read()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


def _read(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _owners(path: str, world: int) -> dict:
    infos = checkpoint_layers(list_tensors(path))
    names = list(infos)
    return dict(zip(names, shards.assign_by_cost([infos[n].numel for n in names], world)))


def _search_job(tmp_path, path, world=2, fail="none", at="", timeout_s=30, options=None, **kw):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    argv = [WORKER, "search", path, str(out), "--options", json.dumps(options or OPTION_SETS[:1]), "--fail", fail,
            "--at", at]
    return run_ranks(argv, world, timeout_s=timeout_s, **kw), out


# ---- the split search equals the single-process one ----


def test_split_search_equals_single_process(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    before = _fingerprint(path)
    results, out = _search_job(tmp_path, path, options=OPTION_SETS)  # one job, every option set
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    found = [_read(out / f"rank{r}.json")["runs"] for r in range(2)]
    owners = _owners(path, 2)
    for i, options in enumerate(OPTION_SETS):
        want = mixquant.search_checkpoint(path, **options).to_dict()
        for r in range(2):
            assert found[r][i]["config"] == want, options  # every figure exactly, on every rank
            # the work was split: each layer measured once, both ranks busy, as the split says
            assert sorted(found[r][i]["measured"]) == sorted(n for n, o in owners.items() if o == r)
            assert found[r][i]["measured"]
    assert _fingerprint(path) == before  # inputs never touched


def test_a_rank_with_no_layer_takes_part(tmp_path):
    path = _checkpoint(tmp_path / "ckpt", layers=2)
    results, out = _search_job(tmp_path, path, world=3)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-2000:] for r in results]
    found = [_read(out / f"rank{r}.json")["runs"][0] for r in range(3)]
    assert sorted(len(f["measured"]) for f in found) == [0, 1, 1]
    want = mixquant.search_checkpoint(path, **OPTION_SETS[0]).to_dict()
    assert all(f["config"] == want for f in found)


# ---- failures: a clear error on the other ranks, within a bound ----


def _rank1_layer(path: str) -> str:
    return next(n for n, o in _owners(path, 2).items() if o == 1)


def test_a_rank_that_dies_is_an_error_on_the_others_at_once(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    # a long timeout: the death must be noticed from the closed connection, not by waiting
    results, out = _search_job(tmp_path, path, fail="die", at=_rank1_layer(path), timeout_s=120, deadline=100)
    assert results[1].returncode == 17
    r0 = results[0]
    assert r0.returncode == 2 and "worker error: RankFailure: rank 0 of 2:" in r0.stderr, r0.stderr[-2000:]
    assert "another rank died, was killed or did not answer" in r0.stderr
    assert r0.seconds < 60  # far below the 120 s timeout
    assert not os.listdir(out)


def test_a_rank_that_hangs_is_an_error_on_the_others_after_the_timeout(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    results, out = _search_job(tmp_path, path, fail="hang", at=_rank1_layer(path), timeout_s=3, wait_for=[0],
                               deadline=90)
    r0 = results[0]
    assert results[1].returncode is None  # stopped, then killed by the harness
    assert r0.returncode == 2 and "RankFailure" in r0.stderr and "within 3 s" in r0.stderr, r0.stderr[-2000:]
    assert not os.listdir(out)


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    at = _rank1_layer(path)
    results, out = _search_job(tmp_path, path, fail="raise", at=at)
    assert [r.returncode for r in results] == [2, 2]
    assert f"worker error: ValueError: planted failure at layer {at!r}" in results[1].stderr
    assert (f"worker error: ValueError: rank 1 of 2 (the checkpoint search): planted failure at layer {at!r}"
            in results[0].stderr), results[0].stderr[-2000:]
    assert not os.listdir(out)


# ---- BRECQ with the calibration samples split between the ranks ----

# 25 samples: blocks of 12 and 13; batches of 4, so some iterations find no member on one rank.
BRECQ_OPTIONS = {"iters": 40, "batch_size": 4, "num_samples": 25, "act_bits": 4, "act_iters": 20,
                 "loss": "fisher", "rounding_weight": 0.1}
# Float32 summation order differs between 1 and 2 ranks (see mixquant.methods.data_parallel).
# Measured on the test net: hard roundings and weights identical, the weights phase's losses within
# 1e-8 relative, the activation step sizes kept within 4e-7; the loss of learned step sizes within
# 5e-2 (fc's, which never_worse then discards): Adam's steps (lr 4e-4) are large next to an 8-bit
# step size (0.0045), so near the optimum, where rounding decides the gradient's sign, the two runs
# take different steps.
REL_WEIGHTS, REL_SCALES, REL_LEARNED = 1e-5, 1e-3, 0.1


def _brecq_job(tmp_path, world, name, options=BRECQ_OPTIONS, fail="none", at=0, nudge_on=None, **kw):
    out = tmp_path / name
    out.mkdir()
    argv = [WORKER, "brecq", str(out), "--options", json.dumps(options), "--fail", fail, "--at", str(at)]
    argv += [] if nudge_on is None else ["--nudge-on", str(nudge_on)]
    return run_ranks(argv, world, **kw), out


def _brecq_runs(tmp_path, name, world, **kw):
    results, out = _brecq_job(tmp_path, world, name, **kw)
    assert [r.returncode for r in results] == [0] * world, [r.stderr[-2000:] for r in results]
    return [_read(out / f"rank{r}.json") for r in range(world)]


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_split_brecq_equals_single_process(tmp_path):
    (one,) = _brecq_runs(tmp_path, "one", 1)
    two = _brecq_runs(tmp_path, "two", 2)
    # every rank ends with the same model and report (each with its own cache)
    assert two[0]["weights"] == two[1]["weights"] and two[0]["act_scales"] == two[1]["act_scales"]
    mine = [[{**r, "cache_bytes": None} for r in two[k]["records"]] for k in (0, 1)]
    assert mine[0] == mine[1]
    assert [r["cache_bytes"] * 12 for r in one["records"]] == [r["cache_bytes"] * 25 for r in two[0]["records"]]
    got = two[0]
    # hard roundings (and scales): every quantized weight bit-identical
    assert got["weights"] == one["weights"]
    assert [(r["unit"], r["phase"], r["kept"]) for r in got["records"]] == \
        [(r["unit"], r["phase"], r["kept"]) for r in one["records"]]
    assert {r["kept"] for r in one["records"]} >= {"adaround", "learned"}  # both phases learn something
    for a, b in zip(one["records"], got["records"]):
        for key in ("loss_before", "loss_soft", "loss_rounded", "loss_after", "hard_fraction"):
            if a[key] is not None:
                learned = a["phase"] == "activations" and (key == "loss_rounded" or a["kept"] == "learned")
                rel = REL_LEARNED if learned and key != "loss_before" else REL_WEIGHTS
                assert _close(a[key], b[key], rel), (a["unit"], a["phase"], key, a[key], b[key])
        assert a["iters"] == b["iters"]
    assert one["act_scales"].keys() == got["act_scales"].keys()
    for k, v in one["act_scales"].items():
        assert _close(v, got["act_scales"][k], REL_SCALES), (k, v, got["act_scales"][k])


def test_ranks_whose_updates_differ_end_with_rank_0s_model(tmp_path):
    # rank 1 takes twice the steps; each unit starts from rank 0's weights and step sizes everywhere
    two = _brecq_runs(tmp_path, "nudged", 2, nudge_on=1)
    assert two[0]["weights"] == two[1]["weights"] and two[0]["act_scales"] == two[1]["act_scales"]


def test_a_rank_that_dies_during_reconstruction_is_an_error_on_the_other(tmp_path):
    results, out = _brecq_job(tmp_path, 2, "died", fail="die", at=30, timeout_s=120, deadline=100)
    assert results[1].returncode == 17
    r0 = results[0]
    assert r0.returncode == 2 and "worker error: RankFailure: rank 0 of 2: AdaRound iteration" in r0.stderr, \
        r0.stderr[-2000:]
    assert "another rank died, was killed or did not answer" in r0.stderr
    assert r0.seconds < 60  # noticed from the closed connection, far below the 120 s timeout
    assert not os.listdir(out)


def test_too_few_samples_for_the_ranks_is_an_error(tmp_path):
    results, _ = _brecq_job(tmp_path, 2, "few", options={**BRECQ_OPTIONS, "num_samples": 1})
    assert [r.returncode for r in results] == [2, 2]
    assert all("1 calibration samples cannot be shared by 2 ranks" in r.stderr for r in results)


# ---- the command line under torchrun ----


def test_search_command_under_torchrun_equals_single_process(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    before = _fingerprint(path)
    assert cli_main(["search", path, "--avg-bits", "3.5", "--out", str(tmp_path / "one.json")]) == 0
    res = torchrun(["-m", "mixquant", "search", path, "--avg-bits", "3.5", "--out", str(tmp_path / "two.json")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1  # rank 0 prints
    assert mixquant.BitConfig.load(tmp_path / "two.json").to_dict() == \
        mixquant.BitConfig.load(tmp_path / "one.json").to_dict()
    assert _fingerprint(path) == before


def test_only_rank_0_checks_and_writes_the_output(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    homes = [tmp_path / "host0", tmp_path / "host1"]  # two "hosts": only the first has the output folder
    for h in homes:
        h.mkdir()
    (homes[0] / "out").mkdir()
    argv = ["-m", "mixquant", "search", path, "--avg-bits", "3.5", "--out", "out/bits.json"]
    results = run_ranks(argv, 2, cwd=lambda r: str(homes[r]))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert (homes[0] / "out" / "bits.json").is_file() and not (homes[1] / "out").exists()
    assert "wrote out/bits.json" in results[0].stdout and results[1].stdout == ""
    # rank 0's output exists: every rank stops before the work, with rank 0's reason
    results = run_ranks(argv, 2, cwd=lambda r: str(homes[r]))
    assert [r.returncode for r in results] == [2, 2]
    assert "mixquant search (rank 0 of 2): error:" in results[0].stderr and "exists" in results[0].stderr
    assert "mixquant search (rank 1 of 2): error: rank 0 of 2 (checking --out):" in results[1].stderr


def test_brecq_quantize_command_under_torchrun_equals_single_process(tmp_path):
    from _quant_models import images, tiny_resnet
    from safetensors.torch import load_file

    config, calib = tmp_path / "bits.json", tmp_path / "calib.pt"
    mixquant.uniform(tiny_resnet(), 3).save(config)
    torch.save(images(20, size=8, seed=1), calib)
    before = _fingerprint(str(tmp_path))
    args = ["-m", "mixquant", "quantize", "_quant_models:tiny_resnet", "--config", str(config), "--method", "brecq",
            "--calib", str(calib), "--iters", "20", "--num-samples", "20", "--batch-size", "4"]
    (one,) = run_ranks([*args, "--out", str(tmp_path / "one.safetensors")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    res = torchrun([*args, "--out", str(tmp_path / "two.safetensors")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1  # rank 0 prints and writes
    assert "2 ranks: losses over every rank's samples; caches and times of this rank, which held 10 of them" \
        in res.stderr  # the samples were split
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # codes, scales, biases: exactly
    after = _fingerprint(str(tmp_path))
    assert {k: after[k] for k in before} == before  # inputs never touched


# ---- the pieces, in process ----


def test_environment_is_checked():
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    w = launch.workers_from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.backend, w.timeout_s) == (0, 2, 0, "gloo", 600.0)
    assert launch.workers_from_env({}) == SINGLE and not SINGLE.distributed and SINGLE.is_main
    assert launch.workers_from_env({"WORLD_SIZE": "1", "MIXQUANT_DIST_TIMEOUT": "5"}).timeout_s == 5.0
    assert launch.workers_from_env({**env, "MIXQUANT_DIST_TIMEOUT": "7.5", "LOCAL_RANK": "1"}).local_rank == 1
    bad = [({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
           ({**env, "RANK": "2"}, "RANK"), ({**env, "RANK": "-1"}, "RANK"), ({"WORLD_SIZE": "2"}, "RANK"),
           ({**env, "MASTER_ADDR": ""}, "MASTER_ADDR"), ({**env, "MASTER_PORT": "70000"}, "MASTER_PORT"),
           ({**env, "MASTER_PORT": "x"}, "MASTER_PORT"), ({**env, "LOCAL_RANK": "-3"}, "LOCAL_RANK"),
           ({**env, "MIXQUANT_DIST_TIMEOUT": "0"}, "MIXQUANT_DIST_TIMEOUT"),
           ({**env, "MIXQUANT_DIST_TIMEOUT": "inf"}, "MIXQUANT_DIST_TIMEOUT"),
           ({**env, "MIXQUANT_DIST_TIMEOUT": "soon"}, "MIXQUANT_DIST_TIMEOUT"),
           ({**env, "MIXQUANT_DIST_BACKEND": "mpi"}, "MIXQUANT_DIST_BACKEND")]
    for e, name in bad:
        with pytest.raises(ValueError, match=name):
            launch.workers_from_env(e)
    with pytest.raises(ValueError, match="timeout"):
        launch.workers_from_env(env, timeout=-1)


def test_a_group_that_cannot_be_joined_is_a_rank_failure(monkeypatch):
    port = __import__("_dist").free_port()  # nobody listens there
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RankFailure, match=r"rank 1 of 2: could not join the process group at 127.0.0.1:\d+ within 1 s"):
        launch.init(timeout=1)
    assert not torch.distributed.is_initialized()


def test_single_process_collectives_do_nothing():
    t = torch.arange(3.0)
    assert comm.all_reduce_(SINGLE, t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert comm.all_gather_bytes(SINGLE, b"abc") == [b"abc"]
    comm.settle(SINGLE, None, "x")
    err = ValueError("mine")
    with pytest.raises(ValueError) as info:
        comm.settle(SINGLE, err, "x")
    assert info.value is err


def test_error_reports_decode_safely():
    assert comm._decode(comm._encode(FileNotFoundError("gone"))) == ("FileNotFoundError", "gone")
    assert comm._decode(b"\xff not json") == ("RuntimeError", "(an unreadable error report)")
    assert comm._decode(b'{"type": 3}') == ("RuntimeError", "(an unreadable error report)")
    assert len(comm._encode(ValueError("x" * 10**5))) < 2 * comm.MAX_MESSAGE


def _best_split(costs, parts):
    return min(max(sum(c for c, o in zip(costs, own) if o == p) for p in range(parts))
               for own in itertools.product(range(parts), repeat=len(costs)))


def test_assign_by_cost_balances_and_is_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, parts = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        costs = [int(c) for c in rng.integers(1, 100, n)]
        owner = shards.assign_by_cost(costs, parts)
        assert owner == shards.assign_by_cost(costs, parts) and all(0 <= o < parts for o in owner)
        loads = [sum(c for c, o in zip(costs, owner) if o == p) for p in range(parts)]
        assert max(loads) <= _best_split(costs, parts) * 4 / 3 + 1e-9  # the LPT bound
    # largest first, ties to the lower rank
    assert shards.assign_by_cost([5, 9, 5, 1], 2) == [1, 0, 1, 0]
    with pytest.raises(ValueError):
        shards.assign_by_cost([1], 0)


def test_blocks_cover_the_samples_once():
    for n, world in [(10, 3), (2, 3), (1024, 64), (7, 1)]:
        spans = [shards.block(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
    idx = torch.tensor([7, 2, 5, 9, 4])
    assert shards.local_positions(idx, 4, 8).tolist() == [3, 1, 0]
    with pytest.raises(ValueError):
        shards.block(4, 2, 2)


def test_table_totals_travel_exactly():
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(3)) * 3
    for spec in (mixquant.core.spec.QuantizerSpec(), mixquant.core.spec.QuantizerSpec(group_size=16),
                 mixquant.core.spec.QuantizerSpec(per_channel=False, clip="mse")):
        t = mixquant.core.error.spec_roundoff_error(w, [2, 3, 8], spec).totals()
        vec = np.zeros(totals_size(3))
        pack_totals(t, vec)
        back = unpack_totals(vec, [2, 3, 8], w.numel(), spec)
        for f in ("bits", "sse", "mse", "norm", "max_abs", "scale", "zero_point", "channel_sse", "channel_max_abs"):
            a, b = getattr(t, f), getattr(back, f)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f
        for f in ("numel", "energy", "per_channel", "symmetric", "clip", "group_size"):
            assert getattr(t, f) == getattr(back, f), f
    with pytest.raises(ValueError):
        pack_totals(t, np.zeros(totals_size(2)))
