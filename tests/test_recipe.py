"""Recipes: bundled ones validate; mistakes give one line naming the key; overrides are typed."""

from __future__ import annotations

import json

import pytest
import yaml

from edgecv.errors import EdgecvError
from edgecv.recipe import (
    STAGE_CONFIGS,
    Recipe,
    apply_overrides,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_schema,
    validate,
)

BASE = {"name": "r", "model": {"name": "edgecv:resnet8"}}


@pytest.mark.parametrize("name", list_recipes())
def test_bundled_recipes_validate_and_round_trip(name):
    recipe = load_recipe(name)
    again = validate(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_bundled_recipes_include_quickstart_and_imagenet():
    names = list_recipes()
    assert "quickstart" in names
    assert {"imagenet-resnet18", "imagenet-mobilenetv2"} <= set(names)


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
        ({**BASE, "stages": [{"prune": {}}]}, "exactly one of 'ratio' or 'target_macs'"),
        ({**BASE, "train": {"optimizer": "adam"}}, "train.optimizer: input should be 'sgd' or 'adamw' (got 'adam')"),
        ({**BASE, "train": {"epochs": "many"}}, "train.epochs: input should be a valid integer"),
        ({**BASE, "stages": [{"qat": {"target": "tflite"}}]}, "'onnxruntime' or 'tensorrt' (got 'tflite')"),
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
    assert stage_names == set(STAGE_CONFIGS)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_stage_config_has_defaults_or_says_what_it_needs(stage):
    raw = {**BASE, "stages": [{stage: {"ratio": 0.5} if stage == "prune" else {}}]}
    recipe = validate(raw)
    assert isinstance(recipe, Recipe)
    assert recipe.stages[0].stage == stage
