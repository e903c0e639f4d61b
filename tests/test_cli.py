"""The ``mixquant`` command line: search, model loading rules, help."""

import json

import pytest
import torch

from conftest import make_small_net
from mixquant.cli import main


def test_help_lists_every_search_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ["--bits", "--qem", "--avg-bits", "--max-bytes", "--per-channel", "--keep", "--out", "--trust-file"]:
        assert option in out


def test_search_from_factory_writes_config(tmp_path, capsys):
    out = tmp_path / "bits.json"
    rc = main(["search", "conftest:make_small_net", "--bits", "2-8", "--avg-bits", "3",
               "--keep", "conv1=8", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["avg_bits"] <= 3.0 and data["layers"][0]["bits"] == 8
    printed = capsys.readouterr().out
    assert "conv1" in printed and f"wrote {out}" in printed
    # a second run does not clobber the file without --overwrite
    assert main(["search", "conftest:make_small_net", "--qem", "4", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["search", "conftest:make_small_net", "--qem", "4", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_torchscript_file_loads_with_trust_file(tmp_path):
    # TorchScript runs code on load (tests/test_hardening.py), so it needs --trust-file like a pickle.
    path = tmp_path / "net.pt"
    torch.jit.script(make_small_net()).save(str(path))
    out = str(tmp_path / "b.json")
    assert main(["search", str(path), "--qem", "16", "--per-tensor", "--out", out]) == 2
    assert main(["search", str(path), "--qem", "16", "--per-tensor", "--out", out, "--trust-file"]) == 0


def test_pickled_module_needs_trust_flag(tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.save(make_small_net(), path)
    out = tmp_path / "b.json"
    assert main(["search", str(path), "--avg-bits", "4", "--out", str(out)]) == 2
    assert "--trust-file" in capsys.readouterr().err and not out.exists()
    assert main(["search", str(path), "--avg-bits", "4", "--out", str(out), "--trust-file"]) == 0


def test_state_dict_file_is_explained(tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(make_small_net().state_dict(), path)
    assert main(["search", str(path), "--avg-bits", "4", "--out", str(tmp_path / "b.json")]) == 2
    assert "state_dict" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code", [
    (["search", "conftest:make_small_net", "--out", "x.json"], 2),            # no rule
    (["search", "conftest:make_small_net", "--bits", "x-y", "--qem", "2", "--out", "x.json"], 2),
])
def test_bad_arguments_exit_2(argv, code):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code


def test_bad_values_exit_2_with_message(tmp_path, capsys):
    out = str(tmp_path / "b.json")
    assert main(["search", "conftest:make_small_net", "--avg-bits", "1", "--out", out]) == 2
    assert "below the smallest" in capsys.readouterr().err
    assert main(["search", "no_such_module:f", "--qem", "2", "--out", out]) == 2
    assert main(["search", "conftest:make_small_net", "--qem", "2", "--keep", "conv1", "--out", out]) == 2
