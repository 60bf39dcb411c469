"""timm models (`model.name: timm:<name>`, the timm extra): built as timm builds them with no download, fed
as their pretrained_cfg says, weights from a timm checkpoint through model.weights, reparameterizable blocks
fused before quantizing (with a parity check), and timm's BatchNormAct2d folded into the convs so no
BatchNormalization stays in float in the INT8 file. Random weights, 64 px: these check structure, not accuracy."""

from __future__ import annotations

import collections
import json
import sys

import pytest

timm = pytest.importorskip("timm")

import torch  # noqa: E402
from conftest import ROOT, run_cli  # noqa: E402
from image_files import make_image_folder  # noqa: E402
from torch import nn  # noqa: E402

from edgecv.errors import EdgecvError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
CLASSES = ("cat", "dog", "emu")
README_COMMAND = ("edgecv compress deploy --set model.name=timm:mobilenetv4_conv_small "
                  "--set model.weights=model_best.pth.tar --data my_images/")


def _build(name: str, classes: int = 5) -> nn.Module:
    from edgecv.models import build_model

    torch.manual_seed(0)
    return build_model(f"timm:{name}", classes, 3, SIZE).eval()


def _batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _onnx_ops(path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# ------------------------------------------------------------------------------------------ the source
def test_timm_model_is_timms_own_architecture_for_the_data():
    model = _build("mobilenetv4_conv_small", classes=7)
    reference = timm.create_model("mobilenetv4_conv_small", pretrained=False, num_classes=7)
    assert type(model) is type(reference)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in reference.named_parameters()]  # no stem swap at 64 px
    assert model(_batch(2)).shape == (2, 7)


def test_preprocessing_comes_from_pretrained_cfg_unless_the_recipe_sets_it():
    from edgecv.data.config import DataConfig
    from edgecv.data.transforms import resize_size, with_weights_preprocessing

    cfg = timm.models.get_pretrained_cfg("efficientnet_lite0")
    data = with_weights_preprocessing(DataConfig(dataset="imagefolder"), "timm:efficientnet_lite0", None)
    assert data.image_size == cfg.input_size[-1]
    assert resize_size(data) == int(cfg.input_size[-1] / cfg.crop_pct)
    assert data.interpolation == cfg.interpolation
    assert list(data.mean) == list(cfg.mean) and list(data.std) == list(cfg.std)
    own = DataConfig(dataset="imagefolder", image_size=SIZE, mean=(0.5, 0.5, 0.5), interpolation="bilinear")
    data = with_weights_preprocessing(own, "timm:mobilenetv4_conv_small", None)
    assert data.image_size == SIZE and data.mean == (0.5, 0.5, 0.5) and data.interpolation == "bilinear"
    pre = timm.models.get_pretrained_cfg("mobilenetv4_conv_small")
    assert resize_size(data) == int(SIZE / pre.crop_pct) and list(data.std) == list(pre.std)


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(EdgecvError, match=r"timm has no model 'mobilenetv4_conv_smal' \(did you mean "
                                          r"'timm:mobilenetv4_conv_small'\?\)"):
        _build("mobilenetv4_conv_smal")


def test_hub_weights_by_name_are_refused_without_a_download():
    from edgecv.models import build_model

    with pytest.raises(EdgecvError, match="edgecv downloads nothing.*model.safetensors"):
        build_model("timm:mobilenetv4_conv_small", 5, 3, SIZE, weights="e2400_r224_in1k")


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    from edgecv.models import build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(EdgecvError, match=r"needs timm, which is not installed: pip install 'edgecv\[timm\]'"):
        build_model("timm:mobilenetv4_conv_small", 5)


def test_weights_from_a_timm_train_checkpoint(tmp_path):
    """timm's train.py writes {'state_dict': ..., 'state_dict_ema': ...}: model.weights loads it."""
    from edgecv.models import build_with_weights

    trained = _build("efficientnet_lite0", classes=3)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "efficientnet_lite0", "state_dict_ema": trained.state_dict()}, path)
    loaded, info = build_with_weights("timm:efficientnet_lite0", str(path), num_classes=3, in_channels=3,
                                      image_size=SIZE)
    assert info.tensors > 0 and info.head == "kept"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_batch(2)), trained(_batch(2)))


# ------------------------------------------------------------------------------------------ reparameterization
def test_mobileone_is_fused_with_a_parity_check():
    from edgecv.compress.reparam import reparameterize, sqnr_db

    model = _build("mobileone_s0")
    fused, check = reparameterize(model, _batch(1))
    with torch.no_grad():
        before, after = model(_batch(2)), fused(_batch(2))
    assert check is not None and check.blocks > 0 and check.sqnr_db > 40
    assert 0 < check.max_abs_diff < 1e-4 * before.abs().max()  # random weights: outputs grow large
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the original is left as it was
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sqnr_db(before, after) > 40


def test_mobileone_is_fused_then_pruned_and_its_checkpoints_rebuild(tmp_path):
    """torch-pruning cannot follow MobileOne's train-time branches (fusing the pruned train-time form fails), so
    it is fused first; the checkpoints of the fused, pruned float model and of its INT8 model rebuild."""
    from edgecv.checkpoint import load_model, save_model
    from edgecv.compress.prune import PruneConfig, prune_model
    from edgecv.compress.quantize import prepare_qat, reparam_check
    from edgecv.compress.reparam import reparameterize, was_reparameterized
    from edgecv.models.spec import ModelSpec

    spec = ModelSpec("timm:mobileone_s0", 5, 3, SIZE)
    x = _batch(2)
    fused, check = reparameterize(_build("mobileone_s0"), x[:1])
    pruned, info = prune_model(fused, PruneConfig(ratio=0.3), x[:1])
    assert check is not None and was_reparameterized(pruned) and info["macs_after"] < info["macs_before"]
    assert reparameterize(pruned, x[:1]) == (pruned, None)  # fused already: nothing to do
    save_model(tmp_path / "float.pt", pruned, spec)
    qmodel = prepare_qat(pruned, "onnxruntime", x[:1])
    assert reparam_check(qmodel) is None
    save_model(tmp_path / "int8.pt", qmodel, spec)
    with torch.no_grad():
        for path, original in (("float.pt", pruned.eval()), ("int8.pt", qmodel.eval())):
            assert torch.equal(load_model(tmp_path / path)[0](x), original(x))


def test_a_fusion_that_changes_the_outputs_is_one_error_line():
    from edgecv.compress.reparam import reparameterize

    class BadBlock(nn.Conv2d):
        def fuse(self) -> nn.Module:
            return nn.Conv2d(3, 4, 3, padding=1)  # new random weights: not the same function

    with pytest.raises(EdgecvError, match=r"reparameterize: the fused .* disagrees .*SQNR"):
        reparameterize(nn.Sequential(BadBlock(3, 4, 3, padding=1)), _batch(1))


def test_models_without_reparameterizable_blocks_are_left_alone():
    from edgecv.compress.reparam import reparameterize

    model = _build("mobilenetv4_conv_small")
    assert reparameterize(model, _batch(1)) == (model, None)


# ------------------------------------------------------------------------------------------ INT8 graph
@pytest.mark.parametrize("name", ["mobilenetv4_conv_small", "efficientnet_lite0", "mobileone_s0"])
def test_no_float_batchnorm_in_the_int8_file(name, tmp_path):
    """BatchNormAct2d folds into the conv before it (46 float BatchNormalization in mobilenetv4_conv_small's
    INT8 graph before), MobileOne's branches are fused first; the fake-quant model still computes the
    float model's function before calibration (quantizers off)."""
    from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat, reparam_check
    from edgecv.compress.reparam import sqnr_db
    from edgecv.export.onnx import export_onnx

    model = _build(name)
    x = _batch()
    qmodel = prepare_qat(model, "onnxruntime", x[:1])
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 40
    assert (reparam_check(qmodel) is not None) == (name == "mobileone_s0")
    apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
    ops = _onnx_ops(export_onnx(qmodel.eval(), tmp_path / "model.int8.onnx", x[:1]))
    assert ops["Conv"] > 0 and ops["QuantizeLinear"] > 0
    assert ops["BatchNormalization"] == 0, ops


def test_a_float_batchnorm_after_a_conv_is_a_lint_finding(tmp_path, monkeypatch):
    """Without the BatchNormAct2d split (as before) every BatchNorm stays in float after its conv: the lint
    names each one, for every target; with it, none."""
    from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
    from edgecv.export.lint import inspect_onnx
    from edgecv.export.onnx import export_onnx

    model, x = _build("mobilenetv4_conv_small"), _batch()

    def int8_file(name: str):
        qmodel = prepare_qat(model, "onnxruntime", x[:1])
        apply_calibrator(qmodel, collect_stats(qmodel, [x]), "max")
        return export_onnx(qmodel.eval(), tmp_path / name, x[:1])

    monkeypatch.setattr("edgecv.compress.quantize.build.split_norm_act", lambda m: 0)
    unsplit = int8_file("unsplit.onnx")
    monkeypatch.undo()
    assert _onnx_ops(unsplit)["BatchNormalization"] == 46
    for target in ("onnxruntime", "tensorrt"):
        found = [v for v in inspect_onnx(unsplit, target)["violations"] if v.startswith("BatchNormalization")]
        assert len(found) == 46 and "after Conv" in found[0] and "not folded" in found[0]
    assert not [v for v in inspect_onnx(int8_file("split.onnx"), "onnxruntime")["violations"] if "BatchNorm" in v]


def test_batchnorm_act_split_keeps_the_activation_and_the_numbers():
    from timm.layers import BatchNormAct2d

    from edgecv.compress.quantize.norm_act import split_norm_act

    bn = BatchNormAct2d(8, act_layer=nn.ReLU6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn).eval()
    x = _batch(2)
    with torch.no_grad():
        before = model(x)
    assert split_norm_act(model) == 1
    assert type(model[1][0]) is nn.BatchNorm2d and isinstance(model[1][2], nn.ReLU6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


# ------------------------------------------------------------------------------------------ the CLI
def test_compress_a_timm_model_from_its_weights(tmp_path):
    """The README's command, made small (PTQ and export only): a timm checkpoint loads, the run's data section
    is the model's pretrained_cfg, and the INT8 file has no float BatchNormalization."""
    images = make_image_folder(tmp_path / "images", CLASSES, per_class=2, val_per_class=2)
    weights = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict_ema": _build("mobilenetv4_conv_small", classes=len(CLASSES)).state_dict()}, weights)
    section = (ROOT / "README.md").read_text().split("### A timm model", 1)[1].split("\n## ", 1)[0]
    assert [ln.strip() for ln in section.splitlines() if ln.strip().startswith("edgecv ")] == [README_COMMAND]
    args = README_COMMAND.replace("model_best.pth.tar", str(weights)).replace("my_images/", str(images)).split()[1:]
    sets = [f"data.image_size={SIZE}",
            "data.batch_size=4", "stages=[{ptq: {calib_batches: 1, compare: [max]}}, {export: {parity_samples: 4}}]", "bench.backends=[torch]",
            "bench.batch_sizes=[1]", "bench.warmup=0", "bench.runs=1", "bench.rounds=1"]
    proc = run_cli(*args, "--out", str(tmp_path / "runs"), "--device", "cpu", *[a for s in sets for a in ("--set", s)],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = tmp_path / "runs" / "deploy" / "export"
    meta = json.loads((export / "metadata.json").read_text())
    pre = timm.models.get_pretrained_cfg("mobilenetv4_conv_small")
    assert meta["data"]["interpolation"] == pre.interpolation and meta["data"]["mean"] == list(pre.mean)
    assert meta["data"]["resize_size"] == int(SIZE / pre.crop_pct)
    assert _onnx_ops(export / "model.int8.onnx")["BatchNormalization"] == 0


def test_compress_prunes_mobileone_after_fusing_it(tmp_path):
    """prune -> PTQ -> export of timm's MobileOne: fused before pruning (the stage's metrics say so), and the
    INT8 file has neither BatchNormalization nor the train-time branches (one Conv per fused conv)."""
    images = make_image_folder(tmp_path / "images", CLASSES, per_class=2, val_per_class=2)
    stages = ("stages=[{prune: {ratio: 0.25}}, {ptq: {calib_batches: 1, compare: [max]}}, "
              "{export: {parity_samples: 4}}]")
    sets = ["model.name=timm:mobileone_s0", f"data.image_size={SIZE}", "data.batch_size=4", stages,
            "bench.backends=[torch]", "bench.batch_sizes=[1]", "bench.warmup=0", "bench.runs=1", "bench.rounds=1"]
    proc = run_cli("compress", "deploy", "--data", str(images), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   *[a for s in sets for a in ("--set", s)], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "deploy"
    manifest = json.loads((run / "manifest.json").read_text())
    prune = next(e for e in manifest["stages"] if e["name"].endswith("prune"))
    assert prune["metrics"]["reparameterized"]["note"] == "fused before pruning"
    fused_convs = sum(isinstance(m, nn.Conv2d) for m in reparameterize_copy("mobileone_s0").modules())
    ops = _onnx_ops(run / "export" / "model.int8.onnx")
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == fused_convs


def reparameterize_copy(name: str) -> nn.Module:
    from edgecv.compress.reparam import reparameterize

    return reparameterize(_build(name), _batch(1))[0]


def test_compress_an_unknown_timm_name_is_one_line(tmp_path):
    images = make_image_folder(tmp_path / "images", CLASSES, per_class=1)
    proc = run_cli("compress", "deploy", "--set", "model.name=timm:efficientnet_lite00", "--data", str(images),
                   "--out", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: model.name: timm has no model 'efficientnet_lite00' (did you mean "
                     "'timm:efficientnet_lite0'?)"], proc.stderr
    assert not (tmp_path / "runs").exists()
