"""Pipeline stages. Each is a plain function `run(model, cfg, ctx) -> model` registered by name together
with its typed config class, so the registry is the only list of stages: the recipe's `stages:` entries,
the JSON schema and the tests all come from `STAGES`.
"""

from __future__ import annotations

from edgecv.stages import export, prune, quantize, surgery, train  # noqa: F401  (importing a module registers its stages)
from edgecv.stages.base import STAGES, Stage, StageConfig, StageContext, listed_stages, stage

__all__ = ["STAGES", "Stage", "StageConfig", "StageContext", "listed_stages", "stage"]
