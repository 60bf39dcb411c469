"""The stage contract: a typed config, a context, and the registry every stage is listed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from edgecv.config import Strict
from edgecv.errors import EdgecvError
from edgecv.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from edgecv.data.datasets import DataBundle
    from edgecv.models.spec import ModelSpec
    from edgecv.train.distributed import DistInfo


class StageConfig(Strict):
    """Base of a stage's config; `stage` is the name it is registered under."""

    stage: ClassVar[str] = ""


@dataclass
class StageContext:
    """What a stage may use besides its model and config."""

    recipe: object  # edgecv.recipe.Recipe (recipe imports this package, so only its type is named here)
    run_dir: Path
    stage_dir: Path
    index: int
    device: str
    data: DataBundle
    spec: ModelSpec
    outputs: dict[str, Path] = field(default_factory=dict)  # stage name -> model.pt of finished stages
    float_parent: Path | None = None  # the last float model (what INT8 is compared with)
    dist: DistInfo | None = None
    metrics: dict = field(default_factory=dict)
    # INT8 against float timing for the verdict and `ship_precision: auto` (None: measured in ONNX Runtime;
    # see edgecv.stages.precision.TimePrecisions); a test gives one that returns chosen times
    time_precisions: Callable | None = None

    @property
    def log_path(self) -> Path:
        return self.stage_dir / "log.jsonl"

    @property
    def state_path(self) -> Path:
        return self.stage_dir / "state.pt"

    def load(self, stage_or_path: str) -> nn.Module:
        """A finished stage's model ('baseline' is the trained baseline, 'parent' the last float model) or
        a checkpoint file."""
        key = "train" if stage_or_path == "baseline" else stage_or_path
        if key == "parent":
            if self.float_parent is None:
                raise EdgecvError("distill.teacher 'parent': no float model precedes this stage")
            return load_model_from_main(self.float_parent, self.dist)
        return load_model_from_main(self.outputs.get(key) or Path(stage_or_path), self.dist)


def load_model_from_main(path: Path, dist: DistInfo | None) -> nn.Module:
    """`load_model(path)`, with the file read by rank 0 only and sent to the others under torchrun (the
    nodes of a multi-node job need not share the run dir)."""
    from edgecv.checkpoint import load_model, model_from_checkpoint, read_checkpoint

    if dist is None or not dist.enabled:
        return load_model(path)[0]
    from edgecv.train.distributed import broadcast_object

    ckpt = broadcast_object(read_checkpoint(path) if dist.is_main else None, dist)
    return model_from_checkpoint(ckpt, path)[0]


StageFn = Callable[["nn.Module | None", StageConfig, StageContext], "nn.Module"]


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[StageConfig]
    run: StageFn
    summary: str
    listed: bool = True  # False: not written in `stages:` (the baseline `train` has its own section)


STAGES: Registry[Stage] = Registry("stage")


def stage(config: type[StageConfig], summary: str, listed: bool = True) -> Callable[[StageFn], StageFn]:
    """Register the decorated function as the stage named `config.stage`."""

    def wrap(fn: StageFn) -> StageFn:
        STAGES.register(config.stage, Stage(config.stage, config, fn, summary, listed))
        return fn

    return wrap


def listed_stages() -> list[str]:
    """Stage names a recipe may list under `stages:`, in registry order."""
    return [name for name in STAGES.names() if STAGES.get(name).listed]
