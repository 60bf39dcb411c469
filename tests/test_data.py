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
