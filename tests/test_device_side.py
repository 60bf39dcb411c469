"""The device side runs without torch: validation data read with numpy (the same values as the torch path),
and `edgecv bench | eval | inspect | power | bench --trtexec-log` in a real subprocess where `import torch`
fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, without_tensorrt

from edgecv.data.config import DataConfig
from edgecv.data.datasets import FASHION_MNIST_DEBIAN, build_data
from edgecv.data.numpy_val import NumpyVal, numpy_val, resize_bilinear_uint8
from edgecv.errors import EdgecvError

HAVE_FMNIST = (FASHION_MNIST_DEBIAN / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (dataset-fashion-mnist) not installed")


def batches_equal(torch_batches, numpy_batches) -> None:
    torch_batches, numpy_batches = list(torch_batches), list(numpy_batches)
    assert len(torch_batches) == len(numpy_batches)
    for (tx, ty), (nx, ny) in zip(torch_batches, numpy_batches, strict=True):
        assert nx.dtype == np.float32 and ny.dtype == np.int64
        np.testing.assert_array_equal(nx, tx.numpy())
        np.testing.assert_array_equal(ny, ty.numpy())


@needs_fmnist
@pytest.mark.parametrize("size", [28, 16, 32, 64])
def test_fashion_mnist_without_torch_gives_the_torch_batches(size):
    cfg = DataConfig(dataset="fashion-mnist", image_size=size, limit_val=700, eval_batch_size=256)
    batches_equal(build_data(cfg).val, numpy_val(cfg, None))


def test_resize_matches_torch_within_one_grey_level():
    images = np.random.default_rng(0).integers(0, 256, (20, 1, 28, 28), dtype=np.uint8)
    for size in (14, 20, 56, 57, 33, 100, 13):
        ref = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=size, mode="bilinear",
                                              align_corners=False).round().clamp(0, 255).to(torch.uint8).numpy()
        ours = resize_bilinear_uint8(images, size)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, size
        if size in (14, 56, 100):
            assert diff.max() == 0


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageNet-layout folder: RGB, grey, palette and RGBA images of several sizes and formats."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (75, 50), (37, 37), (120, 90)]
    for split in ("train", "val"):
        for c, name in enumerate(["cat", "dog", "zebra"]):
            folder = root / split / name
            (folder / "more").mkdir(parents=True)
            for i, (h, w) in enumerate(shapes):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                suffix = ["png", "jpg", "bmp", "JPEG"][i]
                if (i + c) % 4 == 1:
                    image = image.convert("L")
                elif (i + c) % 4 == 2 and suffix in ("png", "bmp"):
                    image = image.convert("P")
                target = folder / "more" if i == 3 else folder
                image.save(target / f"img{i}.{suffix}")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_image_folder_without_torch_gives_the_torch_batches(image_folder):
    cfg = DataConfig(dataset="imagefolder", image_size=32, eval_batch_size=5)
    ours = numpy_val(cfg, str(image_folder))
    assert ours.class_names == ["cat", "dog", "zebra"] and len(ours.labels) == 12
    batches_equal(build_data(cfg, str(image_folder)).val, ours)
    limited = DataConfig(dataset="imagefolder", image_size=24, eval_batch_size=4, limit_val=7)
    batches_equal(build_data(limited, str(image_folder)).val, numpy_val(limited, str(image_folder)))


def test_image_folder_without_torch_follows_the_recipes_preprocessing(image_folder):
    """A pretrained recipe's preprocessing (another resize, bicubic, the weights' mean/std) reaches the
    device-side reader too: its batches are still the torch path's."""
    cfg = DataConfig(dataset="imagefolder", image_size=32, eval_batch_size=6, resize_size=40,
                     interpolation="bicubic", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    ours = numpy_val(cfg, str(image_folder))
    assert ours.resize == 40 and ours.mean == (0.5, 0.4, 0.3)
    batches_equal(build_data(cfg, str(image_folder)).val, ours)


def test_unreadable_images_are_skipped(image_folder, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(image_folder, root)
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    val = numpy_val(DataConfig(dataset="imagefolder", image_size=32, eval_batch_size=64), str(root))
    ((x, y),) = list(val)
    assert len(y) == 12 and x.shape == (12, 3, 32, 32)
    assert [Path(p).name for p in val.skipped] == ["broken.jpg"]


def test_synthetic_data_has_no_numpy_reader():
    with pytest.raises(EdgecvError, match="generated with torch.*--no-accuracy"):
        numpy_val(DataConfig(dataset="synthetic"), None)


@needs_fmnist
def test_model_files_read_validation_data_without_torch_where_identical(tmp_path):
    from edgecv.model_files import validation_batches

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    (tmp_path / "metadata.json").write_text('{"data": {"dataset": "fashion-mnist", "eval_batch_size": 500}}')
    assert isinstance(validation_batches(onnx, None, None, 1000), NumpyVal)
    (tmp_path / "metadata.json").write_text('{"data": {"dataset": "synthetic", "image_size": 16}}')
    assert not isinstance(validation_batches(onnx, None, None, None), NumpyVal)  # torch here: its loader


# ---------------------------------------------------------------------------------- with torch blocked
@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """Environment for a subprocess in which `import torch` (and torchvision, torch_pruning) fails."""
    shim = tmp_path_factory.mktemp("no_torch")
    (shim / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'torchvision', 'torch_pruning'):\n    sys.modules[name] = None\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(shim), *sys.path])}


@pytest.fixture(scope="module")
def device_files(tmp_path_factory) -> Path:
    from edgecv.export.onnx import export_onnx
    from edgecv.models import build_model

    folder = tmp_path_factory.mktemp("device")
    export_onnx(build_model("edgecv:resnet8", 10, 1, 28, width=8).eval(), folder / "model.onnx", torch.zeros(1, 1, 28, 28))
    (folder / "metadata.json").write_text('{"data": {"dataset": "fashion-mnist", "image_size": 28, '
                                          '"eval_batch_size": 500}}')
    from test_power import ORIN_NANO_JP6
    from test_tensorrt import TRT10_LOG

    (folder / "tegrastats.log").write_text((ORIN_NANO_JP6 + "\n") * 5)
    (folder / "trtexec.log").write_text(TRT10_LOG)
    return folder


def test_torch_is_really_blocked(no_torch, tmp_path):
    proc = run_cli("--help", env=no_torch, timeout=60)
    assert proc.returncode == 0
    import subprocess

    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                             env={**os.environ, **no_torch})
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr


@needs_fmnist
@pytest.mark.parametrize(
    "args",
    [
        ["bench", "model.onnx", "--runs", "2", "--rounds", "1", "--warmup", "0", "--batch-sizes", "1,4", "--limit", "600"],
        ["eval", "model.onnx", "--limit", "600"],
        ["inspect", "model.onnx", "--target", "tensorrt"],
        ["power", "tegrastats.log", "--frames", "50", "--interval-ms", "100"],
        ["bench", "--trtexec-log", "trtexec.log"],
    ],
    ids=["bench", "eval", "inspect", "power", "bench-trtexec-log"],
)
def test_device_side_commands_run_without_torch(no_torch, device_files, args):
    proc = run_cli(*args, cwd=device_files, env=no_torch, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    expected = {"bench": "top-1", "eval": "top-1", "inspect": "INT8 placement", "power": "energy per image",
                "--trtexec-log": "trtexec"}
    assert expected[args[1] if args[1] == "--trtexec-log" else args[0]] in proc.stdout


@without_tensorrt
def test_without_torch_an_engine_names_tensorrt_and_synthetic_data_asks_for_no_accuracy(no_torch, device_files,
                                                                                          tmp_path):
    (tmp_path / "model.engine").write_bytes(b"built by trtexec")
    proc = run_cli("bench", "model.engine", cwd=tmp_path, env=no_torch, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: TensorRT is not installed here")
    import shutil

    shutil.copy(device_files / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "metadata.json").write_text('{"data": {"dataset": "synthetic", "image_size": 28, "channels": 1}}')
    proc = run_cli("bench", "model.onnx", "--runs", "2", cwd=tmp_path, env=no_torch, timeout=120)
    assert proc.returncode == 2 and "--no-accuracy" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "model.onnx", "--runs", "2", "--rounds", "1", "--no-accuracy", cwd=tmp_path,
                   env=no_torch, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [["export", "model.pt"], ["compress", "quickstart"], ["train", "quickstart"]])
def test_training_commands_without_torch_say_which_extra(no_torch, tmp_path, args):
    (tmp_path / "model.pt").write_bytes(b"a checkpoint")
    proc = run_cli(*args, cwd=tmp_path, env=no_torch, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("error: this command needs torch, which is not installed here: install the "
                                   "training extra (pip install 'edgecv[train]')")
