"""Which recipe options the bundled recipes use (a test helper for tests/test_options.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from count_options import leaf_paths  # noqa: E402


def canonical(path: str) -> str:
    """One name per option: a stage's training keys are the `train` section's (`TrainOverrides`), the
    qat stage's quantization keys are ptq's (`QuantConfig`), and its distill keys are finetune's."""
    from edgecv.stages.quantize import QuantConfig
    from edgecv.train.config import TrainConfig

    parts = path.split(".")
    for prefix in (["stages", "finetune"], ["stages", "qat"], ["stages", "prune", "finetune_between"]):
        rest = parts[len(prefix):]
        if parts[: len(prefix)] == prefix and rest and rest[0] in TrainConfig.model_fields:
            return "train." + ".".join(rest)
    if parts[:2] == ["stages", "qat"] and parts[2] in QuantConfig.model_fields:
        return "stages.ptq." + ".".join(parts[2:])
    if parts[:3] == ["stages", "qat", "distill"]:
        return "stages.finetune." + ".".join(parts[2:])
    return path


def recipe_paths() -> set[str]:
    """Every key path written in a bundled recipe (stages as `stages.<name>.<key>`), canonical."""
    used: set[str] = set()

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{prefix}.{key}"
                used.add(canonical(path))
                walk(value, path)

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for section, body in raw.items():
            if section != "stages":
                used.add(section)
                walk(body, section)
                continue
            for item in body or []:
                ((name, stage_body),) = (item if isinstance(item, dict) else {item: {}}).items()
                walk(stage_body or {}, f"stages.{name}")
    return used


def options() -> list[str]:
    """The recipe's options, one canonical name each, in schema order."""
    return list(dict.fromkeys(canonical(p) for p in leaf_paths()))
