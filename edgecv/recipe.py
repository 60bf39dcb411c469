"""Recipes: YAML -> a strict, typed `Recipe` (pydantic). Unknown keys and bad values are one-line errors.

A recipe has five sections: `data`, `model`, `train` (the baseline), `stages` (a list of `{name: {...}}`,
run in order after the baseline) and `bench`. Each section's type belongs to the package that uses it;
each stage's config is registered with the stage in `edgecv.stages.STAGES`. `--set a.b=value` overrides
are applied to the raw YAML before validation, so they are typed and checked exactly like the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_serializer, field_validator, model_validator

from edgecv.bench.config import BenchConfig
from edgecv.config import (
    RECIPES_DIR,
    Strict,
    apply_overrides,
    format_validation_error,
    list_recipes,
    load_raw,
    resolve_recipe_path,
)
from edgecv.data.config import DATASET_OPTIONS, DataConfig, dataset_registry
from edgecv.errors import EdgecvError
from edgecv.models.spec import ModelConfig
from edgecv.stages import STAGES, StageConfig, listed_stages
from edgecv.train.config import TrainConfig, TrainOverrides

__all__ = [
    "RECIPES_DIR",
    "Recipe",
    "dump_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_schema",
    "resolve_recipe_path",
    "validate",
]


def _parse_stage(i: int, item: Any) -> StageConfig:
    if isinstance(item, StageConfig):
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"stages[{i}] must be one {{name: {{...}}}} entry, got {item!r}")
    ((name, body),) = item.items()
    names = listed_stages()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"stages[{i}]: unknown stage {name!r}{hint}; choose from: {', '.join(names)}")
    try:
        return STAGES.get(name).config.model_validate(body or {})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=f"stages[{i}].{name}")) from None


class Recipe(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, value: Any) -> list[StageConfig]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError("stages must be a list of {name: {...}} entries")
        return [_parse_stage(i, item) for i, item in enumerate(value)]

    @field_serializer("stages")
    def _dump_stages(self, stages: list[StageConfig]) -> list[dict]:
        return [{s.stage: s.model_dump(mode="json")} for s in stages]

    @model_validator(mode="after")
    def _stage_order(self) -> Recipe:
        names = [s.stage for s in self.stages]
        if "export" in names and names.index("export") != len(names) - 1:
            raise ValueError("stages: 'export' must be the last stage")
        quant = [i for i, n in enumerate(names) if n in ("ptq", "qat")]
        for i in quant:
            if any(n in ("prune", "finetune", "surgery") for n in names[i + 1 :]):
                raise ValueError(f"stages: {names[i]!r} must come after prune, surgery and finetune")
        for s in self.stages:  # ptq / qat time INT8 against float at the smallest bench batch unless told
            if s.stage in ("ptq", "qat") and s.batch_size is None:
                s.__dict__["batch_size"] = min(self.bench.batch_sizes)
        return self

    def fingerprint(self, *parts: Any) -> str:
        payload = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise EdgecvError(f"{source}: {format_validation_error(exc)}") from None


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(spec)
    raw = apply_overrides(load_raw(path), overrides or [])
    return validate(raw, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default written out; a stage's training keys left out are shown with the
    values it trains with (taken from the `train` section), so the dump reads as what runs."""
    data = recipe.model_dump(mode="json")
    takes = set(getattr(dataset_registry().get(recipe.data.dataset), "options", ()))
    for key in set(DATASET_OPTIONS) - takes:  # options of other datasets (null here) are left out
        data["data"].pop(key, None)
    for stage, item in zip(recipe.stages, data["stages"], strict=True):
        body = item[stage.stage]
        if isinstance(stage, TrainOverrides):
            body.update(_training_keys(stage, recipe.train))
        between = getattr(stage, "finetune_between", None)
        if getattr(stage, "steps", 1) > 1:
            body["finetune_between"] = _training_keys(between or TrainOverrides(epochs=1), recipe.train)
    return yaml.safe_dump(data, sort_keys=False)


def _training_keys(overrides: TrainOverrides, train: TrainConfig) -> dict:
    merged = overrides.merged(train).model_dump(mode="json")
    return {k: v for k, v in merged.items() if k in type(overrides).model_fields}


def recipe_schema() -> dict:
    """JSON schema of a recipe, with each listed stage's own schema under `stages.items.oneOf`."""
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    one_of = []
    for name in listed_stages():
        cls = STAGES.get(name).config
        sub = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[cls.__name__] = sub
        one_of.append({
            "type": "object",
            "properties": {name: {"$ref": f"#/$defs/{cls.__name__}"}},
            "required": [name],
            "additionalProperties": False,
        })  # fmt: skip
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": one_of}}
    defs.pop("StageConfig", None)
    return schema
