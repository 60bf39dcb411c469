"""Compressing a model the user already trained, as the README's "Compress your own model" says: a plain
PyTorch script trains torchvision's MobileNetV2 on JPEG class folders (one epoch, DataParallel) and saves its
state dict; `edgecv compress deploy --set model.weights=...` evaluates it exactly as the script did, and
`edgecv eval` scores folders by class name. Files that do not fit are one `error:` line, exit 2, nothing
written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from image_files import make_image_folder, truncate

SIZE = 32  # below 64 px: a torchvision net built for this size would get a small-image stem without weights
CLASSES = ("cat", "dog", "emu")

# The README's commands (the tests below run each, with the placeholders replaced and the run made small).
README_COMMANDS = [
    "edgecv compress deploy --set model.name=torchvision:mobilenet_v2 --set model.weights=mine.pth --data my_images/",
    "edgecv eval runs/deploy/export/model.onnx --data my_images/",
    "edgecv eval runs/deploy/export/model.int8.onnx --data my_images/",
    "edgecv compress deploy --set model.name=torchvision:mobilenet_v2 --set model.weights=mine.pth "
    "--set model.head=new --set train.epochs=5 --data my_images/",
]
COMPRESS, EVAL_FLOAT, EVAL_INT8, HEAD_NEW = README_COMMANDS
# A small run of `deploy`: the user's image size, tiny batches, and (for the fast tests) no compression stages
# but the export of the baseline
SMALL = [f"data.image_size={SIZE}", "data.batch_size=8", "data.eval_batch_size=64",
         "bench.batch_sizes=[1]", "bench.warmup=0", "bench.runs=2", "bench.rounds=1"]
BASELINE_ONLY = [*SMALL, "stages=[export]", "bench.backends=[torch]"]

TRAIN_SCRIPT = '''\
"""A plain PyTorch training script: torchvision MobileNetV2 on an image folder, one epoch, DataParallel.
Saves the state dict and prints its own top-1 on val/ with each image's prediction (JSON)."""
import json
import sys

import torch
import torchvision
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

root, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
val_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
train, val = ImageFolder(f"{root}/train", train_tf), ImageFolder(f"{root}/val", val_tf)
model = torch.nn.DataParallel(torchvision.models.mobilenet_v2(num_classes=len(train.classes)))
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None  # running statistics: the average over the epoch
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
model.train()
for x, y in torch.utils.data.DataLoader(train, batch_size=4, shuffle=True):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
torch.save(model.state_dict(), out)
model.eval()
predictions = []
with torch.no_grad():
    for x, _ in torch.utils.data.DataLoader(val, batch_size=64):
        predictions += model(x).argmax(1).tolist()
correct = sum(p == y for p, (_, y) in zip(predictions, val.samples))
print(json.dumps({"top1": 100.0 * correct / len(predictions), "classes": train.classes,
                  "files": [p for p, _ in val.samples], "labels": [y for _, y in val.samples],
                  "predictions": predictions}))
'''


def user_command(command: str, trained: dict, out: Path, extra: list[str] = ()) -> list[str]:
    """A README command's arguments with its placeholders replaced by the test's files, plus `--set`s."""
    text = command.replace("mine.pth", str(trained["weights"])).replace("my_images/", str(trained["images"]))
    text = text.replace("runs/", f"{out}/")
    args = text.split()[1:]  # without "edgecv"
    if args[0] == "compress":
        args += ["--out", str(out), "--device", "cpu"] + [a for s in extra for a in ("--set", s)]
    return args


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def report_baseline_top1(run_dir: Path) -> str:
    """The 00-train row's top-1 in report.md's stages table, as written."""
    text = (run_dir / "report.md").read_text()
    row = re.search(r"^\| 00-train \| done \| [^|]+ \| ([0-9.]+) \|$", text, re.MULTILINE)
    assert row, text[-3000:]
    return row.group(1)


def eval_top1(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(re.search(r"top-1 ([0-9.]+)%", proc.stdout).group(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """JPEG class folders, and the user's script run on them: its weights file and its own evaluation."""
    base = tmp_path_factory.mktemp("own-model")
    images = make_image_folder(base / "images", CLASSES, per_class=12, val_per_class=4)
    script = base / "train_mobilenet.py"
    script.write_text(TRAIN_SCRIPT)
    weights = base / "mine.pth"
    proc = subprocess.run([sys.executable, str(script), str(images), str(weights), str(SIZE)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(result["predictions"])) > 1  # not one class for everything: a top-1 that can tell
    return {"base": base, "images": images, "weights": weights, **result}


@pytest.fixture(scope="module")
def baseline_run(trained) -> dict:
    """The README's compress command, with the compression stages left out (the baseline and its export)."""
    out = trained["base"] / "runs"
    proc = run_cli(*user_command(COMPRESS, trained, out, BASELINE_ONLY))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "run_dir": out / "deploy", "proc": proc}


def test_readme_shows_the_tested_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Compress your own model", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    shown = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("edgecv ")]
    assert shown == README_COMMANDS  # (its subsection "A timm model" is tested in tests/test_timm.py)


def test_baseline_top1_is_what_the_training_script_measured(trained, baseline_run):
    run_dir = baseline_run["run_dir"]
    assert report_baseline_top1(run_dir) == f"{trained['top1']:.2f}"
    report = (run_dir / "report.md").read_text()
    assert "weights from" in report and "prefix 'module.' removed" in report and "evaluated as given" in report


def test_the_model_is_the_builders_own_and_keeps_its_class_names(trained, baseline_run):
    from edgecv.checkpoint import load_model

    model, header = load_model(baseline_run["run_dir"] / "00-train" / "model.pt")
    assert model.features[0][0].stride == (2, 2)  # torchvision's stem, not a small-image one at 32 px
    assert header.spec.small_input_stem is False
    assert list(header.spec.class_names) == trained["classes"] == list(CLASSES)


def test_eval_of_the_export_matches_the_script(trained, baseline_run):
    top1 = eval_top1(run_cli(*user_command(EVAL_FLOAT, trained, baseline_run["out"])))
    assert f"{top1:.2f}" == f"{trained['top1']:.2f}"


def _subset_folder(trained: dict, root: Path, keep: tuple[str, ...]) -> tuple[Path, float]:
    """val/ with only the classes `keep` (copies of the script's images), and the top-1 the script's
    predictions give on them."""
    right = total = 0
    for path, label, pred in zip(trained["files"], trained["labels"], trained["predictions"], strict=True):
        cls = Path(path).parent.name
        if cls in keep:
            dest = root / "val" / cls / Path(path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
            right, total = right + (pred == label), total + 1
    return root, 100.0 * right / total


@pytest.mark.parametrize("model_file", ["00-train/model.pt", "export/model.onnx"])
def test_eval_maps_a_subset_of_the_classes_by_name(trained, baseline_run, model_file, tmp_path):
    folder, expected = _subset_folder(trained, tmp_path / "subset", ("dog", "emu"))
    top1 = eval_top1(run_cli("eval", str(baseline_run["run_dir"] / model_file), "--data", str(folder)))
    assert f"{top1:.2f}" == f"{expected:.2f}"


def test_eval_refuses_a_class_the_model_does_not_know(trained, baseline_run, tmp_path):
    folder, _ = _subset_folder(trained, tmp_path / "other", ("cat",))
    shutil.copytree(folder / "val" / "cat", folder / "val" / "fox")
    line = one_error_line(run_cli("eval", str(baseline_run["run_dir"] / "export" / "model.onnx"),
                                  "--data", str(folder)))
    assert "'fox'" in line and "cat, dog, emu" in line


def test_onnx_files_record_the_class_names(baseline_run):
    import onnx

    proto = onnx.load(str(baseline_run["run_dir"] / "export" / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["edgecv.class_names"]) == list(CLASSES)


def test_head_new_replaces_the_classifier_for_other_classes_and_says_so(trained, tmp_path):
    four = dict(trained, images=make_image_folder(tmp_path / "four", ("ant", "bee", "cow", "elk"), per_class=2))
    out = tmp_path / "runs"
    proc = run_cli(*user_command(HEAD_NEW, four, out, [*SMALL, "stages=[]", "bench.backends=[torch]",
                                                       "train.epochs=1"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "deploy" / "report.md").read_text()
    assert "model.head: new replaced the classifier (3 classes in the file, 4 now, untrained)" in report


def _bad_files(trained: dict, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might pass by mistake, each with a phrase its error line must hold."""
    import torch
    import torchvision

    whole = folder / "whole.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=3), whole)
    other = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), other)
    cut = truncate(Path(shutil.copy(trained["weights"], folder / "cut.pth")), 0.5)
    five = folder / "five.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=5).state_dict(), five)
    return {
        "pickled whole model": (whole, "torch.save(model.state_dict(), PATH)"),
        "another architecture": (other, "another architecture"),
        "truncated": (cut, "truncated or corrupt"),
        "class count": (five, "set model.head: new"),
    }


@pytest.mark.parametrize("case", ["pickled whole model", "class count"])  # the others: in process, below
def test_a_weights_file_that_does_not_fit_is_one_line_and_nothing_written(trained, case, tmp_path):
    path, phrase = _bad_files(trained, tmp_path)[case]
    out = tmp_path / "runs"
    line = one_error_line(run_cli(*user_command(COMPRESS, dict(trained, weights=path), out, SMALL)))
    assert f"model.weights '{path}'" in line and phrase in line, line
    assert not out.exists()


@pytest.mark.slow
def test_the_readme_command_compresses_the_users_model(trained, tmp_path):
    """The whole `deploy` recipe, made small: the baseline is the script's top-1, and the INT8 file made
    from it evaluates by class name."""
    out = tmp_path / "runs"
    short = [*SMALL, "stages.finetune.epochs=1", "stages.ptq.compare=[max]", "stages.ptq.calib_batches=1",
             "stages.export.parity_samples=12"]
    proc = run_cli(*user_command(COMPRESS, trained, out, short))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report_baseline_top1(out / "deploy") == f"{trained['top1']:.2f}"
    files = json.loads((out / "deploy" / "export" / "metadata.json").read_text())["files"]
    assert {"model.onnx", "model.int8.onnx", "model.int8.tensorrt.onnx"} <= set(files)
    for command in (EVAL_FLOAT, EVAL_INT8):
        assert 0.0 <= eval_top1(run_cli(*user_command(command, trained, out))) <= 100.0


# ------------------------------------------------------------------------------------------ in process
# The same rules, without a subprocess: edgecv's ResNet-8 (small and quick) and torchvision's MobileNetV2.
def _resnet8(classes: int = 4, width: int = 8):
    from edgecv.models import build_model

    return build_model("edgecv:resnet8", classes, 3, 16, width=width)


def _load(path: Path, name: str = "edgecv:resnet8", classes: int = 4, head: str = "keep", **kwargs):
    from edgecv.models import build_with_weights

    return build_with_weights(name, str(path), head, num_classes=classes, in_channels=3, image_size=16,
                              **({"width": 8} if name.startswith("edgecv:") else {}), **kwargs)


def _same_outputs(a, b) -> bool:
    import torch

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("nest", [None, "state_dict", "model", "model_ema", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod."])
def test_trainers_wrappings_are_taken_off(nest, prefix, tmp_path):
    import torch
    from conftest import random_batchnorm

    source = random_batchnorm(_resnet8(), torch.Generator().manual_seed(1))
    state = {prefix + k: v for k, v in source.state_dict().items()}
    torch.save({nest: state, "epoch": 3, "optimizer": {"lr": 0.1}} if nest else state, tmp_path / "w.pt")
    model, loaded = _load(tmp_path / "w.pt")
    assert _same_outputs(model, source)
    assert loaded.nested_under == nest and loaded.prefix_removed == (prefix or None) and loaded.head == "kept"


def test_reference_script_checkpoint_with_its_arguments_loads(tmp_path):
    """torchvision's and timm's training scripts save their argparse.Namespace beside the weights."""
    import argparse

    import torch

    source = _resnet8()
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 89}, tmp_path / "c.pth")
    assert _same_outputs(_load(tmp_path / "c.pth")[0], source)


def _error(path: Path, **kwargs) -> str:
    from edgecv.errors import EdgecvError

    with pytest.raises(EdgecvError) as info:
        _load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"model.weights '{path}'")
    return message


def test_missing_and_unexpected_keys_are_named(tmp_path):
    import torch

    state = _resnet8().state_dict()
    del state["layer3.0.conv2.weight"]
    state["criterion.weight"] = torch.ones(4)
    torch.save(state, tmp_path / "w.pt")
    message = _error(tmp_path / "w.pt")
    assert "1 of the model's keys missing (layer3.0.conv2.weight)" in message
    assert "1 keys the model does not have (criterion.weight)" in message and "only the network's own" in message


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path):
    import torch

    torch.save(_resnet8(width=16).state_dict(), tmp_path / "wide.pt")
    assert "conv1.weight is 16x3x3x3 in the file, 8x3x3x3 in the model" in _error(tmp_path / "wide.pt")


def test_another_class_count_needs_head_new(tmp_path):
    import torch

    source = _resnet8(classes=10)
    torch.save(source.state_dict(), tmp_path / "ten.pt")
    message = _error(tmp_path / "ten.pt")
    assert "fc.weight) has 10 classes, the data has 4: set model.head: new" in message
    model, loaded = _load(tmp_path / "ten.pt", head="new")
    assert model.fc.out_features == 4 and loaded.file_classes == 10 and loaded.head == "new"
    assert torch.equal(model.conv1.weight, source.conv1.weight)  # everything else is the file's
    assert "model.head: new replaced the classifier (10 classes in the file, 4 now" in loaded.summary()


def test_a_file_of_another_architecture_is_named_as_such(tmp_path):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pth")
    message = _error(tmp_path / "r18.pth", name="torchvision:mobilenet_v2")
    assert "does not fit torchvision:mobilenet_v2" in message and "another architecture" in message


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    import torch

    torch.save(_resnet8().state_dict(), tmp_path / "w.pt")
    assert "truncated or corrupt" in _error(truncate(tmp_path / "w.pt", 0.6))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    assert "truncated or corrupt" in _error(tmp_path / "junk.bin")
    assert "no such file" in _error(tmp_path / "absent.pth")


def test_a_pickled_model_or_a_list_is_refused_with_how_to_save_a_state_dict(tmp_path):
    import torch

    torch.save(_resnet8(), tmp_path / "whole.pt")
    message = _error(tmp_path / "whole.pt")
    assert "pickled whole model (edgecv.models.small.CifarResNet)" in message
    assert message.endswith("torch.save(model.state_dict(), PATH)")
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds a list, not a state dict" in _error(tmp_path / "list.pt")


def test_safetensors_without_the_package_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "w.safetensors").write_bytes(b"{}")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert "pip install safetensors" in _error(tmp_path / "w.safetensors")


def test_safetensors_file_loads(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _resnet8()
    safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()},
                                str(tmp_path / "w.safetensors"))
    assert _same_outputs(_load(tmp_path / "w.safetensors")[0], source)
    assert "not a readable safetensors file" in _error(truncate(tmp_path / "w.safetensors", 0.5))


def test_weights_files_and_torchvision_weights_names(tmp_path):
    from edgecv.errors import EdgecvError
    from edgecv.models import build_model
    from edgecv.models.user_weights import is_weights_file

    (tmp_path / "plain").write_bytes(b"")
    assert is_weights_file(str(tmp_path / "plain")) and is_weights_file("not/yet/there.safetensors")
    assert not is_weights_file("IMAGENET1K_V1") and not is_weights_file(None)
    with pytest.raises(EdgecvError, match="'IMAGENET1K_V9' is neither a file nor one of torchvision mobilenet_v2"):
        build_model("torchvision:mobilenet_v2", 4, 3, 32, weights="IMAGENET1K_V9")
    with pytest.raises(EdgecvError, match="'IMAGENET1K_V1' is not a file, and only torchvision models"):
        build_model("edgecv:resnet8", 4, 3, 16, weights="IMAGENET1K_V1")


def test_no_small_input_stem_with_weights(tmp_path):
    """Below 64 px edgecv gives torchvision nets a stride-1 stem; a model from a weights file keeps its own."""
    import torch
    import torchvision

    from edgecv.models import build_model

    source = torchvision.models.resnet18(num_classes=4)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model, _ = _load(tmp_path / "r18.pth", name="torchvision:resnet18")
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, torch.nn.MaxPool2d)
    assert _same_outputs(model, source)
    assert build_model("torchvision:resnet18", 4, 3, 16).conv1.stride == (1, 1)  # without weights: adapted


def test_head_new_needs_weights():
    from edgecv.errors import EdgecvError
    from edgecv.recipe import load_recipe

    with pytest.raises(EdgecvError, match="model.head: new replaces the classifier of model.weights"):
        load_recipe("deploy", ["model.head=new"])


def test_eval_labels_follow_the_models_class_order():
    import numpy as np

    from edgecv.data.numpy_val import NumpyVal
    from edgecv.model_files import by_class_name

    val = NumpyVal("imagefolder", None, np.array([0, 0, 1]), 2, (0.5,), (0.5,), ["cat", "dog"])
    mapped = by_class_name(val, val.class_names, ["emu", "dog", "cat"], Path("m.onnx"))
    assert mapped.labels.tolist() == [2, 2, 1]
    batches = [(np.zeros((3, 1)), np.array([1, 0, 1]))]
    assert [y.tolist() for _, y in by_class_name(batches, ["cat", "dog"], ["dog", "cat"], Path("m"))] == [[0, 1, 0]]
    assert by_class_name(val, val.class_names, None, Path("m")) is val  # a model that records no names


def _tiny_pipeline(tmp_path: Path, model: dict):
    from conftest import TINY

    from edgecv.pipeline import Pipeline
    from edgecv.recipe import validate

    raw = json.loads(json.dumps(TINY))
    raw.update(model=model, stages=[], train={"epochs": 0},
               bench={"backends": ["torch"], "batch_sizes": [1], "warmup": 0, "runs": 1, "rounds": 1})
    raw["data"].update(train_size=64, val_size=64)
    return Pipeline(validate(raw), tmp_path / "runs", "cpu")


@pytest.mark.parametrize("name", ["edgecv:resnet8", "nets:no_batchnorm"])
def test_every_model_source_takes_a_weights_file_and_a_retrained_file_reruns(name, tmp_path):
    """edgecv's own nets and a package.module:factory take a weights file like torchvision's; the run's
    baseline is the file's model, and a file retrained under the same name is evaluated again."""
    import torch

    from edgecv.checkpoint import load_model
    from edgecv.models import build_model

    extra = {"width": 8} if name.startswith("edgecv:") else {}
    source = build_model(name, 4, 3, 16, **extra)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    model = {"name": name, "weights": str(tmp_path / "w.pt"), **extra}
    first = _tiny_pipeline(tmp_path, model).run()
    assert _same_outputs(load_model(first["outputs"]["train"])[0], source)
    assert first["manifest"]["stages"][0]["metrics"]["weights"]["prefix_removed"] == "module."
    with torch.no_grad():
        next(source.parameters()).mul_(0.5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    second = _tiny_pipeline(tmp_path, model).run()
    assert _same_outputs(load_model(second["outputs"]["train"])[0], source)


@pytest.mark.parametrize("wrap", ["plain", "dataparallel", "dict copy"])
def test_module_versions_are_kept_for_models_that_check_them(wrap, tmp_path):
    """torchvision's MNASNet refuses a state dict without its module version (which torch.save of a
    state_dict keeps beside the tensors); a DataParallel file keeps it under 'module', a dict copy has none."""
    import torch
    import torchvision

    source = torchvision.models.mnasnet0_5(num_classes=4)
    state = torch.nn.DataParallel(source).state_dict() if wrap == "dataparallel" else source.state_dict()
    torch.save(dict(state.items()) if wrap == "dict copy" else state, tmp_path / "mnasnet.pth")
    model, _ = _load(tmp_path / "mnasnet.pth", name="torchvision:mnasnet0_5")
    assert _same_outputs(model, source)
