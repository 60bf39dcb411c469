"""Recipes: YAML -> a strict, typed `Recipe` (pydantic). Unknown keys and bad values are one-line errors.

A recipe has five sections: `data`, `model`, `train` (the baseline), `stages` (a list of `{name: {...}}`,
run in order after the baseline) and `bench`. `--set a.b=value` overrides are applied to the raw YAML
before validation, so they are typed and checked exactly like the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgecv.errors import EdgecvError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors with a suggestion."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), fields, n=1)
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {key!r}; valid keys: {valid}",
                        {"key": str(key), "close": close[0] if close else "", "valid": ", ".join(fields)},
                    )
        return data


# --------------------------------------------------------------------------- data, model, train, bench


class DataConfig(Strict):
    dataset: Literal["fashion-mnist", "imagefolder", "synthetic"] = "fashion-mnist"
    root: str | None = Field(None, description="dataset folder; --data or $EDGECV_DATA override it")
    image_size: int = Field(28, ge=8, le=1024)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    workers: int = Field(0, ge=0, description="DataLoader worker processes (image folders)")
    augment: bool = True
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images")
    limit_val: int | None = Field(None, ge=1, description="use only the first N validation images")
    # synthetic only
    num_classes: int = Field(10, ge=2, description="synthetic: number of classes")
    channels: int = Field(3, ge=1, le=4, description="synthetic: image channels")
    train_size: int = Field(512, ge=1, description="synthetic: training images")
    val_size: int = Field(256, ge=1, description="synthetic: validation images")


class ModelConfig(Strict):
    name: str = Field(..., description="torchvision:<builder> | edgecv:<name> | package.module:factory")
    weights: str | None = Field(None, description="torchvision weights enum name, e.g. IMAGENET1K_V1")
    width: int | None = Field(None, ge=1, description="edgecv nets: width of the first stage")
    stem_stride: int | None = Field(None, ge=1, le=4, description="edgecv nets: stride of the first conv")
    small_input_stem: bool | None = Field(None, description="3x3 stride-1 stem; default: image_size < 64")


class DistillConfig(Strict):
    teacher: str = Field("baseline", description="'baseline' (the trained baseline) or a checkpoint path")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the distillation loss")
    temperature: float = Field(4.0, gt=0.0)


class TrainConfig(Strict):
    epochs: int = Field(8, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0.0)


class FinetuneOverrides(Strict):
    """Training settings of a later stage; a key left out is taken from the recipe's `train` section."""

    epochs: int = Field(2, ge=0)
    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = Field(None, gt=0.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0.0)
    schedule: Literal["cosine", "onecycle", "constant"] | None = None
    warmup_epochs: float | None = Field(None, ge=0.0)
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0)
    amp: bool | None = None
    grad_clip: float | None = Field(None, gt=0.0)
    distill: DistillConfig | None = None

    def merged(self, base: TrainConfig) -> TrainConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in TrainConfig.model_fields and v is not None}
        return base.model_copy(update=fields)


class BenchConfig(Strict):
    backends: list[Literal["torch", "onnxruntime", "tensorrt"]] = ["torch", "onnxruntime"]
    batch_sizes: list[int] = Field([1, 64], min_length=1)
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    rounds: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    eval_limit: int | None = Field(None, ge=1, description="evaluate accuracy on the first N validation images")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return sorted(set(v))


# --------------------------------------------------------------------------- stages


class StageConfig(Strict):
    stage: ClassVar[str] = ""


class PruneConfig(StageConfig):
    stage: ClassVar[str] = "prune"
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of channels removed")
    target_macs: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of MACs kept")
    importance: Literal["l1", "l2", "taylor", "random"] = "l2"
    iterative_steps: int = Field(1, ge=1)
    ignore: list[str] = Field(default_factory=list, description="module names never pruned")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    global_pruning: bool = False
    taylor_batches: int = Field(4, ge=1, description="batches used to score channels (taylor)")

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError("prune needs exactly one of 'ratio' or 'target_macs'")
        return self


class FinetuneConfig(FinetuneOverrides, StageConfig):
    stage: ClassVar[str] = "finetune"


Calibrator = Literal["max", "percentile", "mse", "entropy"]
Target = Literal["onnxruntime", "tensorrt"]


class QuantCommon(Strict):
    target: Target = "onnxruntime"
    calibrator: Calibrator = "max"
    percentile: float = Field(99.99, gt=50.0, lt=100.0)
    calib_batches: int = Field(8, ge=1)
    skip_layers: list[str] | str = Field(
        default_factory=list, description="layers kept in float: names, or 'auto:N' (N most sensitive)"
    )

    @field_validator("skip_layers")
    @classmethod
    def _auto(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            head, _, n = v.partition(":")
            if head != "auto" or not n.isdigit():
                raise ValueError(f"skip_layers must be a list of layer names or 'auto:N', got {v!r}")
        return v


class PTQConfig(QuantCommon, StageConfig):
    stage: ClassVar[str] = "ptq"
    compare: list[Calibrator] = Field(
        default_factory=lambda: ["max", "percentile", "mse", "entropy"],
        description="calibrators evaluated and reported; the best one is kept when calibrator is 'best'",
    )
    calibrator: Calibrator | Literal["best"] = "best"


class QATConfig(QuantCommon, FinetuneOverrides, StageConfig):
    stage: ClassVar[str] = "qat"
    epochs: int = Field(1, ge=0)
    learnable_ranges: bool = True
    freeze_bn_epoch: int | None = Field(
        None, ge=0, description="fold BatchNorm / freeze its statistics from this epoch; None: from the start"
    )


class ExportConfig(StageConfig):
    stage: ClassVar[str] = "export"
    opset: int = Field(17, ge=13, le=21)
    dynamic_batch: bool = True
    parity_samples: int = Field(512, ge=1)
    tensorrt: bool = Field(False, description="also build a TensorRT engine (needs TensorRT on this machine)")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    c.stage: c for c in (PruneConfig, FinetuneConfig, PTQConfig, QATConfig, ExportConfig)
}


# --------------------------------------------------------------------------- recipe


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
        parsed: list[StageConfig] = []
        for i, item in enumerate(value):
            if isinstance(item, StageConfig):
                parsed.append(item)
                continue
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"stages[{i}] must be one {{name: {{...}}}} entry, got {item!r}")
            (name, body), = item.items()
            if name not in STAGE_CONFIGS:
                close = difflib.get_close_matches(str(name), list(STAGE_CONFIGS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"stages[{i}]: unknown stage {name!r}{hint}; choose from: {', '.join(STAGE_CONFIGS)}"
                )
            try:
                parsed.append(STAGE_CONFIGS[name].model_validate(body or {}))
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, prefix=f"stages[{i}].{name}")) from None
        return parsed

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
            if any(n in ("prune", "finetune") for n in names[i + 1 :]):
                raise ValueError(f"stages: {names[i]!r} must come after prune and finetune")
        return self

    def fingerprint(self, *parts: Any) -> str:
        payload = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple, prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, joined with '; ' so the CLI prints a single line."""
    messages = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        where = _loc(loc, prefix)
        msg = err["msg"]
        etype = err["type"]
        if etype == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not where:
                messages.append(msg)
                continue
            if where == "stages":  # already formatted by Recipe._parse_stages
                messages.append(msg)
                continue
        if etype == "unknown_key":
            ctx = err.get("ctx", {})
            key, close = ctx.get("key", ""), ctx.get("close", "")
            full = f"{where}.{key}" if where else key
            hint = f" (did you mean {(f'{where}.{close}' if where else close)!r}?)" if close else ""
            messages.append(f"unknown key {full!r}{hint}; valid keys there: {ctx.get('valid', '')}")
            continue
        if etype == "missing":
            messages.append(f"missing key {where!r}")
            continue
        got = err.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) and "input" in err else ""
        text = f"{msg[0].lower() + msg[1:] if msg else msg}{got_s}"
        messages.append(f"{where}: {text}" if where else text)
    return "; ".join(messages)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise EdgecvError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise EdgecvError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to the raw recipe dict. `stages.<i|name>.key=value` reaches a stage."""
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, ".".join(path[: i + 1]))
                continue
            if not isinstance(node, dict):
                raise EdgecvError(f"--set {text!r}: {'.'.join(path[:i])!r} is not a section")
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            raise EdgecvError(f"--set {text!r}: give a key inside the stage, e.g. stages.prune.ratio=0.3")
        if not isinstance(node, dict):
            raise EdgecvError(f"--set {text!r}: {'.'.join(path[:-1])!r} is not a section")
        node[last] = value
    return raw


def _list_item(items: list, part: str, where: str) -> Any:
    if part.isdigit():
        idx = int(part)
        if idx >= len(items):
            raise EdgecvError(f"--set: {where!r}: there are only {len(items)} stages")
        item = items[idx]
    else:
        matches = [it for it in items if isinstance(it, dict) and part in it]
        if len(matches) != 1:
            names = [next(iter(it)) for it in items if isinstance(it, dict) and it]
            raise EdgecvError(
                f"--set: {where!r}: {'no' if not matches else 'more than one'} stage named {part!r} "
                f"(stages: {', '.join(names) or 'none'}); use its index, e.g. stages.0.ratio"
            )
        item = matches[0]
    if isinstance(item, dict) and len(item) == 1:
        (name, body), = item.items()
        if body is None:
            item[name] = body = {}
        return body
    return item


def resolve_recipe_path(spec: str | Path) -> Path:
    """A recipe is a file path, or the name of a bundled recipe (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise EdgecvError(f"recipe {str(spec)!r} is a folder, not a YAML file")
        return path
    bundled = RECIPES_DIR / f"{spec}.yaml"
    if path.suffix == "" and bundled.exists():
        return bundled
    raise EdgecvError(
        f"recipe {str(spec)!r} not found (bundled recipes: {', '.join(list_recipes()) or 'none'})"
    )


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def load_raw(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgecvError(f"recipe {str(path)!r}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EdgecvError(f"recipe {str(path)!r}: YAML syntax error at{where}: {problem}") from None
    if raw is None:
        raise EdgecvError(f"recipe {str(path)!r} is empty")
    if not isinstance(raw, dict):
        raise EdgecvError(f"recipe {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


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
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema() -> dict:
    """JSON schema of a recipe, with each stage's own schema under `stages.items.oneOf`."""
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    one_of = []
    for name, cls in STAGE_CONFIGS.items():
        sub = cls.model_json_schema(ref_template="#/$defs/{model}")
        for k, v in sub.pop("$defs", {}).items():
            defs[k] = v
        defs[cls.__name__] = sub
        one_of.append(
            {
                "type": "object",
                "properties": {name: {"$ref": f"#/$defs/{cls.__name__}"}},
                "required": [name],
                "additionalProperties": False,
            }
        )
    schema["properties"]["stages"] = {"type": "array", "items": {"oneOf": one_of}}
    defs.pop("StageConfig", None)
    return schema
