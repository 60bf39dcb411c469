"""ImageNet-layout data: real JPEG files, transforms, bad files, loader settings, the val re-lay tool."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run_cli, write_recipe
from image_files import make_image_folder, truncate, write_jpeg

from edgecv.data import build_data
from edgecv.data.config import DataConfig
from edgecv.errors import EdgecvError


def _imagefolder_recipe(tmp_path, root, name="jpegs", **data):
    recipe = {**TINY, "name": name, "stages": [], "train": {**TINY["train"], "epochs": 1},
              "data": {"dataset": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 4,
                       "eval_batch_size": 4, **data}}
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def test_a_truncated_jpeg_is_skipped_named_and_logged(tmp_path):
    """One interrupted copy in train/ and one in val/ used to end `edgecv train` with
    'OSError: Truncated File Read'. Each is skipped and counted, named in a warning and in the run log."""
    root = make_image_folder(tmp_path / "img", per_class=4, size=(24, 24))
    bad_train = truncate(root / "train" / "dog" / "dog_1.JPEG", keep=0.4)
    bad_val = truncate(root / "val" / "emu" / "emu_2.JPEG", keep=0.4)
    path = _imagefolder_recipe(tmp_path, root)
    proc = run_cli("train", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert str(bad_train) in said and str(bad_val) in said and "skipped" in said
    log = [json.loads(line) for line in (tmp_path / "runs" / "jpegs" / "00-train" / "log.jsonl").read_text().splitlines()]
    skipped = {e["path"] for e in log if e["event"] == "skipped_image"}
    assert skipped == {str(bad_train), str(bad_val)}
    epoch = next(e for e in log if e["event"] == "epoch")
    assert epoch["skipped_images"] >= 1


def test_train_and_val_with_different_classes_is_one_line_naming_the_difference(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=("cat", "dog", "emu"), per_class=1, size=(12, 12))
    write_jpeg(root / "val" / "fox" / "fox_0.JPEG", 90, (12, 12))
    (root / "val" / "emu" / "emu_0.JPEG").unlink()
    (root / "val" / "emu").rmdir()
    with pytest.raises(EdgecvError) as err:
        build_data(DataConfig(dataset="imagefolder", image_size=8), str(root))
    message = str(err.value)
    assert "\n" not in message
    assert "only in train/: emu" in message and "only in val/: fox" in message


def test_different_classes_stop_the_cli_before_training(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=("cat", "dog"), per_class=1, size=(12, 12))
    write_jpeg(root / "val" / "emu" / "emu_0.JPEG", 90, (12, 12))
    proc = run_cli("train", str(_imagefolder_recipe(tmp_path, root)), "--out", str(tmp_path / "runs"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "only in val/: emu" in lines[0], proc.stderr
    assert not (tmp_path / "runs" / "jpegs" / "00-train").exists()


# ----------------------------------------------------------------------------- transforms


def test_val_images_are_resized_to_size_over_0875_then_center_cropped(tmp_path):
    """The standard ImageNet evaluation: shorter side to image_size / 0.875 (256 for 224), center crop."""
    from PIL import Image

    from edgecv.data.transforms import resize_size, val_transform

    assert resize_size(DataConfig(dataset="imagefolder", image_size=224)) == 256
    assert resize_size(DataConfig(dataset="imagefolder", image_size=224, resize_size=232)) == 232
    cfg = DataConfig(dataset="imagefolder", image_size=16, augment=False)
    image = Image.new("RGB", (64, 32))  # w x h: 32 is the shorter side -> 18, width 36; crop 16
    image.paste((255, 0, 0), (0, 0, 10, 32))  # a red band at the left edge is cropped away
    x = val_transform(cfg)(image)
    assert x.shape == (3, 16, 16)
    red = (1 - 0.485) / 0.229
    assert float(x[0].max()) < red - 1  # no red left after the center crop


@pytest.mark.parametrize("builder, weights", [("resnet18", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2"),
                                              ("mobilenet_v2", "IMAGENET1K_V2"),
                                              ("mobilenet_v3_large", "IMAGENET1K_V1"),
                                              ("efficientnet_b0", "IMAGENET1K_V1")])
def test_torchvision_weights_bring_their_preprocessing(builder, weights):
    """At the weights' crop size the data keys reproduce Weights.transforms() exactly; at other sizes the
    resize keeps its ratio to the crop."""
    from torchvision.models import get_model_weights

    from edgecv.data.transforms import resize_size, with_weights_preprocessing

    preset = get_model_weights(builder)[weights].transforms()
    cfg = with_weights_preprocessing(DataConfig(dataset="imagefolder", image_size=preset.crop_size[0]),
                                     f"torchvision:{builder}", weights)
    assert resize_size(cfg) == preset.resize_size[0]
    assert cfg.interpolation == preset.interpolation.value
    assert list(cfg.mean) == list(preset.mean) and list(cfg.std) == list(preset.std)
    half = with_weights_preprocessing(DataConfig(dataset="imagefolder", image_size=112), f"torchvision:{builder}",
                                      weights)
    assert resize_size(half) == round(112 * preset.resize_size[0] / preset.crop_size[0])


def test_the_model_spec_follows_the_weights_normalization(tmp_path):
    """A recipe starting from torchvision weights: the data section is resolved with the weights'
    preprocessing (a key the recipe sets wins), and the ModelSpec stored with every model says so."""
    from edgecv.pipeline import Pipeline, model_spec
    from edgecv.recipe import validate

    root = make_image_folder(tmp_path / "img", per_class=2, size=(12, 12))
    recipe = validate({"name": "w", "model": {"name": "torchvision:efficientnet_b0", "weights": "IMAGENET1K_V1"},
                       "data": {"dataset": "imagefolder", "root": str(root), "image_size": 16,
                                "std": [0.5, 0.5, 0.5]}})
    pipe = Pipeline(recipe, tmp_path / "runs", "cpu")
    assert pipe.recipe.data.interpolation == "bicubic" and pipe.recipe.data.resize_size == 18
    data = build_data(pipe.recipe.data)
    spec = model_spec(pipe.recipe, data)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.5, 0.5, 0.5) == data.std


def test_unknown_weights_are_one_line(tmp_path):
    from edgecv.pipeline import Pipeline
    from edgecv.recipe import validate

    recipe = validate({"name": "w", "model": {"name": "torchvision:resnet18", "weights": "IMAGENET1K_V9"},
                       "data": {"dataset": "imagefolder", "root": str(tmp_path)}})
    with pytest.raises(EdgecvError, match=r"'IMAGENET1K_V9' is neither a file nor one of torchvision resnet18's weights \(IMAGENET1K_V1\)"):
        Pipeline(recipe, tmp_path / "runs", "cpu")


@pytest.mark.parametrize("extra", [{}, {"auto_augment": "imagenet", "random_erase": 0.5},
                                   {"auto_augment": "randaugment"}, {"auto_augment": "trivialaugment"},
                                   {"interpolation": "bicubic"}])
def test_training_augmentations_give_normalized_batches(tmp_path, extra):
    root = make_image_folder(tmp_path / "img", per_class=2, size=(20, 24))
    data = build_data(DataConfig(dataset="imagefolder", image_size=16, batch_size=6, **extra), str(root))
    x, y = next(iter(data.train))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() != []
    assert -3 < float(x.mean()) < 3


# ----------------------------------------------------------------------------- loader settings


def test_loader_settings_come_from_the_recipe(tmp_path):
    root = make_image_folder(tmp_path / "img", per_class=2, size=(12, 12))
    cfg = DataConfig(dataset="imagefolder", image_size=8, batch_size=2, workers=2, prefetch_factor=3,
                     persistent_workers=False, pin_memory=False)
    data = build_data(cfg, str(root))
    loader = data.train.loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers, loader.pin_memory) == (2, 3, False, False)
    default = build_data(DataConfig(dataset="imagefolder", image_size=8, workers=2), str(root)).train.loader
    assert default.persistent_workers and not default.pin_memory  # pinned memory only helps a GPU


@pytest.mark.parametrize("data, message", [
    ({"dataset": "imagefolder", "prefetch_factor": 4}, "data.prefetch_factor: needs worker processes"),
    ({"dataset": "synthetic", "gpu_decode": True}, "data.gpu_decode: the 'synthetic' dataset does not take it"),
    ({"dataset": "imagefolder", "std": [0.2, 0.0, 0.2]}, "data.std: every value must be positive"),
    ({"dataset": "imagefolder", "interpolation": "lanczos"}, "data.interpolation"),
])
def test_loader_option_mistakes_are_one_line(data, message):
    from edgecv.recipe import validate

    with pytest.raises(EdgecvError) as err:
        validate({"name": "r", "model": {"name": "edgecv:resnet8"}, "data": data})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_skipped_files_are_reported_from_worker_processes(tmp_path):
    root = make_image_folder(tmp_path / "img", per_class=3, size=(16, 16))
    bad = truncate(root / "train" / "cat" / "cat_0.JPEG", keep=0.3)
    data = build_data(DataConfig(dataset="imagefolder", image_size=8, batch_size=3, workers=2, augment=False), str(root))
    sizes = [len(y) for _, y in data.train]
    assert sizes == [3, 3, 3]  # the next readable file took its place
    assert [path for path, _ in data.train.take_skipped()] == [str(bad)]
    assert data.train.take_skipped() == []


# ----------------------------------------------------------------------------- GPU decoding, CPU fallback


def test_gpu_decoding_falls_back_to_the_cpu_and_matches_pil(tmp_path):
    """data.gpu_decode on a machine without CUDA decodes on the CPU through the same path: the batches
    match the PIL path's (same files, same resize and crop; decoders differ by rounding) and a truncated
    file is skipped and named."""
    root = make_image_folder(tmp_path / "img", per_class=3, size=(30, 36))
    bad = truncate(root / "val" / "dog" / "dog_1.JPEG", keep=0.3)
    cfg = DataConfig(dataset="imagefolder", image_size=16, batch_size=4, eval_batch_size=4)
    pil = build_data(cfg, str(root))
    gpu = build_data(cfg.model_copy(update={"gpu_decode": True}), str(root), device="cpu")
    xs_pil = torch.cat([x for x, _ in pil.val])
    xs_gpu = torch.cat([x for x, _ in gpu.val])
    assert xs_gpu.shape == xs_pil.shape == (8, 3, 16, 16)
    assert float((xs_gpu - xs_pil).abs().mean()) < 0.05
    assert [p for p, _ in gpu.val.take_skipped()] == [str(bad)]
    x, y = next(iter(gpu.train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and len(y) == 4


# ----------------------------------------------------------------------------- the val re-lay tool


def _flat_val(tmp_path, n=7):
    """A flat folder as ImageNet ships it, with LOC_val_solution.csv and the devkit's ground truth."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    flat = tmp_path / "ILSVRC2012_img_val"
    labels = {}
    for i in range(1, n + 1):
        image_id = f"ILSVRC2012_val_{i:08d}"
        labels[image_id] = wnids[i % 3]
        write_jpeg(flat / f"{image_id}.JPEG", 40 * (i % 3) + 20, (16, 20), seed=i)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{k},{v} 10 10 200 200 {v} 5 5 50 50\n" for k, v in sorted(labels.items(), reverse=True)))
    devkit = tmp_path / "devkit"
    (devkit / "data").mkdir(parents=True)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{wnids.index(labels[k]) + 1}\n" for k in sorted(labels)))
    (tmp_path / "synsets.txt").write_text("\n".join(wnids) + "\n")
    return flat, csv, devkit, labels


def _run_tool(*args):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, str(ROOT / "tools" / "imagenet_val_to_folders.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("source", ["csv", "devkit"])
def test_val_relay_links_the_flat_folder_into_class_folders(tmp_path, source):
    flat, csv, devkit, labels = _flat_val(tmp_path)
    out = tmp_path / "imagenet" / "val"
    args = ["--csv", csv] if source == "csv" else ["--devkit", devkit, "--synsets", tmp_path / "synsets.txt"]
    proc = _run_tool(flat, out, *args)
    assert proc.returncode == 0, proc.stderr
    assert "linked 7 images into 3 class folders" in proc.stdout
    for image_id, wnid in labels.items():
        link = out / wnid / f"{image_id}.JPEG"
        assert link.is_symlink() and not Path_is_absolute(link)
        assert link.read_bytes() == (flat / f"{image_id}.JPEG").read_bytes()  # a link, not a copy
    again = _run_tool(flat, out, *args)
    assert again.returncode == 0 and "(7 already linked)" in again.stdout
    # the result is a dataset: train/ with the same classes next to it
    for wnid in set(labels.values()):
        write_jpeg(tmp_path / "imagenet" / "train" / wnid / "t.JPEG", 50, (16, 16))
    data = build_data(DataConfig(dataset="imagefolder", image_size=8, eval_batch_size=4), str(tmp_path / "imagenet"))
    assert sum(len(y) for _, y in data.val) == 7 and data.class_names == sorted(set(labels.values()))


def Path_is_absolute(link) -> bool:  # noqa: N802 - reads as what it checks
    import os

    return os.path.isabs(os.readlink(link))


def test_val_relay_mistakes(tmp_path):
    flat, csv, devkit, _ = _flat_val(tmp_path, n=4)
    (flat / "ILSVRC2012_val_00000002.JPEG").unlink()
    missing = _run_tool(flat, tmp_path / "out", "--csv", csv)
    assert missing.returncode == 1 and "1 labelled images are not in" in missing.stderr
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,label\nx,y\n")
    proc = _run_tool(flat, tmp_path / "out2", "--csv", bad_csv)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --csv") and "Traceback" not in proc.stderr
    no_scipy = _run_tool(flat, tmp_path / "out3", "--devkit", devkit)
    assert no_scipy.returncode in (0, 2) and "Traceback" not in no_scipy.stderr


def test_a_bad_file_met_when_only_evaluating_is_logged_too(tmp_path):
    """Recipes that start from pretrained weights evaluate the baseline without training (epochs 0)."""
    from nets import no_batchnorm

    from edgecv.train.config import TrainConfig
    from edgecv.train.loop import fit

    root = make_image_folder(tmp_path / "img", per_class=2, size=(16, 16))
    bad = truncate(root / "val" / "cat" / "cat_1.JPEG", keep=0.3)
    data = build_data(DataConfig(dataset="imagefolder", image_size=8, eval_batch_size=4), str(root))
    result = fit(no_batchnorm(3), data.train, data.val, TrainConfig(epochs=0), log_path=tmp_path / "log.jsonl")
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["event"], e["path"], e["epoch"]) for e in events] == [("skipped_image", str(bad), 0)]
    assert result["epochs"] == 0
