"""Embeddings and tied weights: a weight shared by several modules is one layer everywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from _quant_models import Conv1D, tiny_lm
from safetensors import safe_open

import mixquant

mixquant.register_quantizable(Conv1D, ch_axis=1)
IDS = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))


class TwoTied(nn.Module):
    """Two Linear layers sharing one weight (and a third with its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.a(x))))


def test_embeddings_are_selected_on_request():
    model = tiny_lm(tied=False)
    assert list(mixquant.find_layers(model)) == ["up", "proj", "head"]
    assert list(mixquant.find_layers(model, embeddings=True)) == ["embed", "up", "proj", "head"]
    assert mixquant.channel_axis(model.embed) == 0 and mixquant.channel_axis(model.up) == 1


def test_tied_head_is_one_layer_in_search_and_budget():
    model = tiny_lm(tied=True)
    assert list(mixquant.find_layers(model, embeddings=True)) == ["embed", "up", "proj"]
    cfg = mixquant.search(model, avg_bits=4, embeddings=True)
    assert list(cfg.bits) == ["embed", "up", "proj"] and cfg.tied == {"embed": ["head"]}
    unique = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert cfg.total_params == unique  # the shared weight counted once
    assert mixquant.BitConfig.from_dict(cfg.to_dict()).tied == {"embed": ["head"]}
    assert "embed (= head)" in cfg.table()


def test_tied_weight_left_float_unless_every_user_is_selected():
    """Quantizing a shared weight changes every module using it: without embeddings=True the tied
    head is not selected either (the embedding must not change behind the user's back)."""
    model = tiny_lm(tied=True)
    cfg = mixquant.search(model, avg_bits=4)
    assert list(cfg.bits) == ["up", "proj"]
    q = mixquant.quantize(model, cfg, progress=False)
    assert torch.equal(q.embed.weight, model.embed.weight) and q.head.weight is q.embed.weight
    dropped = mixquant.find_layers(model, lambda m, n: n != "head", embeddings=True)
    assert list(dropped) == ["up", "proj"]


def test_quantize_export_load_tied(tmp_path):
    model = tiny_lm(tied=True)
    cfg = mixquant.uniform(model, 3, embeddings=True, keep={"up": 5}, errors=False)
    q = mixquant.quantize(model, cfg, progress=False)
    assert q.head.weight is q.embed.weight and not torch.equal(q.embed.weight, model.embed.weight)
    info = mixquant.quant_info(q)
    assert info.bits == {"embed": 3, "up": 5, "proj": 3} and info.size_bytes == cfg.size_bytes
    assert info.float_bytes == sum(t.numel() * 4 for k, t in model.state_dict().items() if k.endswith("bias"))
    path = tmp_path / "tied.safetensors"
    mixquant.export(q, path)
    with safe_open(str(path), "pt") as fh:
        assert "head.weight" not in fh.keys() and "embed.weight.packed" in fh.keys()
    loaded = mixquant.load_quantized(path, tiny_lm(seed=5, tied=True))
    assert loaded.head.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS), q(IDS))
    with pytest.raises(ValueError, match="records layer 'embed' as sharing its weight with 'head'"):
        mixquant.load_quantized(path, tiny_lm(tied=False))
    untied = tiny_lm(tied=False)  # its head has a weight of its own: loading it into a tied model would
    mixquant.export(mixquant.quantize(untied, mixquant.uniform(untied, 4, errors=False), progress=False),
                    tmp_path / "untied.safetensors")  # change the embedding as well
    with pytest.raises(ValueError, match=r"'head' shares its weight with \['embed'\] in this model"):
        mixquant.load_quantized(tmp_path / "untied.safetensors", tiny_lm(tied=True))


def test_two_linears_sharing_a_weight():
    torch.manual_seed(0)
    model = TwoTied().eval()
    cfg = mixquant.search(model, avg_bits=4)
    assert list(cfg.bits) == ["a", "c"] and cfg.tied == {"a": ["b"]}
    q = mixquant.quantize(model, cfg, progress=False)
    assert mixquant.quant_info(q).bits == {"a": cfg.bits["a"], "c": cfg.bits["c"]}
    assert q.b.weight is q.a.weight
    fq = mixquant.fake_quantize_tensor(model.a.weight, q.a.weight_scale, q.a.weight_zero_point, cfg.bits["a"])
    assert torch.equal(q.b.weight, fq)  # on the grid quant_info reports


def test_config_giving_a_shared_weight_two_bit_widths_is_an_error():
    torch.manual_seed(0)
    model = TwoTied().eval()
    good = mixquant.uniform(model, 4, errors=False)
    bad = dataclasses.replace(good, bits={**good.bits, "b": 8}, shapes={**good.shapes, "b": (16, 16)},
                              groups={**good.groups, "b": 16}, tied={})
    with pytest.raises(ValueError, match=r"'a' at 4 bits, 'b' at 8 bits share one weight"):
        mixquant.quantize(model, bad, progress=False)
    untied = nn.Sequential()
    untied.a, untied.b, untied.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
    with pytest.raises(ValueError, match="'a' as sharing its weight with 'b'"):
        good.check_model(untied)
    data = good.to_dict()
    data["layers"][0]["tied"] = ["a"]
    with pytest.raises(ValueError, match="tied to itself"):
        mixquant.BitConfig.from_dict(data)
    data["layers"][0]["tied"] = ["c"]
    with pytest.raises(ValueError, match="listed again"):
        mixquant.BitConfig.from_dict(data)


def test_tampered_export_cannot_overwrite_a_quantized_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_lm(tied=True)
    q = mixquant.quantize(model, mixquant.uniform(model, 3, embeddings=True, errors=False), progress=False)
    path = tmp_path / "q.safetensors"
    mixquant.export(q, path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors["head.weight"] = torch.zeros(50, 40)
    evil = tmp_path / "evil.safetensors"
    save_file(tensors, str(evil), metadata=meta)
    with pytest.raises(ValueError, match="'head.weight' belongs to a quantized layer"):
        mixquant.load_quantized(evil, tiny_lm(tied=True))
