"""Runs a recipe: the baseline `train` stage, then the recipe's stages in order, then bench + report.

Each stage writes into its own folder of the run dir and is recorded in `manifest.json` with a
fingerprint of its configuration and of everything before it. Running the same recipe again skips the
stages whose fingerprint is unchanged and finished, and resumes a stage that was interrupted from its
last finished epoch.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.console import console
from edgecv.data import DataBundle, build_data
from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_text, write_json
from edgecv.recipe import Recipe, StageConfig, dump_recipe
from edgecv.train.checkpoint import load_model, save_model
from edgecv.train.distributed import DistInfo, barrier, init_distributed

MANIFEST = "manifest.json"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgecvError(f"--device {device}: no CUDA device is available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise EdgecvError(f"--device {device!r}: choose auto, cpu or cuda")
    return device


@dataclass
class StageContext:
    """What a stage may use besides its model and config."""

    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    index: int
    device: str
    data: DataBundle
    model_spec: dict
    outputs: dict[str, Path] = field(default_factory=dict)  # stage name -> model.pt of finished stages
    float_parent: Path | None = None  # the last float model (what INT8 is compared with)
    dist: DistInfo = field(default_factory=DistInfo)
    metrics: dict = field(default_factory=dict)

    def example_input(self) -> torch.Tensor:
        c, s = self.model_spec["in_channels"], self.model_spec["image_size"]
        return torch.zeros(1, c, s, s)

    @property
    def log_path(self) -> Path:
        return self.stage_dir / "log.jsonl"

    @property
    def state_path(self) -> Path:
        return self.stage_dir / "state.pt"

    def load(self, stage_or_path: str) -> nn.Module:
        """A finished stage's model ('baseline' is the trained baseline) or a checkpoint file."""
        key = "train" if stage_or_path == "baseline" else stage_or_path
        if key == "parent":
            if self.float_parent is None:
                raise EdgecvError("distill.teacher 'parent': no float model precedes this stage")
            return load_model(self.float_parent)[0]
        path = self.outputs.get(key) or Path(stage_or_path)
        return load_model(path)[0]


def model_spec(recipe: Recipe, data: DataBundle) -> dict:
    return {
        "name": recipe.model.name,
        "num_classes": data.num_classes,
        "in_channels": data.channels,
        "image_size": data.image_size,
        "width": recipe.model.width,
        "small_input_stem": recipe.model.small_input_stem,
        "stem_stride": recipe.model.stem_stride,
    }


def is_quantized(model: nn.Module) -> bool:
    from edgecv.compress.quantize import is_quantized as has_quantizers

    return has_quantizers(model)


class Pipeline:
    """Run a recipe into `out/<recipe name>/`."""

    def __init__(self, recipe: Recipe, out: Path, device: str = "auto", data_root: str | None = None) -> None:
        self.recipe = recipe
        self.device = resolve_device(device)
        # Denormal floats (tiny weights and activations late in training) slow CPU kernels up to 10x.
        torch.set_flush_denormal(True)
        self.dist = init_distributed(self.device)
        self.data_root = data_root
        self.run_dir = Path(out) / recipe.name
        self.manifest_path = self.run_dir / MANIFEST

    # ------------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict:
        if self.manifest_path.exists():
            try:
                return json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                console.print(f"[yellow]warning: {self.manifest_path} is unreadable; starting over[/]")
        return {"recipe": self.recipe.name, "stages": []}

    def _write_manifest(self, manifest: dict) -> None:
        if self.dist.is_main:
            write_json(self.manifest_path, manifest)

    def _preflight(self, only_train: bool) -> None:
        """Refuse up front what would only fail after hours of training."""
        import importlib.util

        wants_engine = any(s.tensorrt for s in self.recipe.stages if s.stage == "export")
        if wants_engine and not only_train and importlib.util.find_spec("tensorrt") is None:
            raise EdgecvError(
                "export.tensorrt is true but TensorRT is not installed here; build engines on the device "
                "(tools/jetson_setup.sh) or set export.tensorrt: false"
            )

    # ------------------------------------------------------------------ run
    def stage_list(self, until: str | None = None) -> list[tuple[str, StageConfig | Any]]:
        stages: list[tuple[str, Any]] = [("train", self.recipe.train)]
        stages += [(s.stage, s) for s in self.recipe.stages]
        if until is not None:
            names = [n for n, _ in stages]
            stages = stages[: names.index(until) + 1] if until in names else stages
        return stages

    def run(self, only_train: bool = False, report: bool = True, stop_before: tuple[str, ...] = ()) -> dict:
        from edgecv.stages import STAGES

        t_start = time.perf_counter()
        self._preflight(only_train)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "recipe.resolved.yaml", dump_recipe(self.recipe))
        data = build_data(self.recipe.data, self.data_root, seed=self.recipe.seed, rank=self.dist.rank,
                          world_size=self.dist.world_size)
        spec = model_spec(self.recipe, data)
        manifest = self._read_manifest()
        old = {e["dir"]: e for e in manifest.get("stages", [])}
        entries: list[dict] = []
        outputs: dict[str, Path] = {}
        float_parent: Path | None = None
        model: nn.Module | None = None
        previous = self.recipe.fingerprint(spec, self.recipe.data.model_dump(), self.recipe.seed)
        stages = self.stage_list("train" if only_train else None)
        for index, (name, cfg) in enumerate(stages):
            if name in stop_before:
                break
            stage_dir = self.run_dir / f"{index:02d}-{name}"
            fingerprint = self.recipe.fingerprint(previous, name, cfg.model_dump(mode="json"))
            previous = fingerprint
            entry = old.get(stage_dir.name)
            model_file = stage_dir / "model.pt"
            done = (
                entry is not None
                and entry.get("fingerprint") == fingerprint
                and entry.get("status") == "done"
                and (model_file.exists() or name == "export")
            )
            if done:
                console.print(f"[green]✓[/] {stage_dir.name}: finished earlier, skipped")
                entries.append(entry)
                if name != "export":
                    model = None  # loaded lazily below if a later stage needs it
                    outputs[name] = model_file
                    if not entry.get("quantized"):
                        float_parent = model_file
                continue
            if entry is not None and entry.get("fingerprint") != fingerprint and stage_dir.exists() and self.dist.is_main:
                shutil.rmtree(stage_dir)  # its config or an earlier stage changed: start it over
            if model is None and index > 0:
                prev_name = stages[index - 1][0]
                prev = outputs.get(prev_name) or outputs.get(next(reversed(outputs)))
                model = load_model(prev)[0]
            if self.dist.is_main:
                stage_dir.mkdir(parents=True, exist_ok=True)
            barrier(self.dist)
            entry = {"index": index, "name": name, "dir": stage_dir.name, "fingerprint": fingerprint,
                     "status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            entries.append(entry)
            self._write_manifest({"recipe": self.recipe.name, "stages": _keep_later(entries, old)})
            ctx = StageContext(self.recipe, self.run_dir, stage_dir, index, self.device, data, spec,
                               dict(outputs), float_parent, self.dist)
            console.rule(f"[bold]{stage_dir.name}")
            t0 = time.perf_counter()
            model = STAGES.get(name).run(model, cfg, ctx)
            wall = time.perf_counter() - t0
            entry.update(status="done", wall_s=round(wall, 2), metrics=ctx.metrics,
                         finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            if name != "export":
                from edgecv.compress.quantize import quant_spec

                quant = quant_spec(model) if is_quantized(model) else None
                entry["quantized"] = quant is not None
                if self.dist.is_main:
                    save_model(model_file, model, spec, quant,
                               meta={"stage": name, "recipe": self.recipe.name, "metrics": _scalar(ctx.metrics),
                                     "data": self.recipe.data.model_dump(mode="json")})
                outputs[name] = model_file
                if quant is None:
                    float_parent = model_file
            if self.dist.is_main:
                write_json(stage_dir / "metrics.json", ctx.metrics)
                ctx.state_path.unlink(missing_ok=True)  # training state is only needed until the stage is done
            self._write_manifest({"recipe": self.recipe.name, "stages": _keep_later(entries, old)})
            barrier(self.dist)
        # `train` and `sensitivity` stop early: the later stages an earlier run recorded stay in the manifest
        # (their fingerprints decide whether they are still valid); a full run records exactly the recipe
        partial = len(entries) < len(self.stage_list())
        manifest = {"recipe": self.recipe.name, "stages": _keep_later(entries, old) if partial else entries}
        self._write_manifest(manifest)
        result = {"run_dir": str(self.run_dir), "manifest": manifest, "outputs": outputs, "data": data, "spec": spec}
        if report and not only_train and self.dist.is_main:
            from edgecv.reporting import bench_and_report

            result["report"] = bench_and_report(self.recipe, self.run_dir, manifest, data, spec, self.device)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        return result


def _keep_later(entries: list[dict], old: dict[str, dict]) -> list[dict]:
    seen = {e["dir"] for e in entries}
    return entries + [e for d, e in sorted(old.items()) if d not in seen]


def _scalar(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
