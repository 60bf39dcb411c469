"""The recipe's options: each one is used by a bundled recipe or shown at work by a named test; a key of an
older edgecv is refused in one line naming its new spelling; `recipes show --resolved` writes numbers, with
null only where it means "not set"."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from option_coverage import canonical, options, recipe_paths

from edgecv.compress.prune import PruneConfig, prune_model
from edgecv.config import Strict, validate_section
from edgecv.errors import EdgecvError
from edgecv.models import build_model
from edgecv.recipe import dump_recipe, list_recipes, load_recipe, validate

TESTS = Path(__file__).resolve().parent

# Options no bundled recipe sets, and the test that shows what each one changes.
EXERCISED = {
    "data.limit_val": "test_models_data.py::test_every_dataset_builds",
    "data.num_classes": "test_models_data.py::test_synthetic_is_deterministic_and_sharded",
    "data.channels": "test_models_data.py::test_synthetic_is_deterministic_and_sharded",
    "data.train_size": "test_models_data.py::test_synthetic_is_deterministic_and_sharded",
    "data.val_size": "test_models_data.py::test_synthetic_is_deterministic_and_sharded",
    "data.pin_memory": "test_data.py::test_loader_settings_come_from_the_recipe",
    "data.persistent_workers": "test_data.py::test_loader_settings_come_from_the_recipe",
    "data.resize_size": "test_data.py::test_val_images_are_resized_to_size_over_0875_then_center_cropped",
    "data.mean": "test_device_side.py::test_image_folder_without_torch_follows_the_recipes_preprocessing",
    "data.std": "test_device_side.py::test_image_folder_without_torch_follows_the_recipes_preprocessing",
    "train.amp_dtype": "test_gpu.py::test_amp_trains_on_cuda",
    "train.compile": "test_train_options.py::test_torch_compile_trains_on_the_cpu",
    "train.grad_accum": "test_train_options.py::test_gradient_accumulation_equals_the_large_batch",
    "train.grad_clip": "test_train_options.py::test_grad_clip_bounds_each_update_and_zero_is_off",
    "stages.export.dynamic_batch": "test_export_onnx.py::test_float_export_parity_and_dynamic_batch",
    "stages.export.parity_samples": "test_cli.py::test_compress_writes_the_run_dir_and_report",
    "stages.export.backends": "test_engine_export.py::test_export_writes_an_int8_file_per_target",
    "stages.export.engine.build_precision": "test_engine_export.py::test_the_device_build_plan_of_the_exported_file",
    "stages.export.engine.workspace_mb": "test_tensorrt.py::test_build_and_run_engine_matches_onnxruntime",
    "stages.export.engine.timing_cache": "test_tensorrt.py::test_build_and_run_engine_matches_onnxruntime",
    "stages.export.engine.dla_core": "test_tensorrt.py::test_int8_plan_from_a_qdq_graph_and_dla",
    "stages.export.input": "test_frames.py::test_compress_with_frame_input_writes_checked_twins_and_reports_them",
    "stages.finetune.distill.feature_weight":
        "test_distill.py::test_feature_kd_adapts_pruned_channels_and_trains_the_adapters",
    "stages.prune.ratio": "test_cli.py::test_compress_writes_the_run_dir_and_report",
    "stages.prune.target_latency_ms":
        "test_prune_latency.py::test_the_search_does_not_assume_the_most_pruned_model_is_the_fastest",
    "stages.prune.backend": "test_options.py::test_prune_times_candidates_on_its_backend_precision_and_batch_size",
    "stages.prune.measure_precision":
        "test_options.py::test_prune_times_candidates_on_its_backend_precision_and_batch_size",
    "stages.prune.batch_size": "test_options.py::test_prune_times_candidates_on_its_backend_precision_and_batch_size",
    "stages.prune.allocation": "test_prune_latency.py::test_latency_table_covers_every_group_and_steers_the_allocation",
    "stages.prune.latency_widths":
        "test_prune_latency.py::test_latency_table_covers_every_group_and_steers_the_allocation",
    "stages.prune.ignore": "test_options.py::test_prune_ignore_keeps_the_named_layer_whole",
    "stages.prune.graph_timeout": "test_prune_kinds.py::test_the_dependency_analysis_has_a_time_limit",
    "stages.prune.steps": "test_prune_latency.py::test_steps_compose_to_the_asked_goal",
    "stages.ptq.accuracy_budget": "test_precision.py::test_choose_precision",
    "bench.threads": "test_cli.py::test_compress_writes_the_run_dir_and_report",
}

# Keys whose null in `recipes show --resolved` means "not set" or "off", which no number says better.
NULL_MEANS_UNSET = {
    "data.root": "no folder given: --data, $EDGECV_DATA or the dataset's own place",
    "data.limit_train": "no limit", "data.limit_val": "no limit",
    "data.pin_memory": "on CUDA, off on a CPU (the device decides)",
    "data.persistent_workers": "when workers > 0", "data.prefetch_factor": "2 when workers > 0, none without workers",
    "data.resize_size": "image_size / 0.875, or the weights' own",
    "data.interpolation": "the weights' own, else bilinear", "data.mean": "the weights' own, else ImageNet's",
    "data.std": "the weights' own, else ImageNet's", "data.auto_augment": "no policy",
    "model.weights": "random initialization", "model.width": "the net's own",
    "model.stem_stride": "the net's own", "model.small_input_stem": "image_size < 64",
    "train.step_epochs": "only schedule step takes it", "train.bn_momentum": "the model's own",
    "stages.prune.ratio": "one goal of three", "stages.prune.target_macs": "one goal of three",
    "stages.prune.target_latency_ms": "one goal of three", "stages.prune.finetune_between": "steps: 1",
    "stages.finetune.distill": "no distillation",
    "stages.export.engine.timing_cache": "no cache file", "stages.export.engine.dla_core": "the GPU, not a DLA",
    "bench.threads": "all cores",
}


def _test_names(filename: str) -> set[str]:
    tree = ast.parse((TESTS / filename).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_option_is_in_a_bundled_recipe_or_shown_at_work_by_a_test():
    used, listed = recipe_paths(), set(options())
    neither = [o for o in options() if o not in used and o not in EXERCISED]
    assert not neither, f"options no bundled recipe uses and no test exercises (remove them, or test them): {neither}"
    stale = [o for o in EXERCISED if o not in listed]
    assert not stale, f"EXERCISED names options the recipe no longer has: {stale}"
    missing = [t for t in EXERCISED.values() if t.split("::")[1] not in _test_names(t.split("::")[0])]
    assert not missing, f"EXERCISED names tests that do not exist: {missing}"


def _config_classes() -> list[type[Strict]]:
    load_recipe("quickstart")  # every stage registered
    found, todo = [], [Strict]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def test_every_old_key_is_refused_with_its_new_spelling():
    """The whole table of old spellings, per config class: each old key is one line naming what replaced it,
    and the new spelling is a key of that class."""
    checked = 0
    for cls in _config_classes():
        for old, new in cls.renamed_keys().items():
            assert old not in cls.model_fields and new.split(":")[0] in cls.model_fields, (cls.__name__, old, new)
            with pytest.raises(EdgecvError) as err:
                validate_section(cls, {old: 1}, "recipe.yaml", prefix="sec")
            assert str(err.value) == f"recipe.yaml: sec.{old} was renamed: use sec.{new}"
            checked += 1
        for old, why in cls.removed_keys().items():
            assert old not in cls.model_fields, (cls.__name__, old)
            with pytest.raises(EdgecvError) as err:
                validate_section(cls, {old: 1}, "recipe.yaml", prefix="sec")
            assert str(err.value) == f"recipe.yaml: sec.{old} was removed: {why}"
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize(("stage", "body", "message"), [
    ("prune", {"target_macs": 0.5, "iterative_steps": 4},
     "stages[1].prune.iterative_steps was renamed: use stages[1].prune.steps"),
    ("prune", {"ratio": 0.5, "global_pruning": True},
     "stages[1].prune.global_pruning was renamed: use stages[1].prune.allocation: global"),
    ("qat", {"target": "tensorrt"}, "stages[1].qat.target was renamed: use stages[1].qat.backend"),
    ("ptq", {"deploy_batch": 1}, "stages[1].ptq.deploy_batch was renamed: use stages[1].ptq.batch_size"),
    ("export", {"engine": {"precision": "fp16"}},
     "stages[1].export.engine.precision was renamed: use stages[1].export.engine.build_precision"),
])
def test_an_old_key_in_a_recipe_file_is_one_line(tmp_path, stage, body, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "old", "model": {"name": "edgecv:resnet8"},
                                    "stages": [{"finetune": {"epochs": 1}}, {stage: body}]}))
    proc = subprocess.run([sys.executable, "-m", "edgecv", "recipes", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: {message}"]


def _nulls(node: object, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _nulls(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for item in node for p in _nulls(item, path)]
    return [path] if node is None else []


@pytest.mark.parametrize("name", list_recipes())
def test_the_resolved_recipe_writes_numbers_and_null_only_for_not_set(name):
    resolved = yaml.safe_load(dump_recipe(load_recipe(name)))
    resolved["stages"] = [{f"stages.{k}": v for k, v in item.items()} for item in resolved["stages"]]
    nulls = {canonical(p.replace("stages.stages.", "stages.")) for p in _nulls(resolved)}
    assert nulls <= set(NULL_MEANS_UNSET), sorted(nulls - set(NULL_MEANS_UNSET))


def test_ema_decay_zero_is_off_and_the_default():
    recipe = validate({"name": "e", "model": {"name": "edgecv:resnet8"}})
    assert recipe.train.ema_decay == 0.0
    with pytest.raises(EdgecvError, match="train.ema_decay"):
        validate({"name": "e", "model": {"name": "edgecv:resnet8"}, "train": {"ema_decay": None}})


def test_prune_ignore_keeps_the_named_layer_whole():
    torch.manual_seed(0)
    model = build_model("edgecv:resnet8", 4, 3, 16, width=8).eval()
    example = torch.zeros(1, 3, 16, 16)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    name = next(n for n in convs if "conv1" in n and n != convs[0])
    width = dict(model.named_modules())[name].out_channels
    plain = dict(prune_model(model, PruneConfig(ratio=0.5), example)[0].named_modules())[name]
    kept = dict(prune_model(model, PruneConfig(ratio=0.5, ignore=[name]), example)[0].named_modules())[name]
    assert plain.out_channels < width == kept.out_channels


@pytest.mark.parametrize(("backend", "precision", "batch"), [("onnxruntime", "int8", 4), ("torch", "fp32", 2)])
def test_prune_times_candidates_on_its_backend_precision_and_batch_size(monkeypatch, backend, precision, batch):
    """The measuring function a latency search uses (the measurement itself injected): its runners are
    made for `backend`, from a Q/DQ graph for int8, and timed at `batch_size`."""
    import onnx

    import edgecv.bench.measure as measure_module
    import edgecv.bench.runners as runners
    from edgecv.stages.prune import latency_measurer

    made, timed = [], []

    def create_runner(name, model, **_):
        qdq = None
        if isinstance(model, Path):
            qdq = any(n.op_type == "QuantizeLinear" for n in onnx.load(str(model)).graph.node)
        made.append((name, qdq))
        return SimpleNamespace(backend=name)

    def measure(subjects, settings, shape):
        timed.append(settings.batch_sizes)
        return [SimpleNamespace(latency=[SimpleNamespace(p50_ms=1.5)]) for _ in subjects]

    monkeypatch.setattr(runners, "create_runner", create_runner)
    monkeypatch.setattr(measure_module, "measure", measure)
    cfg = PruneConfig(target_latency_ms=1.0, backend=backend, measure_precision=precision, batch_size=batch)
    model = build_model("edgecv:resnet8", 4, 3, 16, width=8).eval()
    assert latency_measurer(cfg, torch.zeros(1, 3, 16, 16))([model]) == [1.5]
    assert made == [(backend, True if precision == "int8" else None)] and timed == [(batch,)]
