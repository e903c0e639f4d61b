"""``mixquant demo`` end to end (reduced), and the quantize → evaluate CLI round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch

import mixquant
from mixquant import zoo
from mixquant.cli import main

pytest.importorskip("matplotlib")


def _have_photos() -> bool:
    try:
        zoo.imagenet_photos()
        zoo.unlabelled_photos()
        zoo.mobilenet_v2()
    except zoo.MissingDataError:
        return False
    return True


@pytest.mark.skipif(not _have_photos(), reason="offline MobileNetV2 / photos not installed (scripts/install_data.sh)")
def test_demo_quick_writes_every_report_file(tmp_path, capsys):
    from mixquant.experiments.demo import REPORT_FILES
    from mixquant.experiments.plots import is_png

    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and str(out / "report.md") in printed
    # each model is announced before its work starts
    lines = printed.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("(") and "average" in line]
    assert len(starts) == 4 and all("done in" in lines[i + 1] for i in starts)
    assert "like the previous BRECQ run" in lines[starts[-1]]
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    for name in REPORT_FILES:
        if name.endswith(".png"):
            assert is_png(str(out / name)), name
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] and report["avg_bits"] == 4.0
    configs = {(r["method"], r["config"]) for r in report["runs"]}
    assert configs == {("asymmetric", "uniform 4"), ("asymmetric", "MixQuant"), ("brecq", "uniform 4"),
                       ("brecq", "MixQuant")}
    for r in report["runs"]:
        assert r["avg_bits"] == pytest.approx(4.0, abs=1e-9) or r["avg_bits"] < 4.0
        assert set(r["metrics"]) == {"top1", "top1_views", "agree", "kl"}
    cfg = mixquant.BitConfig.load(str(out / "bits.json"))
    assert cfg.avg_bits <= 4.0 + 1e-9
    # sizes: FP32 and how many times smaller each model is
    fp32 = report["fp32"]["size_bytes"]
    assert fp32 == 4 * sum(l["params"] for l in report["layers"])
    for r in report["runs"]:
        assert r["compression"] == pytest.approx(fp32 / r["size_bytes"], rel=1e-5) and r["compression"] > 4
    # the curve: uniform and MixQuant points, ordered by their own average bits
    selectors = {(p["selector"], p["level"]) for p in report["curve"]}
    assert {("uniform", 4.0), ("uniform", 8.0), ("MixQuant", 3.0), ("MixQuant", 6.0)} <= selectors
    point = {(p["selector"], p["level"]): p for p in report["curve"]}
    assert point[("uniform", 8.0)]["avg_bits"] == 8.0 and point[("MixQuant", 6.0)]["avg_bits"] <= 6.0 + 1e-9
    assert point[("uniform", 8.0)]["metrics"]["kl"] < point[("uniform", 4.0)]["metrics"]["kl"]
    table_uniform = next(r for r in report["runs"] if r["method"] == "asymmetric" and r["config"] == "uniform 4")
    assert point[("uniform", 4.0)]["size_bytes"] == table_uniform["size_bytes"]
    assert report["curve_images"] == 3  # one view of each of the 3 photos (quick)
    assert "of the images" in (out / "report.md").read_text()
    # per-layer bits and BRECQ's units are in report.md, with the machine
    md = (out / "report.md").read_text()
    assert report["layers"][0]["name"] in md and "MixQuant bits" in md
    assert "### BRECQ, uniform 4" in md and "### BRECQ, MixQuant" in md and "loss before" in md
    assert f"mixquant {mixquant.__version__}" in md and "torch thread" in md and "Load average" in md
    for name in report["bits"]:
        assert name in md
    printed_table = printed[printed.index("method"):].split("\n\n")[0]
    assert "x smaller" in printed_table and "FP32" in printed_table
    # no float32 noise in report.json: at most 6 significant digits
    text = (out / "report.json").read_text()
    import re
    for number in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text):
        digits = number.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
        assert len(digits) <= 6, number
    assert "report.json" in (out / "report.md").read_text() or "bits.json" in (out / "report.md").read_text()
    # an existing report is kept unless --overwrite
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_demo_rejects_bad_avg_bits(tmp_path):
    assert main(["demo", "--quick", "--avg-bits", "1", "--out", str(tmp_path / "r")]) == 2


def _tiny_data(tmp_path, labelled: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 16, 16, generator=g)
    path = tmp_path / ("data.pt" if labelled else "calib.pt")
    if labelled:
        torch.save({"x": x, "y": torch.randint(0, 10, (24,), generator=g)}, path)
    else:
        torch.save(x, path)
    return str(path)


def test_cli_quantize_evaluate_round_trip(tmp_path, capsys):
    from conftest import make_small_net

    cfg_path = str(tmp_path / "bits.json")
    mixquant.search(make_small_net(), avg_bits=4.0).save(cfg_path)
    calib = _tiny_data(tmp_path, labelled=False)
    data = _tiny_data(tmp_path, labelled=True)
    q1 = str(tmp_path / "asym.safetensors")
    assert main(["quantize", "conftest:make_small_net", "--config", cfg_path, "--method", "asymmetric",
                 "--out", q1]) == 0
    assert "wrote" in capsys.readouterr().out
    res = str(tmp_path / "eval.json")
    assert main(["evaluate", "conftest:make_small_net", q1, "--data", data, "--json", res]) == 0
    with open(res) as fh:
        got = json.load(fh)
    assert got["samples"] == 24 and {"float_top1", "quantized_top1", "agreement", "kl"} <= set(got)
    # the file reproduces the in-memory quantized model exactly
    qmodel = mixquant.quantize(make_small_net(), mixquant.BitConfig.load(cfg_path), "asymmetric", progress=False)
    x = torch.load(data, weights_only=True)["x"]
    with torch.no_grad():
        ref = qmodel(x).argmax(1)
        fp = make_small_net().eval()(x).argmax(1)
    assert got["agreement"] == pytest.approx((ref == fp).float().mean().item())
    assert got["avg_bits"] == pytest.approx(mixquant.BitConfig.load(cfg_path).avg_bits)

    # BRECQ with activations, from a calibration tensor file
    q2 = str(tmp_path / "brecq.safetensors")
    assert main(["quantize", "conftest:make_small_net", "--config", cfg_path, "--method", "brecq", "--calib", calib,
                 "--iters", "2", "--act-iters", "2", "--num-samples", "8", "--batch-size", "4", "--act-bits", "8",
                 "--out", q2]) == 0
    assert main(["evaluate", "conftest:make_small_net", q2, "--data", calib]) == 0
    assert "no labels" in capsys.readouterr().out

    # never clobber; bad combinations are errors
    assert main(["quantize", "conftest:make_small_net", "--config", cfg_path, "--out", q1]) == 2
    assert main(["evaluate", "conftest:make_small_net", q1, "--data", data, "--json", res]) == 2
    assert main(["quantize", "conftest:make_small_net", "--config", cfg_path, "--method", "brecq",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["quantize", "conftest:make_small_net", "--config", cfg_path, "--iters", "3",
                 "--out", str(tmp_path / "y.safetensors")]) == 2
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_cli_calibration_from_an_image_folder(tmp_path):
    from PIL import Image

    from mixquant.cli.common import load_inputs

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), color=(10 * i, 100, 200)).save(folder / f"{i}.png")
    x, y = load_inputs(str(folder), image_size=16)
    assert x.shape == (3, 3, 16, 16) and y is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_inputs(str(tmp_path / "empty"))
