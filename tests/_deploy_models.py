"""Models and inputs for the deployment tests (packed runtime, ONNX): the zoo's CNNs on real data, a small transformer.

Each zoo case returns ``(model, x, calib)``: the pretrained float model, real test
inputs (the 20 labelled ImageNet photos, or 64 MNIST / Fashion-MNIST test images)
and calibration inputs drawn from elsewhere. A case skips when its data package
is missing (``bash scripts/install_data.sh``).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn

import mixquant

zoo = pytest.importorskip("mixquant.zoo")


def _need(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except zoo.MissingDataError as exc:
        pytest.skip(f"data not installed: {exc}")


def _mobilenet_v2():
    model = _need(zoo.mobilenet_v2, pretrained=True)
    photos = _need(zoo.imagenet_photos)
    x = torch.stack([zoo.imagenet_preprocess(img) for img, _, _ in photos])
    calib = torch.stack([zoo.imagenet_preprocess(img) for img, _ in _need(zoo.unlabelled_photos)])
    return model, x, calib


def _mnist(factory):
    def case():
        model = _need(factory, pretrained=True)
        xs, _ = _need(zoo.mnist, "test")
        xs = zoo.mnist_normalize(xs[:128])
        return model, xs[:64], xs[64:]
    return case


def _resnet20():
    model = _need(zoo.resnet20, pretrained=True)
    xs, _ = _need(zoo.fashion_mnist, "test")
    xs = zoo.fashion_mnist_normalize(xs[:128])
    return model, xs[:64], xs[64:]


ZOO: Dict[str, Callable[[], Tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet20": _resnet20,
    "mnist_cnn_digit": _mnist(zoo.mnist_cnn_digit),
    "mnist_cnn_ccexam": _mnist(zoo.mnist_cnn_ccexam),
}


def mixed_config(model: nn.Module, **kw) -> mixquant.BitConfig:
    """Every bit-width from 2 to 8 in turn over the layers (the first and last at 8)."""
    embeddings = kw.pop("embeddings", True)  # an Embedding is selected only when asked
    names = list(mixquant.find_layers(model, embeddings=embeddings))
    keep = {n: (2, 3, 4, 5, 6, 7, 8)[i % 7] for i, n in enumerate(names)}
    keep[names[0]] = keep[names[-1]] = 8
    return mixquant.uniform(model, 4, keep=keep, errors=False, embeddings=embeddings, **kw)


class TinyTransformer(nn.Module):
    """A two-block pre-norm transformer encoder of Linear layers, with a token embedding and a classifier."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                "norm2": nn.LayerNorm(dim), "up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim),
            }))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        b, t, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + blk["proj"]((att @ v).transpose(1, 2).reshape(b, t, d))
            x = x + blk["down"](torch.nn.functional.gelu(blk["up"](blk["norm2"](x))))
        return self.head(self.norm(x).mean(1))


def tiny_transformer(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().eval()


def tokens(n: int, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (n, t), generator=torch.Generator().manual_seed(seed))
