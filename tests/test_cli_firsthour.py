"""The command line as a new user meets it: instant help, models from the current folder, --weights,
repeatable --keep, first/last pinning, dry runs, presets, class folders, readable messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_small_net

import mixquant
from mixquant.cli import main
from mixquant.cli.common import load_inputs
from mixquant.cli.evaluate_cmd import format_kl


@pytest.mark.parametrize("command", ["", "search", "quantize", "evaluate", "demo", "experiment"])
def test_help_does_not_import_torch(command):
    code = textwrap.dedent(f"""
        import sys
        from mixquant.cli import main
        try:
            main({[c for c in (command, "--help") if c]!r})
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = [m for m in ("torch", "numpy", "mixquant.api", "mixquant.core.backend") if m in sys.modules]
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mixquant" in out.stdout
    if not command:  # every command is listed with its one-line help
        for name in ("search", "quantize", "evaluate", "demo", "experiment"):
            assert name in out.stdout


def test_import_mixquant_is_light_until_a_name_is_used():
    code = ("import sys, mixquant; assert 'torch' not in sys.modules; "
            "mixquant.search; assert 'torch' in sys.modules; "
            "assert set(mixquant.__all__) <= set(dir(mixquant)); "
            "[getattr(mixquant, n) for n in mixquant.__all__]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mixquant.nope  # noqa: B018


# -- MODEL from the current folder, and --weights ----------------------------------------


FACTORY = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder with the user's own module, as the current directory (not on sys.path)."""
    (tmp_path / "mymodels_fh.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("mymodels_fh", None)


def test_factory_module_is_found_in_the_current_folder(user_folder, capsys):
    assert main(["search", "mymodels_fh:make", "--avg-bits", "4", "--out", "bits.json"]) == 0
    assert (user_folder / "bits.json").is_file()
    assert str(user_folder) not in sys.path  # looked up there, not left on the path
    assert main(["search", "mymodels_fh:nothing", "--avg-bits", "4"]) == 2
    assert "cannot find factory" in capsys.readouterr().err


def test_weights_file_is_loaded_into_the_factory_model(user_folder, capsys):
    sys.path.insert(0, str(user_folder))
    try:
        import mymodels_fh
    finally:
        sys.path.remove(str(user_folder))
    trained = mymodels_fh.make()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(3.0).add_(0.5)
    torch.save(trained.state_dict(), "w.pt")
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, "ckpt.pt")
    from safetensors.torch import save_file

    save_file(trained.state_dict(), "w.safetensors")
    from mixquant.io.models import load_model

    for path in ("w.pt", "ckpt.pt", "w.safetensors"):
        model = load_model("mymodels_fh:make", weights=path)
        for (k, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
            assert torch.equal(a, b), (path, k)
    # a searched config differs from the untrained model's: the weights were used
    assert main(["search", "mymodels_fh:make", "--qem", "64", "--weights", "w.pt", "--out", "a.json"]) == 0
    cfg = mixquant.BitConfig.load("a.json")
    assert cfg.errors == mixquant.search(trained, qem=64.0).errors

    bad = trained.state_dict()
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, "extra.pt")
    short = {k: v for k, v in trained.state_dict().items() if k != "3.bias"}
    torch.save(short, "short.pt")
    shaped = dict(trained.state_dict())
    shaped["3.bias"] = torch.zeros(6)
    torch.save(shaped, "shaped.pt")
    torch.save(mymodels_fh.make(), "module.pt")  # a whole module is not a state_dict
    for path, words in (("extra.pt", "unexpected"), ("short.pt", "missing"), ("shaped.pt", "shape"),
                        ("module.pt", "state_dict"), ("nope.pt", "not a file")):
        assert main(["search", "mymodels_fh:make", "--qem", "4", "--weights", path]) == 2, path
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (path, err)


def test_state_dict_given_as_model_points_to_weights(tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(make_small_net().state_dict(), path)
    assert main(["search", str(path), "--avg-bits", "4"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_untrusted_file_message_is_clean(tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.save(make_small_net(), path)
    assert main(["search", str(path), "--avg-bits", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\x1b[" not in err
    assert "SmallNet" in err and err.endswith("can execute code from the file.")
    assert len(err.splitlines()) == 1


# -- search: --keep, --keep-first-last, dry run -------------------------------------------


def test_keep_is_repeatable_and_never_swallows_model(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep", "conv1=8", "--keep", "fc2=6",
                 "--out", str(out)]) == 0
    bits = mixquant.BitConfig.load(str(out)).bits
    assert bits["conv1"] == 8 and bits["fc2"] == 6
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep", "conv1=8,fc2=7",
                 "--out", str(out), "--overwrite"]) == 0
    assert mixquant.BitConfig.load(str(out)).bits["fc2"] == 7
    with pytest.raises(SystemExit) as exc:  # the old habit: a second NAME=BITS is not MODEL
        main(["search", "--avg-bits", "3", "--keep", "conv1=8", "fc2=8", "conftest:make_small_net"])
    assert exc.value.code == 2


def test_keep_first_last_pins_layers_in_execution_order(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep-first-last", "8",
                 "--input-shape", "3,16,16", "--out", str(out)]) == 0
    cfg = mixquant.BitConfig.load(str(out))
    assert cfg.bits["conv1"] == 8 and cfg.bits["fc2"] == 8 and cfg.avg_bits <= 3 + 1e-9
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep-first-last", "8"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--input-shape", "3,16,16"]) == 2
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep-first-last", "8",
                 "--input-shape", "5,16,16"]) == 2
    assert "does not run on an input" in capsys.readouterr().err
    assert main(["search", "conftest:make_small_net", "--avg-bits", "3", "--keep-first-last", "8",
                 "--input-shape", "3,16,16", "--keep", "conv1=6"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_search_without_out_is_a_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "conftest:make_small_net", "--avg-bits", "4"]) == 0
    printed = capsys.readouterr().out
    assert "conv1" in printed and "dry run" in printed
    assert os.listdir(tmp_path) == []
    (tmp_path / "b.json").write_text("{}")
    assert main(["search", "conftest:make_small_net", "--avg-bits", "4", "--out", "b.json"]) == 2
    assert (tmp_path / "b.json").read_text() == "{}"


# -- quantize: presets ------------------------------------------------------------------


def test_quantize_presets_and_overrides(tmp_path, monkeypatch):
    import mixquant.api.quantize as api

    seen = {}

    def fake_quantize(model, config, method, **kwargs):
        seen.clear()
        seen.update(kwargs, method=method)
        raise ValueError("stop here")

    monkeypatch.setattr(api, "quantize", fake_quantize)
    cfg = str(tmp_path / "b.json")
    mixquant.uniform(make_small_net(), 4).save(cfg)
    calib = str(tmp_path / "x.pt")
    torch.save(torch.randn(8, 3, 16, 16), calib)
    base = ["quantize", "conftest:make_small_net", "--config", cfg, "--calib", calib, "--out", str(tmp_path / "q")]
    assert main(base + ["--method", "brecq"]) == 2
    assert {k: seen[k] for k in mixquant.BRECQ_PRESETS["cpu"]} == mixquant.BRECQ_PRESETS["cpu"]
    assert seen["iters"] == 200 and seen["num_samples"] == 256 and seen["num_threads"] == 1
    assert main(base + ["--method", "brecq", "--threads", "2"]) == 2
    assert seen["num_threads"] == 2
    assert main(base + ["--method", "brecq", "--preset", "paper", "--iters", "7"]) == 2
    assert seen["iters"] == 7 and seen["num_samples"] == 1024 and seen["act_iters"] == 5000
    assert main(base + ["--method", "asymmetric", "--preset", "cpu"]) == 2
    assert "method" not in seen or seen.get("method") == "brecq"  # refused before quantize ran
    with pytest.raises(ValueError, match="unknown BRECQ preset"):
        mixquant.brecq_preset("gpu")


# -- data: class folders ----------------------------------------------------------------


def _image(path, shade):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 18), color=(shade, 40, 200)).save(path)


def test_class_subfolders_give_imagefolder_labels(tmp_path):
    root = tmp_path / "data"
    _image(root / "zebra" / "a.png", 10)
    _image(root / "ant" / "b.png", 20)
    _image(root / "ant" / "c.jpg", 30)
    _image(root / "moth" / "deep" / "d.png", 40)  # nested, as ImageFolder walks class folders
    _image(root / ".cache" / "e.png", 50)  # hidden: not a class
    x, y = load_inputs(str(root), image_size=16)
    assert x.shape == (4, 3, 16, 16)
    assert y.tolist() == [0, 0, 1, 2]  # ant, ant, moth, zebra: sorted class names
    # the images are read in that order too
    first = load_inputs(str(root / "ant"), image_size=16)[0]
    assert torch.equal(x[:2], first)


def test_class_folders_refuse_ambiguous_layouts(tmp_path):
    mixed = tmp_path / "mixed"
    _image(mixed / "ant" / "a.png", 1)
    _image(mixed / "loose.png", 2)
    with pytest.raises(ValueError, match="next to class subfolders"):
        load_inputs(str(mixed), image_size=16)
    gap = tmp_path / "gap"
    _image(gap / "ant" / "a.png", 1)
    (gap / "bee").mkdir()
    _image(gap / "cat" / "c.png", 3)
    with pytest.raises(ValueError, match="bee"):
        load_inputs(str(gap), image_size=16)


def test_evaluate_reads_labels_from_class_folders_and_prints_small_kl(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(4):
        _image(root / f"c{i % 2}" / f"{i}.png", 60 * i)
    cfg = str(tmp_path / "b.json")
    mixquant.search(make_small_net(), avg_bits=6.0).save(cfg)
    q = str(tmp_path / "q.safetensors")
    assert main(["quantize", "conftest:make_small_net", "--config", cfg, "--out", q]) == 0
    res = str(tmp_path / "e.json")
    assert main(["evaluate", "conftest:make_small_net", q, "--data", str(root), "--image-size", "16",
                 "--json", res]) == 0
    printed = capsys.readouterr().out
    with open(res) as fh:
        got = json.load(fh)
    assert "float_top1" in got and "top-1 accuracy" in printed
    kl_line = next(line for line in printed.splitlines() if "KL" in line)
    assert format_kl(got["kl"]) in kl_line and got["kl"] > 0 and "0.00000 " not in kl_line


def test_format_kl_keeps_small_values_readable():
    assert format_kl(0.0) == "0"
    assert format_kl(1.23456e-5) == "1.235e-05"
    assert format_kl(0.5) == "0.5"
    assert format_kl(3.14159) == "3.142"
