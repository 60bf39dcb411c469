"""Runs a recipe: the baseline `train` stage, then the recipe's stages in order, then bench + report.

Each stage writes into its own folder of the run dir and is recorded in `manifest.json` with a
fingerprint of its configuration and of everything before it. Running the same recipe again skips the
stages whose fingerprint is unchanged and finished, and resumes a stage that was interrupted from its
last finished epoch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.checkpoint import save_model
from edgecv.compress.quantize import is_quantized
from edgecv.console import console, err_console
from edgecv.data.datasets import DataBundle, build_data
from edgecv.data.transforms import with_weights_preprocessing
from edgecv.device import resolve_device
from edgecv.errors import EdgecvError
from edgecv.io import atomic_write_text, describe_holder, lock_run_dir, unlock_run_dir, write_json
from edgecv.models.spec import ModelSpec
from edgecv.models.user_weights import file_digest, is_weights_file
from edgecv.recipe import Recipe, dump_recipe
from edgecv.stages import STAGES, StageContext
from edgecv.stages.base import load_model_from_main
from edgecv.train.distributed import DistInfo, barrier, broadcast_object, init_distributed

MANIFEST = "manifest.json"


def model_spec(recipe: Recipe, data: DataBundle) -> ModelSpec:
    """The recipe's model, sized for its data; a model from a weights file keeps its builder's own stem."""
    m = recipe.model
    stem = False if m.small_input_stem is None and is_weights_file(m.weights) else m.small_input_stem
    return ModelSpec(name=m.name, num_classes=data.num_classes, in_channels=data.channels,
                     image_size=data.image_size, width=m.width, stem_stride=m.stem_stride,
                     small_input_stem=stem, mean=tuple(data.mean) or None, std=tuple(data.std) or None,
                     class_names=tuple(data.class_names) or None)


@dataclass
class RunState:
    """What the stages loop carries from one stage to the next."""

    entries: list[dict] = field(default_factory=list)  # manifest entries of this run, in order
    outputs: dict[str, Path] = field(default_factory=dict)  # stage name -> its model.pt
    float_parent: Path | None = None
    model: nn.Module | None = None  # the previous stage's model, when it is in memory
    previous: str = ""  # fingerprint of everything so far


class Pipeline:
    """Run a recipe into `out/<recipe name>/`."""

    def __init__(self, recipe: Recipe, out: Path, device: str = "auto", data_root: str | None = None,
                 time_precisions: Callable | None = None) -> None:
        # a model that starts from torchvision weights is fed as those weights were trained (resize,
        # interpolation, mean/std), unless the recipe says otherwise; the resolved recipe records it
        named = None if is_weights_file(recipe.model.weights) else recipe.model.weights  # a file has no preset
        data = with_weights_preprocessing(recipe.data, recipe.model.name, named)
        self.recipe = recipe if data is recipe.data else recipe.model_copy(update={"data": data})
        self.device = resolve_device(device)
        # Denormal floats (tiny weights and activations late in training) slow CPU kernels up to 10x.
        torch.set_flush_denormal(True)
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.backend == "nccl":
            self.device = self.dist.device  # this process's own GPU (cuda:LOCAL_RANK)
        if not self.dist.is_main:
            console.quiet = True  # one report of progress, from rank 0; errors still go to stderr
        self.data_root = data_root
        self.run_dir = Path(out) / recipe.name
        self.manifest_path = self.run_dir / MANIFEST
        self.time_precisions = time_precisions  # INT8 vs float timing (None: ONNX Runtime; tests inject one)
        self._locked = False

    # ------------------------------------------------------------------ one writer per run dir
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run dir's lock for the block (nested blocks share it): a second run into a run dir in
        use is refused in one line; a stale lock left by a killed run is taken over, with a warning. Rank 0
        holds it under torchrun. Released on return, on an error and on Ctrl-C."""
        if self._locked:
            yield
            return
        created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]  # deepest first
        fd = self._take_lock()
        self._locked = True
        try:
            yield
        finally:
            self._locked = False
            if fd is not None:
                unlock_run_dir(self.run_dir, fd)
                for folder in created:  # refused before anything was written (preflight): none left behind
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()

    def _take_lock(self) -> int | None:
        """The lock's file descriptor on rank 0 (None on the others); every rank raises if it is held."""
        fd = stale = error = None
        if self.dist.is_main:
            try:
                fd, stale = lock_run_dir(self.run_dir, "edgecv " + shlex.join(sys.argv[1:]))
            except EdgecvError as exc:
                error = str(exc)
        error = broadcast_object(error, self.dist)
        if error:
            raise EdgecvError(error)
        if stale:
            err_console.print(f"warning: run dir {self.run_dir} was left locked by {describe_holder(stale)}, "
                              "which is no longer running; taking its lock over", markup=False, soft_wrap=True)
        return fd

    # ------------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict:
        if self.manifest_path.exists():
            try:
                return json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                console.print(f"[yellow]warning: {self.manifest_path} is unreadable; starting over[/]")
        return {"recipe": self.recipe.name, "stages": []}

    def _write_manifest(self, stages: list[dict]) -> None:
        if self.dist.is_main:
            write_json(self.manifest_path, {"recipe": self.recipe.name, "stages": stages})

    def _preflight(self, only_train: bool) -> None:
        """Refuse up front what would only fail after hours of training."""
        wants_engine = any(getattr(s, "build_engine", False) for s in self.recipe.stages if s.stage == "export")
        if wants_engine and not only_train and importlib.util.find_spec("tensorrt") is None:
            raise EdgecvError(
                "export.build_engine is true but TensorRT is not installed here; build engines on the device "
                "(tools/jetson_setup.sh) or set export.build_engine: false"
            )

    def stage_list(self, until: str | None = None) -> list[tuple[str, Any]]:
        stages: list[tuple[str, Any]] = [("train", self.recipe.train)]
        stages += [(s.stage, s) for s in self.recipe.stages]
        names = [n for n, _ in stages]
        return stages[: names.index(until) + 1] if until in names else stages

    # ------------------------------------------------------------------ run
    def run(self, only_train: bool = False, report: bool = True, stop_before: tuple[str, ...] = ()) -> dict:
        """Run the stages (all, the baseline only, or up to `stop_before`), then bench + report, holding the
        run dir's lock."""
        with self.locked():
            return self._run(only_train, report, stop_before)

    def _run(self, only_train: bool, report: bool, stop_before: tuple[str, ...]) -> dict:
        t_start = time.perf_counter()
        self._preflight(only_train)
        data = build_data(self.recipe.data, self.data_root, seed=self.recipe.seed, rank=self.dist.rank,
                          world_size=self.dist.world_size, device=self.device)
        spec = model_spec(self.recipe, data)
        weights = self.recipe.model.weights
        # before anything is written: the weights file is read and checked against the model here
        preflight_model(spec, [] if only_train else list(self.recipe.stages), weights, self.recipe.model.head)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "recipe.resolved.yaml", dump_recipe(self.recipe))
        manifest = broadcast_object(self._read_manifest() if self.dist.is_main else None, self.dist)
        old = {e["dir"]: e for e in manifest.get("stages", [])}
        # the model section (weights, head) and a weights file's content: a retrained file starts over
        model = {**self.recipe.model.model_dump(), "sha256": file_digest(weights) if is_weights_file(weights) else None}
        state = RunState(previous=self.recipe.fingerprint(spec.to_dict(), self.recipe.data.model_dump(),
                                                          self.recipe.seed, model))
        stages = self.stage_list("train" if only_train else None)
        for index, (name, cfg) in enumerate(stages):
            if name in stop_before:
                break
            self._run_stage(index, name, cfg, stages, state, old, data, spec)
        # `train` and `sensitivity` stop early: the later stages an earlier run recorded stay in the manifest
        # (their fingerprints decide whether they are still valid); a full run records exactly the recipe
        partial = len(state.entries) < len(self.stage_list())
        manifest = {"recipe": self.recipe.name, "stages": _keep_later(state.entries, old) if partial else state.entries}
        self._write_manifest(manifest["stages"])
        result = {"run_dir": str(self.run_dir), "manifest": manifest, "outputs": state.outputs, "data": data,
                  "spec": spec}
        if report and not only_train and self.dist.is_main:
            from edgecv.run_report import report_run

            result["report"] = report_run(self.recipe, self.run_dir, manifest, data, spec, self.device)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        return result

    def _run_stage(self, index: int, name: str, cfg: Any, stages: list, state: RunState, old: dict,
                   data: DataBundle, spec: ModelSpec) -> None:
        stage_dir = self.run_dir / f"{index:02d}-{name}"
        fingerprint = self.recipe.fingerprint(state.previous, name, cfg.model_dump(mode="json"))
        state.previous = fingerprint
        entry = old.get(stage_dir.name)
        finished = _finished(entry, fingerprint, stage_dir, name) if self.dist.is_main else None
        if broadcast_object(finished, self.dist):  # rank 0 looks at the files
            console.print(f"[green]✓[/] {stage_dir.name}: finished earlier, skipped")
            state.entries.append(entry)
            if name != "export":
                state.model = None  # loaded lazily if a later stage needs it
                state.outputs[name] = stage_dir / "model.pt"
                if not entry.get("quantized"):
                    state.float_parent = stage_dir / "model.pt"
            return
        if entry is not None and entry.get("fingerprint") != fingerprint and stage_dir.exists() and self.dist.is_main:
            shutil.rmtree(stage_dir)  # its config or an earlier stage changed: start it over
        if state.model is None and index > 0:
            previous = state.outputs.get(stages[index - 1][0]) or next(reversed(state.outputs.values()))
            state.model = load_model_from_main(previous, self.dist)
        if self.dist.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        entry = {"index": index, "name": name, "dir": stage_dir.name, "fingerprint": fingerprint,
                 "status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        state.entries.append(entry)
        self._write_manifest(_keep_later(state.entries, old))
        ctx = StageContext(self.recipe, self.run_dir, stage_dir, index, self.device, data, spec,
                           dict(state.outputs), state.float_parent, self.dist,
                           time_precisions=self.time_precisions)
        console.rule(f"[bold]{stage_dir.name}")
        t0 = time.perf_counter()
        state.model = STAGES.get(name).run(state.model, cfg, ctx)
        check_class_outputs(state.model, spec, f"stage {name!r}")
        entry.update(status="done", wall_s=round(time.perf_counter() - t0, 2), metrics=ctx.metrics,
                     finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if name != "export":
            self._save_stage_model(state, entry, stage_dir, name, spec, ctx.metrics)
        if self.dist.is_main:
            write_json(stage_dir / "metrics.json", ctx.metrics)
            ctx.state_path.unlink(missing_ok=True)  # training state is only needed until the stage is done
        self._write_manifest(_keep_later(state.entries, old))
        barrier(self.dist)

    def _save_stage_model(self, state: RunState, entry: dict, stage_dir: Path, name: str, spec: ModelSpec,
                          metrics: dict) -> None:
        model_file = stage_dir / "model.pt"
        entry["quantized"] = is_quantized(state.model)
        if self.dist.is_main:
            save_model(model_file, state.model, spec,
                       meta={"stage": name, "recipe": self.recipe.name, "metrics": _scalar(metrics),
                             "data": self.recipe.data.model_dump(mode="json")})
        state.outputs[name] = model_file
        if not entry["quantized"]:
            state.float_parent = model_file


def check_class_outputs(model: nn.Module, spec: ModelSpec, what: str, training_too: bool = False) -> None:
    """`model` in eval mode (and in training mode with `training_too`: it changes BatchNorm statistics)
    returns one tensor of spec.num_classes scores per image; anything else is refused here rather than
    trained or exported."""
    param = next(model.parameters(), None)
    x = spec.example_input(2).to(param.device if param is not None else "cpu")
    was_training = model.training
    try:
        with torch.no_grad():
            outputs = [model.eval()(x)] + ([model.train()(x)] if training_too else [])
    except EdgecvError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that does not run at this size, for one
        size = f"{spec.in_channels}x{spec.image_size}x{spec.image_size}"
        raise EdgecvError(f"{what} ({spec.name}) does not run on {size} inputs "
                          f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]})") from None
    finally:
        model.train(was_training)
    for out in outputs:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != (2, spec.num_classes):
            raise EdgecvError(f"{what} ({spec.name}) returns {shape} for 2 images, not 2 x {spec.num_classes} "
                              "class scores: its classifier was not adapted to the dataset's classes")


def preflight_model(spec: ModelSpec, stages: list, weights: str | None = None, head: str = "keep") -> None:
    """Walk a fresh model through what the recipe's stages will do to it (its head, the pruning graph, the
    fake-quant trace, ONNX export at the recipe's resolution and one ONNX Runtime run of the INT8 file), so
    that a model that cannot go through a stage is refused in one line before any training. A weights file
    is loaded into it (named weights are not: they may need a download)."""
    import tempfile

    from edgecv.models import build_model

    file = weights if is_weights_file(weights) else None
    model = build_model(spec.name, weights=file, head=head if file else "keep", **spec.build_kwargs())
    check_class_outputs(model, spec, "the model", training_too=True)
    example = spec.example_input()
    names = [s.stage for s in stages]
    with tempfile.TemporaryDirectory(prefix="edgecv-preflight-") as tmp:
        for i, cfg in enumerate(stages):
            where = f"stages[{i}].{cfg.stage}"
            try:
                if cfg.stage == "prune":
                    from edgecv.compress.prune import analyse

                    analyse(model, cfg, example)
                elif cfg.stage in ("ptq", "qat") and "export" in names:
                    _int8_preflight(model, cfg.backend, example, Path(tmp))
                elif cfg.stage == "export":
                    from edgecv.export.onnx import export_onnx

                    export_onnx(model, Path(tmp) / "model.onnx", example)
            except EdgecvError as exc:
                inner = str(exc)
                for step in ("prune: ", "quantize: ", "export: "):
                    inner = inner.removeprefix(step)
                raise EdgecvError(f"{where}: {inner} (model {spec.name}, checked before training)") from None


def _int8_preflight(model: nn.Module, target: str, example: torch.Tensor, tmp: Path) -> None:
    """Trace for `target`, calibrate on noise, export, and run the INT8 file once in ONNX Runtime."""
    from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat
    from edgecv.export.onnx import check_parity, export_onnx

    qmodel = prepare_qat(model, target, example)
    noise = torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    apply_calibrator(qmodel, collect_stats(qmodel, [noise]), "max")
    path = export_onnx(qmodel, tmp / f"{target}.int8.onnx", example)
    check_parity(qmodel, path, noise, int8=True)  # raises when ONNX Runtime cannot run the file


def _finished(entry: dict | None, fingerprint: str, stage_dir: Path, name: str) -> bool:
    return (
        entry is not None
        and entry.get("fingerprint") == fingerprint
        and entry.get("status") == "done"
        and ((stage_dir / "model.pt").exists() or name == "export")
    )


def _keep_later(entries: list[dict], old: dict[str, dict]) -> list[dict]:
    seen = {e["dir"] for e in entries}
    return entries + [e for d, e in sorted(old.items()) if d not in seen]


def _scalar(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
