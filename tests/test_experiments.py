"""The experiment runner (quick scale), its report, plots and CLI."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("matplotlib")

from mixquant import zoo  # noqa: E402
from mixquant.cli import main  # noqa: E402
from mixquant.experiments import RECORD_KEYS, run_experiments  # noqa: E402
from mixquant.experiments.plots import PNG_SIGNATURE, is_png  # noqa: E402
from mixquant.experiments.report import NOTES_END, NOTES_START, write_report  # noqa: E402


def _have_mnist() -> bool:
    try:
        zoo.mnist("test")
        zoo.mnist_cnn_ccexam()
    except zoo.MissingDataError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="offline MNIST data not installed (scripts/install_data.sh)")


@pytest.fixture(scope="module")
def quick_results():
    if not _have_mnist():
        pytest.skip("offline MNIST data not installed")
    return run_experiments(["mnist_ccexam"], ["asymmetric", "brecq"], seeds=1, scale="quick",
                           log=lambda _msg: None, threads=1)


@needs_mnist
def test_records_have_the_expected_keys(quick_results):
    recs = quick_results["records"]
    assert recs
    for r in recs:
        assert set(r) == set(RECORD_KEYS)
        assert set(r["metrics"]) >= {"top1", "agree", "kl"}
        assert 0.0 <= r["metrics"]["top1"] <= 1.0 and r["metrics"]["kl"] >= 0.0
    studies = {r["study"] for r in recs}
    assert {"asym", "asym_a8", "per_tensor", "free", "objective", "qem", "brecq", "brecq_act"} <= studies
    assert {r["method"] for r in recs} == {"asymmetric", "brecq"}
    meta = quick_results["meta"]
    assert meta["finished"] and meta["scale"] == "quick" and meta["machine"]["torch"]
    info = quick_results["models"]["mnist_ccexam"]
    assert info["pinned_layers"] == ["features.0", "classifier.2"]
    assert set(info["errors_per_channel"]) == {layer["name"] for layer in info["layers"]}


@needs_mnist
def test_mixquant_meets_the_average_of_the_uniform_config_it_is_compared_with(quick_results):
    recs = quick_results["records"]
    budget = [r for r in recs if r["selector"] == "mixquant" and r["rule"] == "budget"]
    assert budget
    for r in budget:
        same = [u for u in recs if u["selector"] == "uniform" and u["study"] in (r["study"], "asym", "free")
                and u["per_channel"] == r["per_channel"] and u["pinned"] == r["pinned"]]
        lo = math.floor(r["level"])
        by_bits = {u["uniform_bits"]: u["avg_bits"] for u in same}
        assert r["avg_bits"] <= r["target_avg_bits"] + 1e-9
        if r["level"] == lo:
            assert r["target_avg_bits"] == pytest.approx(by_bits[lo], abs=1e-12)
        else:
            assert by_bits[lo] < r["target_avg_bits"] < by_bits[lo + 1]
        if r["pinned"]:
            assert r["bits"]["features.0"] == 8 and r["bits"]["classifier.2"] == 8
    for u in (r for r in recs if r["selector"] == "uniform" and not r["pinned"]):
        assert u["avg_bits"] == pytest.approx(u["uniform_bits"])


@needs_mnist
def test_report_json_and_plots(quick_results, tmp_path):
    out = write_report(quick_results, str(tmp_path))
    with open(out["report"]) as fh:
        text = fh.read()
    for heading in ("## How this was run", "## Claim 1", "## Claim 2", "## The budget rule's objective",
                    "## mnist_ccexam: all numbers", NOTES_START, NOTES_END):
        assert heading in text
    with open(out["json"]) as fh:
        saved = json.load(fh)
    assert saved["records"] == json.loads(json.dumps(quick_results["records"]))
    plots = out["plots"]["mnist_ccexam"]
    assert set(plots) == {"pareto", "allocation", "heatmap"}
    import matplotlib.pyplot as plt

    for path in plots.values():
        assert os.path.basename(path) in text
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG_SIGNATURE
        assert is_png(path)
        img = plt.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert float(img[..., :3].std()) > 0.05  # not a blank canvas


@needs_mnist
def test_notes_survive_a_rewrite(quick_results, tmp_path):
    write_report(quick_results, str(tmp_path), plots=False)
    path = tmp_path / "RESULTS.md"
    text = path.read_text()
    start = text.index(NOTES_START) + len(NOTES_START)
    path.write_text(text[:start] + "\nHand-written finding.\n" + text[text.index(NOTES_END):])
    write_report(quick_results, str(tmp_path), plots=False)
    assert "Hand-written finding." in path.read_text()


@needs_mnist
def test_cli_report_only_and_no_clobber(quick_results, tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(quick_results))
    out = tmp_path / "rep"
    assert main(["experiment", "--report-only", str(src), "--out", str(out), "--no-plots"]) == 0
    assert (out / "RESULTS.md").is_file() and (out / "results.json").is_file()
    assert main(["experiment", "--report-only", str(src), "--out", str(out), "--no-plots"]) == 2
    assert main(["experiment", "--quick", "--models", "mnist_ccexam", "--out", str(out)]) == 2
    assert main(["experiment", "--report-only", str(src), "--out", str(out), "--no-plots", "--overwrite"]) == 0


def test_cli_rejects_unknown_models(tmp_path):
    assert main(["experiment", "--quick", "--models", "nope", "--out", str(tmp_path / "x"), "--no-plots"]) == 2


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    from mixquant.experiments import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install"):
        plots.require_matplotlib()


@needs_mnist
def test_merge_results_of_separate_runs(quick_results):
    import copy

    from mixquant.experiments.runner import merge_results

    other = copy.deepcopy(quick_results)
    other["models"] = {"resnet20": other["models"].pop("mnist_ccexam")}
    for r in other["records"]:
        r["model"] = "resnet20"
    other["meta"]["models"] = ["resnet20"]
    other["meta"]["seconds_per_model"] = {"resnet20": 1.0}
    merged = merge_results([quick_results, other])
    assert list(merged["models"]) == ["mnist_ccexam", "resnet20"]
    assert len(merged["records"]) == 2 * len(quick_results["records"])
    assert merged["meta"]["finished"] and len(merged["meta"]["parts"]) == 2
    with pytest.raises(ValueError, match="two of the merged"):
        merge_results([quick_results, quick_results])
