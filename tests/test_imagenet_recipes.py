"""The bundled ImageNet recipes: each validates, states its expected top-1 and source, and runs one
training step on a generated ImageFolder of JPEG files (tiny images via --set); the pretrained variants
run with their weights replaced (nothing is downloaded in tests) and fail with one line when the
weights are neither cached nor downloadable."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from image_files import make_image_folder

from edgecv.recipe import RECIPES_DIR, list_recipes, load_recipe

IMAGENET = [name for name in list_recipes() if name.startswith("imagenet-")]
TINY_RUN = ["data.image_size=32", "data.batch_size=2", "data.eval_batch_size=4", "data.workers=0",
            "data.prefetch_factor=null", "data.limit_train=2", "data.limit_val=4", "train.epochs=1",
            "model.weights=null"]


def test_every_model_has_a_from_scratch_and_a_pretrained_recipe():
    models = {"resnet18", "resnet50", "mobilenetv2", "mobilenetv3-large", "efficientnet-b0"}
    assert set(IMAGENET) == {f"imagenet-{m}" for m in models} | {f"imagenet-{m}-pretrained" for m in models}
    for m in models:
        scratch, pretrained = load_recipe(f"imagenet-{m}"), load_recipe(f"imagenet-{m}-pretrained")
        assert scratch.model.weights is None and scratch.train.epochs >= 90
        assert pretrained.model.weights and pretrained.train.epochs == 0
        assert scratch.model.name == pretrained.model.name and scratch.stages == pretrained.stages


@pytest.mark.parametrize("name", IMAGENET)
def test_recipe_states_its_expected_top1_and_source(name):
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    header = text.split("\nname:")[0]
    assert "Expected baseline top-1: " in header and " %" in header
    assert ("torchvision" in header and ("README" in header or "meta" in header)) or "timm" in header


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet") / "img", classes=("a", "b"), per_class=2,
                             size=(40, 48))


@pytest.mark.parametrize("name", IMAGENET)
def test_recipe_runs_one_step_on_jpeg_files(name, imagenet_like, tmp_path):
    """The recipe with tiny sizes (--set, validated like the file) trains one step (in this process: the
    CLI path is the same Pipeline, run as a subprocess by the test below and by test_cli)."""
    from edgecv.pipeline import Pipeline

    recipe = load_recipe(name, TINY_RUN)
    result = Pipeline(recipe, tmp_path / "runs", "cpu", str(imagenet_like)).run(only_train=True)
    assert (tmp_path / "runs" / name / "00-train" / "model.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "runs" / name / "00-train" / "log.jsonl").read_text().splitlines()]
    start = next(e for e in log if e["event"] == "start")
    assert start["steps_per_epoch"] == 1 and start["global_batch"] == 2
    assert next(e for e in log if e["event"] == "epoch")["epoch"] == 1
    assert result["manifest"]["stages"][0]["status"] == "done"


NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
              "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


@pytest.mark.parametrize("name", [n for n in IMAGENET if n.endswith("-pretrained")])
def test_pretrained_weights_missing_without_network_is_one_error(name, tmp_path, monkeypatch):
    """An empty torch hub cache and no way out (a proxy on a closed port): an error naming the weights and
    the file the cache lacks; nothing is left in the cache."""
    from edgecv.errors import EdgecvError
    from edgecv.models import build_model

    for key, value in {"TORCH_HOME": str(tmp_path / "torch"), **NO_NETWORK}.items():
        monkeypatch.setenv(key, value)
    recipe = load_recipe(name)
    with pytest.raises(EdgecvError) as err:
        build_model(recipe.model.name, 2, 3, 32, weights=recipe.model.weights)
    message = str(err.value)
    assert message.startswith(f"model.weights '{recipe.model.weights}' of {recipe.model.name}") and "\n" not in message
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}" in message and "torch hub cache" in message
    assert not any(f.is_file() for f in (tmp_path / "torch").rglob("*"))


def test_pretrained_recipe_without_weights_or_network_is_one_cli_line(imagenet_like, tmp_path):
    args = [a for s in TINY_RUN[:-1] for a in ("--set", s)]
    proc = run_cli("train", "imagenet-resnet18-pretrained", "--data", str(imagenet_like), "--out",
                   str(tmp_path / "runs"), "--device", "cpu", *args,
                   env={"TORCH_HOME": str(tmp_path / "torch"), **NO_NETWORK})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model.weights 'IMAGENET1K_V1' of torchvision:resnet18") and "download" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in IMAGENET if n.endswith("-pretrained")])
def test_pretrained_recipe_compresses_end_to_end(name, imagenet_like, tmp_path):
    """Every stage of the recipe (prune, fine-tune, PTQ/QAT, export, bench, report) on tiny sizes, the
    weights replaced by random ones (1.5-4 min each on 2 cores)."""
    short = ["stages.finetune.epochs=1", "stages.qat.epochs=1", "stages.qat.calib_batches=2",
             "stages.export.parity_samples=8", "bench.batch_sizes=[1]", "bench.runs=3", "bench.warmup=1",
             "bench.rounds=1"]
    recipe = load_recipe(name)
    if any(s.stage == "ptq" for s in recipe.stages):
        short += ["stages.ptq.calib_batches=2", "stages.ptq.compare=[max,percentile]"]
    args = [a for s in [*TINY_RUN[:-2], "model.weights=null", *short] for a in ("--set", s)]
    proc = run_cli("compress", name, "--data", str(imagenet_like), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   *args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (tmp_path / "runs" / name / "export" / "model.int8.onnx").is_file()
    assert (tmp_path / "runs" / name / "report.json").is_file()
