"""Recipes: bundled ones validate; mistakes give one line naming the key; overrides are typed."""

from __future__ import annotations

import json

import pytest
import yaml

from edgecv.bench.runners import RUNNERS
from edgecv.compress.prune import IMPORTANCES
from edgecv.compress.quantize import CALIBRATORS, PROFILES
from edgecv.config import apply_overrides
from edgecv.data.datasets import DATASETS
from edgecv.errors import EdgecvError
from edgecv.recipe import Recipe, dump_recipe, list_recipes, load_recipe, recipe_schema, validate
from edgecv.stages import listed_stages

BASE = {"name": "r", "model": {"name": "edgecv:resnet8"}}


@pytest.mark.parametrize("name", list_recipes())
def test_bundled_recipes_validate_and_round_trip(name):
    """The resolved dump validates and says the same again: what runs does not change."""
    recipe = load_recipe(name)
    text = dump_recipe(recipe)
    assert dump_recipe(validate(yaml.safe_load(text))) == text


def test_bundled_recipes_include_quickstart_and_imagenet():
    names = list_recipes()
    assert "quickstart" in names
    models = ("resnet18", "resnet50", "mobilenetv2", "mobilenetv3-large", "efficientnet-b0")
    assert {f"imagenet-{m}{v}" for m in models for v in ("", "-pretrained")} <= set(names)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**BASE, "trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
        ({**BASE, "train": {"lr": 0.1, "epochs": 1, "label_smothing": 0.1}},
         "unknown key 'train.label_smothing' (did you mean 'train.label_smoothing'?)"),
        ({**BASE, "stages": [{"prune": {"ratoi": 0.5}}]},
         "unknown key 'stages[0].prune.ratoi' (did you mean 'stages[0].prune.ratio'?)"),
        ({**BASE, "stages": [{"prnue": {"ratio": 0.5}}]}, "unknown stage 'prnue' (did you mean 'prune'?)"),
        ({**BASE, "stages": [{"prune": {"ratio": 1.5}}]}, "stages[0].prune.ratio: input should be less than 1"),
        ({**BASE, "stages": [{"prune": {"ratio": 0}}]}, "stages[0].prune.ratio: input should be greater than 0"),
        ({**BASE, "stages": [{"prune": {}}]}, "exactly one of 'ratio', 'target_macs' or 'target_latency_ms'"),
        ({**BASE, "train": {"optimizer": "adam"}}, "train.optimizer: input should be 'sgd', 'adamw' or 'rmsprop' (got 'adam')"),
        ({**BASE, "train": {"epochs": "many"}}, "train.epochs: input should be a valid integer"),
        ({**BASE, "stages": [{"qat": {"backend": "tflite"}}]},
         "stages[0].qat.backend: unknown quantization target 'tflite'; choose from: onnxruntime, tensorrt"),
        ({**BASE, "stages": [{"ptq": {"calibrator": "max", "compare": ["max"], "percentile": 99.9}}]},
         "percentile: only the 'percentile' calibrator takes it"),
        ({**BASE, "stages": [{"ptq": {"percentile": 101}}]}, "stages[0].ptq.percentile: input should be less than 100"),
        ({**BASE, "stages": [{"prune": {"ratio": 0.5, "taylor_batches": 2}}]},
         "stages[0].prune.taylor_batches was removed: importance taylor scores channels on 4 training batches"),
        ({**BASE, "stages": [{"prune": {"ratio": 0.5, "importance": "taylr"}}]},
         "unknown pruning importance 'taylr' (did you mean 'taylor'?)"),
        ({**BASE, "data": {"dataset": "fashion-mnist", "num_classes": 4}},
         "data.num_classes: the 'fashion-mnist' dataset does not take it"),
        ({**BASE, "data": {"dataset": "cifar"}}, "data.dataset: unknown dataset 'cifar'"),
        ({**BASE, "bench": {"backends": ["onnxruntime", "tflite"]}}, "bench.backends[1]: unknown bench backend 'tflite'"),
        ({**BASE, "stages": [{"ptq": {"skip_layers": "most:3"}}]}, "'auto:N'"),
        ({**BASE, "stages": [{"export": {}}, {"prune": {"ratio": 0.5}}]}, "'export' must be the last stage"),
        ({"name": "r"}, "missing key 'model'"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(raw, expected):
    with pytest.raises(EdgecvError) as err:
        validate(raw)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_overrides_are_typed_by_the_schema():
    raw = {**BASE, "stages": [{"prune": {"ratio": 0.5}}, {"finetune": {"epochs": 1}}]}
    apply_overrides(raw, ["train.epochs=3", "train.lr=0.05", "stages.prune.ratio=0.25", "stages.1.epochs=4",
                          "data.augment=false"])
    recipe = validate(raw)
    assert recipe.train.epochs == 3 and recipe.train.lr == 0.05
    assert recipe.stages[0].ratio == 0.25 and recipe.stages[1].epochs == 4
    assert recipe.data.augment is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs", "expected KEY=VALUE"),
        ("stages.quantize.epochs=1", "no stage named 'quantize'"),
        ("train.epochs=-1", "train.epochs: input should be greater than or equal to 0"),
        ("train.epochz=1", "unknown key 'train.epochz' (did you mean 'train.epochs'?)"),
    ],
)
def test_bad_overrides(override, expected):
    raw = {**BASE, "stages": [{"prune": {"ratio": 0.5}}]}
    with pytest.raises(EdgecvError, match=None) as err:
        validate(apply_overrides(raw, [override]))
    assert expected in str(err.value)


def test_recipe_files_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(EdgecvError, match="is empty"):
        load_recipe(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodel: {name: edgecv:resnet8\n")
    with pytest.raises(EdgecvError, match="YAML syntax error at line"):
        load_recipe(broken)
    with pytest.raises(EdgecvError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- just\n- a list\n")
    with pytest.raises(EdgecvError, match="expected a mapping"):
        load_recipe(scalar)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hacked']\nmodel: {name: edgecv:resnet8}\n")
    with pytest.raises(EdgecvError, match="YAML"):
        load_recipe(evil)


def test_schema_lists_every_stage():
    schema = recipe_schema()
    json.dumps(schema)
    stage_names = {next(iter(s["properties"])) for s in schema["properties"]["stages"]["items"]["oneOf"]}
    assert stage_names == set(listed_stages()) and "train" not in stage_names
    assert schema["additionalProperties"] is False


def _enum(schema: dict, definition: str, prop: str) -> list[str]:
    node = schema["$defs"][definition]["properties"][prop]
    node = node.get("items", node)
    return next(n["enum"] for n in [node, *node.get("anyOf", [])] if "enum" in n)


@pytest.mark.parametrize(
    "definition, prop, registry, extra",
    [
        ("DataConfig", "dataset", DATASETS, []),
        ("PruneStageConfig", "importance", IMPORTANCES, []),
        ("PTQConfig", "calibrator", CALIBRATORS, ["best"]),
        ("PTQConfig", "compare", CALIBRATORS, []),
        ("QATConfig", "backend", PROFILES, []),
        ("BenchConfig", "backends", RUNNERS, []),
    ],
)
def test_schema_choices_come_from_the_registries(definition, prop, registry, extra):
    assert _enum(recipe_schema(), definition, prop) == [*registry.names(), *extra]


def test_a_new_plug_in_is_one_edit(monkeypatch):
    """Registering an importance makes it valid in a recipe and lists it in the schema; nothing else."""
    monkeypatch.setitem(IMPORTANCES._entries, "my-criterion", IMPORTANCES.get("l1"))
    recipe = validate({**BASE, "stages": [{"prune": {"ratio": 0.5, "importance": "my-criterion"}}]})
    assert recipe.stages[0].importance == "my-criterion"
    assert "my-criterion" in _enum(recipe_schema(), "PruneStageConfig", "importance")


@pytest.mark.parametrize("stage", listed_stages())
def test_every_stage_config_has_defaults_or_says_what_it_needs(stage):
    raw = {**BASE, "stages": [{stage: {"ratio": 0.5} if stage == "prune" else {}}]}
    recipe = validate(raw)
    assert isinstance(recipe, Recipe)
    assert recipe.stages[0].stage == stage
