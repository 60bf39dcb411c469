"""Model and dataset registries: every entry builds and produces what a user expects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecv.data import DATASETS, build_data
from edgecv.data.datasets import FASHION_MNIST_DEBIAN, find_fashion_mnist
from edgecv.errors import EdgecvError
from edgecv.models import EDGECV_MODELS, build_model, list_models
from edgecv.recipe import DataConfig
from edgecv.registry import Registry


def test_registry_refuses_duplicates_and_suggests():
    reg = Registry("thing")
    reg.register("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(EdgecvError, match="did you mean 'alpha'"):
        reg.get("alpah")
    assert reg.names() == ["alpha"] and "alpha" in reg and len(reg) == 1


@pytest.mark.parametrize("name", EDGECV_MODELS.names())
@pytest.mark.parametrize("channels, classes", [(1, 10), (3, 7)])
def test_edgecv_models_build_for_any_channels_and_classes(name, channels, classes):
    model = build_model(f"edgecv:{name}", classes, channels, 28).eval()
    assert model(torch.randn(2, channels, 28, 28)).shape == (2, classes)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"])
def test_torchvision_models_adapt_to_small_grey_images(name):
    model = build_model(f"torchvision:{name}", 10, 1, 32).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert f"torchvision:{name}" in list_models("torchvision")


def test_torchvision_stem_is_kept_for_large_images():
    model = build_model("torchvision:resnet18", 5, 3, 224)
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, torch.nn.MaxPool2d)
    small = build_model("torchvision:resnet18", 5, 3, 32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)


def test_factory_models(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:tiny", 4, 1, 32)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(EdgecvError, match="has no callable 'nope'"):
        build_model("mynets:nope", 4)


@pytest.mark.parametrize(
    "name, message",
    [("resnet8", "must be 'torchvision:<builder>'"), ("edgecv:resnet9", "did you mean 'resnet8'"),
     ("torchvision:resnet19", "did you mean 'torchvision:resnet18'"), ("no_such_pkg:f", "cannot import")],
)
def test_bad_model_names(name, message):
    with pytest.raises(EdgecvError, match=message):
        build_model(name, 10)


def make_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=6, size=40) -> Path:
    """A real ImageNet-layout folder of JPEG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(per_class):
                base = np.full((size, size + 8, 3), 60 * i, dtype=np.uint8)
                noise = rng.integers(0, 60, size=base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{cls}_{j}.JPEG", quality=90)
    return root


def test_imagefolder_reads_real_jpegs(tmp_path):
    root = make_image_folder(tmp_path / "imagenet")
    cfg = DataConfig(dataset="imagefolder", image_size=32, batch_size=4, eval_batch_size=5)
    data = build_data(cfg, str(root))
    assert data.num_classes == 3 and data.class_names == ["cat", "dog", "emu"] and data.channels == 3
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    xs = [x for x, _ in data.val]
    assert sum(len(x) for x in xs) == 18 and xs[0].shape[-1] == 32
    assert len(data.calibration_batches(2)) == 2


@pytest.mark.parametrize(
    "layout, message",
    [(None, "does not exist"), ("empty", "has no 'train/' subfolder")],
)
def test_imagefolder_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    with pytest.raises(EdgecvError, match=message):
        build_data(DataConfig(dataset="imagefolder"), str(root))


def test_synthetic_is_deterministic_and_sharded():
    cfg = DataConfig(dataset="synthetic", image_size=12, channels=2, num_classes=3, train_size=40, val_size=20,
                     batch_size=8)
    a, b = build_data(cfg), build_data(cfg)
    xa, ya = next(iter(a.train))
    xb, yb = next(iter(b.train))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (8, 2, 12, 12)
    r0 = build_data(cfg, rank=0, world_size=2).train
    r1 = build_data(cfg, rank=1, world_size=2).train
    assert r0.num_samples + r1.num_samples == 40
    i0, i1 = set(r0._indices().tolist()), set(r1._indices().tolist())
    assert not (i0 & i1) and len(i0 | i1) == 40


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_builds(name, tmp_path):
    if name == "fashion-mnist" and not (FASHION_MNIST_DEBIAN.exists() or os.environ.get("EDGECV_DATA")):
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
    root = str(make_image_folder(tmp_path / "img")) if name == "imagefolder" else None
    cfg = DataConfig(dataset=name, image_size=28, batch_size=16, limit_train=64, limit_val=32)
    data = build_data(cfg, root)
    x, y = next(iter(data.train))
    assert x.shape[0] == 16 and x.shape[-2:] == (28, 28) and int(y.max()) < data.num_classes
    assert sum(len(y) for _, y in data.val) == (32 if name != "imagefolder" else 18)


def test_fashion_mnist_data_folder_errors(tmp_path):
    with pytest.raises(EdgecvError, match="does not exist"):
        find_fashion_mnist(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgecvError, match="has no Fashion-MNIST files"):
        find_fashion_mnist(str(tmp_path / "empty"))


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN.exists(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_is_the_real_dataset():
    data = build_data(DataConfig(dataset="fashion-mnist"))
    assert len(data.train.labels) == 60000
    assert len(data.val.labels) == 10000 and data.class_names[0] == "T-shirt/top"
    counts = torch.bincount(data.val.labels)
    assert counts.tolist() == [1000] * 10


def test_augmentation_keeps_shape_and_changes_pixels():
    cfg = DataConfig(dataset="synthetic", image_size=16, train_size=64, batch_size=64)
    plain = build_data(cfg.model_copy(update={"augment": False})).train
    aug = build_data(cfg).train
    xp, _ = next(iter(plain))
    xa, _ = next(iter(aug))
    assert xp.shape == xa.shape and not torch.equal(xp, xa)
