"""The search straight from a safetensors checkpoint equals the in-memory search."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from _quant_models import Conv1D
from safetensors.torch import save_file

import mixquant
from mixquant.api import checkpoint as ckpt
from mixquant.io import checkpoint as reader
from mixquant.cli import main

mixquant.register_quantizable(Conv1D, ch_axis=1)


class Net(nn.Module):
    """Layers in natural-sort order of their names, a 1-D norm weight, an embedding and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.embed = nn.Embedding(40, 24)
        self.layers = nn.ModuleList([nn.Linear(24, 24) for _ in range(11)])  # layers.2 before layers.10
        self.norm = nn.LayerNorm(24)
        self.up = Conv1D(48, 24)  # [in, out]: output channels on axis 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        raise NotImplementedError


def make_net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            layer.weight.mul_(1 + i)
            layer.weight[0, 0] = 30.0 * (i % 3)
    return net.to(dtype).eval()


def _save(net: nn.Module, path, shards: int = 1, index: bool = False) -> None:
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    names = sorted(state)
    if shards > 1:
        os.makedirs(path, exist_ok=True)
    if shards == 1:
        save_file(state, str(path))
        return
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    if index:
        with open(os.path.join(path, reader.INDEX_NAME), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)


@pytest.mark.parametrize("layout", ["file", "shards", "indexed"])
@pytest.mark.parametrize("kw", [
    dict(avg_bits=4.0),
    dict(bits_per_weight=4.5, group_size=[None, 8, 16]),
    dict(qem=16.0, group_size=8, symmetric=True),
    dict(avg_bits=3.5, per_channel=False, keep={"embed": 8}),
    dict(max_bytes=6000, clip="mse", group_size=16),
])
def test_checkpoint_search_equals_in_memory_search(tmp_path, monkeypatch, layout, kw):
    net = make_net()
    path = tmp_path / ("m.safetensors" if layout == "file" else "ckpt")
    _save(net, path, 1 if layout == "file" else 3, layout == "indexed")
    monkeypatch.setattr(ckpt, "ROWS_ELEMS", 100)  # several runs of rows per tensor
    memory = mixquant.search(net, embeddings=True, **kw)
    assert list(memory.bits)[2:5] == ["layers.0", "layers.1", "layers.2"]
    got = mixquant.search_checkpoint(path, transposed=["up"], **kw)
    assert got.to_dict() == memory.to_dict()


def test_bfloat16_checkpoint_equals_the_loaded_model(tmp_path, monkeypatch):
    net = make_net(torch.bfloat16)
    _save(net, tmp_path / "b.safetensors")
    monkeypatch.setattr(ckpt, "ROWS_ELEMS", 64)
    got = mixquant.search_checkpoint(tmp_path / "b.safetensors", avg_bits=4, transposed=["up"], group_size=16)
    assert got.to_dict() == mixquant.search(net, avg_bits=4, embeddings=True, group_size=16).to_dict()


def test_include_exclude_and_errors(tmp_path):
    net = make_net()
    path = tmp_path / "m.safetensors"
    _save(net, path)
    cfg = mixquant.search_checkpoint(path, avg_bits=4, include=["layers.*"], exclude=["layers.1?"])
    assert list(cfg.bits) == [f"layers.{i}" for i in range(10)]
    with pytest.raises(ValueError, match="no weight tensor"):
        mixquant.search_checkpoint(path, avg_bits=4, include=["nothing*"])
    with pytest.raises(TypeError, match="glob patterns"):
        mixquant.search_checkpoint(path, avg_bits=4, include="layers.*")
    with pytest.raises(ValueError, match="keep names layer 'norm'"):
        mixquant.search_checkpoint(path, avg_bits=4, keep={"norm": 8})
    save_file({"a.weight": torch.ones(4, 4, dtype=torch.int8)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(ValueError, match="'a.weight'.*I8.*already quantized"):
        mixquant.search_checkpoint(tmp_path / "q.safetensors", avg_bits=4)
    bad = tmp_path / "nan.safetensors"
    save_file({"a.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, str(bad))
    with pytest.raises(ValueError, match="layer 'a' contains 1 non-finite"):
        mixquant.search_checkpoint(bad, avg_bits=4)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mixquant.search_checkpoint(tmp_path / "junk.safetensors", avg_bits=4)
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        mixquant.search_checkpoint(tmp_path / "fifo.safetensors", avg_bits=4)


def test_sharded_folder_checks(tmp_path):
    net = make_net()
    folder = tmp_path / "ckpt"
    _save(net, folder, 2, index=True)
    index = folder / reader.INDEX_NAME
    data = json.loads(index.read_text())
    assert len(reader.list_tensors(folder)) == len(net.state_dict())
    for mutate, match in [
        (lambda d: d["weight_map"].update({"conv.weight": "../m.safetensors"}), "not a file name"),
        (lambda d: d["weight_map"].update({"ghost.weight": d["weight_map"]["conv.weight"]}), "does not hold it"),
        (lambda d: d["weight_map"].pop("conv.weight"), "not listed"),
        (lambda d: d.pop("weight_map"), "weight_map"),
    ]:
        bad = json.loads(json.dumps(data))
        mutate(bad)
        index.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            reader.list_tensors(folder)
    index.unlink()
    first = sorted(folder.iterdir())[0]
    save_file({"conv.weight": torch.zeros(6, 3, 3, 3)}, str(folder / "zz-extra.safetensors"))
    with pytest.raises(ValueError, match="'conv.weight' is in both"):
        reader.list_tensors(folder)
    assert first.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .safetensors"):
        reader.list_tensors(tmp_path / "empty")


def test_cli_search_checkpoint(tmp_path, capsys):
    net = make_net()
    path = tmp_path / "m.safetensors"
    _save(net, path)
    out = tmp_path / "bits.json"
    with pytest.raises(SystemExit):
        main(["search", str(path), "--avg-bits", "4", "--bits-per-weight", "5", "--out", str(out)])
    assert "not allowed with" in capsys.readouterr().err
    assert main(["search", str(path), "--avg-bits", "4", "--group-size", "none,8", "--out", str(out)]) == 2
    assert "bits_per_weight or max_bytes" in capsys.readouterr().err
    rc = main(["search", str(path), "--bits-per-weight", "5", "--group-size", "none,8", "--transposed", "up",
               "--exclude", "embed", "--out", str(out)])
    assert rc == 0
    cfg = mixquant.BitConfig.load(out)
    want = mixquant.search(net, bits_per_weight=5, group_size=[None, 8], filter_fn=lambda m, n: n != "embed",
                           embeddings=True)
    assert cfg.to_dict() == want.to_dict()
    assert main(["search", str(tmp_path / "missing.safetensors"), "--avg-bits", "4", "--out",
                 str(tmp_path / "x.json")]) == 2
