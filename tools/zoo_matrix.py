#!/usr/bin/env python
"""Conformance matrix: every torchvision classification builder through edgecv's whole chain.

For each builder in torchvision.models.list_models(module=torchvision.models), with random weights (nothing
is downloaded) at a small input, each step of the chain a user's model goes through:

  build    built for 10 classes, whatever its head; one tensor of 10 scores in eval and training mode
  reload   saved with edgecv.checkpoint, reloaded in a fresh process: identical outputs (built and pruned)
  prune    target_macs 0.5, round_to 8: MACs within 5 % of the ask, class count unchanged
  ptq      prepare_qat + collect_stats + apply_calibrator('max') for both targets (onnxruntime, tensorrt)
  export   both INT8 files exported
  ort      the onnxruntime-target INT8 file runs in ONNX Runtime; float Conv/Gemm named with their reason
  trt      the tensorrt-target file obeys TensorRT's Q/DQ rules (edgecv.export.lint)
  parity   ONNX Runtime INT8 logits vs the fake-quant torch model, both targets (logit SQNR and top-1
           agreement beyond the quantization noise); the SQNR column records the dB of each

Each model runs in its own subprocess with a timeout, so one crash or hang cannot stop the matrix.

    nice -n 10 python tools/zoo_matrix.py --out docs/zoo.md             # every builder, JSON beside it
    python tools/zoo_matrix.py --models resnet18,squeezenet1_1 --out /tmp/zoo.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Family of each builder: a new torchvision family fails tests/test_zoo.py until it is named here.
FAMILIES = [
    ("alexnet", r"alexnet"),
    ("convnext", r"convnext_(tiny|small|base|large)"),
    ("densenet", r"densenet\d+"),
    ("efficientnet", r"efficientnet_b\d"),
    ("efficientnet_v2", r"efficientnet_v2_[sml]"),
    ("googlenet", r"googlenet"),
    ("inception", r"inception_v3"),
    ("mnasnet", r"mnasnet\d_\d+"),
    ("mobilenet_v2", r"mobilenet_v2"),
    ("mobilenet_v3", r"mobilenet_v3_(large|small)"),
    ("regnet_x", r"regnet_x_\w+"),
    ("regnet_y", r"regnet_y_\w+"),
    ("resnet", r"resnet\d+"),
    ("resnext", r"resnext\d+_\d+x\d+d"),
    ("shufflenet_v2", r"shufflenet_v2_x\d_\d"),
    ("squeezenet", r"squeezenet1_\d"),
    ("vgg", r"vgg\d+(_bn)?"),
    ("wide_resnet", r"wide_resnet\d+_2"),
    ("maxvit", r"maxvit_t"),
    ("swin", r"swin_(v2_)?[tsb]"),
    ("vit", r"vit_[bhl]_\d+"),
]
TRANSFORMERS = {
    "vit": "vision transformer: self-attention and LayerNorm over tokens, outside edgecv's CNN chain "
    "(INT8 placement covers Conv/Gemm/pooling, the pruning plan covers channels)",
    "swin": "window-attention transformer: torch-pruning's dependency search does not finish on it "
    "(prune.graph_timeout refuses it in one line)",
    "maxvit": "window-attention transformer: torch-pruning's dependency search does not finish on it "
    "(prune.graph_timeout refuses it in one line)",
}
MAX_PARAMS = 200_000_000  # larger builders are left out: several copies of them do not fit a shared 24 GB box
MIN_SIZE = {"inception_v3": 80, "alexnet": 64}  # below, their stride-2 reductions leave nothing to pool
STEPS = ["build", "reload", "prune", "ptq", "export", "ort", "trt", "parity"]
CLASSES = 10
SQNR_TARGETS = ("onnxruntime", "tensorrt")


def family(name: str) -> str | None:
    return next((fam for fam, pattern in FAMILIES if re.fullmatch(pattern, name)), None)


def builders() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def num_params(name: str) -> int:
    """Parameter count from torchvision's weights metadata (no weights are loaded)."""
    import torchvision

    return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])


def left_out(name: str) -> str | None:
    """Why `name` is not run, or None."""
    fam = family(name)
    if fam in TRANSFORMERS:
        return TRANSFORMERS[fam]
    params = num_params(name)
    if params > MAX_PARAMS:
        return f"size: {params / 1e6:.0f} M parameters (over {MAX_PARAMS / 1e6:.0f} M)"
    return None


def representatives() -> dict[str, str]:
    """The smallest builder of each CNN family."""
    reps: dict[str, str] = {}
    for name in builders():
        fam = family(name)
        if fam is None or fam in TRANSFORMERS or left_out(name):
            continue
        if fam not in reps or num_params(name) < num_params(reps[fam]):
            reps[fam] = name
    return dict(sorted(reps.items()))


def input_size(name: str, size: int) -> int:
    return max(size, MIN_SIZE.get(name, 0))


# ---- the chain, in one process ---------------------------------------------------------------------


class StepFailed(Exception):
    """A check of this tool that did not hold; its message is the cell."""


def _one_line(exc: BaseException) -> str:
    """A failure as one line: an EdgecvError's (or StepFailed's) message, else the exception type and its
    first line (an internal error of edgecv: a bug to fix)."""
    from edgecv.errors import EdgecvError

    text = (str(exc).splitlines() or [""])[0].strip()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "Cannot allocate memory" in text:
        return "out of memory under this tool's address-space bound (--memory-gb; the model is not at fault)"
    return text if isinstance(exc, (EdgecvError, StepFailed)) else f"internal error: {type(exc).__name__}: {text}"[:300]


def _refresh_batchnorm(model, batches) -> None:
    """Running BatchNorm statistics from a few batches, as the first training steps would set them: a
    randomly initialised net keeps mean 0 / variance 1, whose activations vanish or explode with depth."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


class Chain:
    """Runs the steps of one model, each recorded as a cell: {"ok": bool, "text": one line}."""

    def __init__(self, name: str, size: int, workdir: Path, small_input_stem: bool | None = None,
                 progress: Path | None = None) -> None:  # fmt: skip
        from edgecv.data.config import DataConfig
        from edgecv.data.datasets import build_data
        from edgecv.models.spec import ModelSpec

        self.name, self.size, self.workdir, self.progress = name, size, Path(workdir), progress
        self.spec = ModelSpec(f"torchvision:{name}", CLASSES, 3, size, small_input_stem=small_input_stem)
        data = build_data(DataConfig(dataset="synthetic", image_size=size, num_classes=CLASSES, channels=3,
                                     train_size=96, val_size=128, batch_size=32, eval_batch_size=64,
                                     augment=False), seed=0)  # fmt: skip
        self.calib = data.calibration_batches(3)
        self.samples = data.val_samples(128)[:128]
        self.result: dict = {"model": name, "size": size, "cells": {}, "sqnr_db": {}, "notes": {}}
        self.checkpoints: list[tuple[str, Path]] = []

    def _record(self, step: str, ok: bool, text: str) -> None:
        self.result["cells"][step] = {"ok": ok, "text": text}
        if self.progress is not None:
            self.progress.write_text(json.dumps(self.result))

    def step(self, name: str, fn) -> object:
        """Run `fn`; record its cell text (it returns a str, or (value, str)), "pass", or the failure's one
        line; return its value."""
        if self.progress is not None:  # what the parent reports if this step hangs or crashes
            self.progress.write_text(json.dumps({**self.result, "running": name}))
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a cell
            self._record(name, False, _one_line(exc))
            self.result["notes"].setdefault("traceback", {})[name] = traceback.format_exc()[-2000:]
            return None
        finally:
            self.result["notes"].setdefault("step_seconds", {})[name] = round(time.perf_counter() - start, 2)
        value, text = out if isinstance(out, tuple) else (out, out if isinstance(out, str) else "pass")
        self._record(name, True, text)
        return value if value is not None else True

    def run(self, fresh_reload: bool = True) -> dict:
        start = time.perf_counter()
        model = self.step("build", self.build)
        pruned = self.step("prune", lambda: self.prune(model)) if model else None
        if fresh_reload and model:
            self.step("reload", self.reload)
        source = pruned or model
        qmodels = self.step("ptq", lambda: self.ptq(source)) if source else None
        paths = self.step("export", lambda: self.export(qmodels)) if isinstance(qmodels, dict) else None
        if isinstance(paths, dict):
            self.step("ort", lambda: self.ort(paths["onnxruntime"]))
            self.step("trt", lambda: self.trt(paths["tensorrt"]))
            self.step("parity", lambda: self.parity(qmodels, paths))
        if not pruned and model:
            self.result["notes"]["unpruned"] = "the later steps ran on the unpruned model"
        self.result["seconds"] = round(time.perf_counter() - start, 1)
        return self.result

    # ---- steps ----------------------------------------------------------------------------------------

    def build(self):
        import torch

        from edgecv.models import build_model
        from edgecv.pipeline import check_class_outputs

        torch.manual_seed(0)
        model = build_model(self.spec.name, weights=None, **self.spec.build_kwargs())
        check_class_outputs(model, self.spec, "the model", training_too=True)
        _refresh_batchnorm(model, self.calib)
        self._save("built", model)
        return model

    def prune(self, model):
        from edgecv.compress.prune import PruneConfig, prune_model

        pruned, info = prune_model(copy.deepcopy(model), PruneConfig(target_macs=0.5, round_to=8),
                                   self.spec.example_input())  # fmt: skip
        self._save("pruned", pruned)
        self.result["notes"]["prune"] = info
        return pruned, f"pass: {info['macs_kept']:.3f} of the MACs"

    def _save(self, label: str, model) -> None:
        import torch

        from edgecv.checkpoint import save_model

        path = self.workdir / f"{label}.pt"
        save_model(path, model, self.spec)
        with torch.no_grad():
            torch.save(model.eval()(self.samples[:8]), self.workdir / f"{label}.out.pt")
        torch.save(self.samples[:8], self.workdir / "x.pt")
        self.checkpoints.append((label, path))

    def reload(self) -> str:
        problems = reload_in_fresh_process([path for _, path in self.checkpoints])
        if problems:
            raise StepFailed("; ".join(problems))
        return f"pass: {' and '.join(label for label, _ in self.checkpoints)}"

    def ptq(self, model) -> dict:
        from edgecv.compress.quantize import apply_calibrator, collect_stats, prepare_qat

        qmodels = {}
        for target in SQNR_TARGETS:
            qmodel = prepare_qat(model, target, self.spec.example_input())
            apply_calibrator(qmodel, collect_stats(qmodel, self.calib), "max")
            qmodels[target] = qmodel.eval()
        return qmodels

    def export(self, qmodels: dict) -> dict:
        from edgecv.export.onnx import export_onnx

        return {t: export_onnx(q, self.workdir / f"{t}.int8.onnx", self.spec.example_input())
                for t, q in qmodels.items()}  # fmt: skip

    def ort(self, path: Path) -> str:
        from edgecv.export.lint import inspect_onnx
        from edgecv.export.onnx import ort_session

        ort_session(path).run(["logits"], {"input": self.samples[:4].numpy()})  # raises if ORT cannot run it
        report = inspect_onnx(path, "onnxruntime")
        weighted = [f for f in report["float_ops"] if f["op_type"] in ("Conv", "Gemm", "MatMul", "FusedConv")]
        self.result["notes"]["ort_float_ops"] = report["float_ops"]
        if not weighted:
            return "pass: every Conv/Gemm integer"
        kinds = sorted({f"{f['op_type']} ({f['reason'].removeprefix('runs in float: ')})" for f in weighted})
        return f"pass: {len(weighted)} float: {', '.join(kinds)}"

    def trt(self, path: Path) -> str:
        from edgecv.export.lint import inspect_onnx

        violations = inspect_onnx(path, "tensorrt")["violations"]
        if violations:
            raise StepFailed(f"{len(violations)} Q/DQ rule violations, e.g. {violations[0]}")
        return "pass"

    def parity(self, qmodels: dict, paths: dict) -> str:
        from edgecv.export.onnx import check_parity

        failures = []
        for target, qmodel in qmodels.items():
            parity = check_parity(qmodel, paths[target], self.samples, int8=True)
            self.result["sqnr_db"][target] = parity["sqnr_db"]
            self.result["notes"][f"parity_{target}"] = parity
            if not parity["ok"]:
                decided = parity["decided_agreement"]
                failures.append(
                    f"{target}: worst class SQNR {parity['worst_class_sqnr_db']:.1f} dB"
                    + (f", decided top-1 {100 * decided:.0f}%" if decided is not None else "")
                )
        if failures:
            raise StepFailed("; ".join(failures))
        return "pass"


def reload_in_fresh_process(paths: list[Path]) -> list[str]:
    """Load each checkpoint in one new Python process and compare its outputs on the inputs saved beside it
    (x.pt) with the outputs saved beside it (<label>.out.pt); returns one line per mismatch or failure."""
    code = (
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from edgecv.checkpoint import load_model\n"
        f"torch.set_num_threads({_threads()})\n"
        "out = []\n"
        "for p in map(Path, sys.argv[1:]):\n"
        "    try:\n"
        "        model, _ = load_model(p)\n"
        "        with torch.no_grad():\n"
        "            got = model(torch.load(p.parent / 'x.pt', weights_only=True))\n"
        "        want = torch.load(p.with_suffix('.out.pt'), weights_only=True)\n"
        "        if not torch.equal(got, want):\n"
        "            out.append(f'{p.name}: outputs differ by {(got - want).abs().max().item():.3g}')\n"
        "    except Exception as exc:\n"
        "        out.append(f'{p.name}: {type(exc).__name__}: {(str(exc).splitlines() or [\"\"])[0][:200]}')\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        return [f"the fresh process failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- the matrix: one subprocess per model ----------------------------------------------------------------


def run_worker(name: str, size: int, result: Path, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        chain = Chain(name, size, Path(tmp), progress=result)
        out = chain.run()
    result.write_text(json.dumps(out, default=str))


def run_model(name: str, size: int, timeout: float, threads: int, memory_gb: float = 8) -> dict:
    """One model in its own process; a crash or a timeout becomes the cell of the step it was in."""
    with tempfile.TemporaryDirectory(prefix="zoo-result-") as tmp:
        result = Path(tmp) / "result.json"
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--size", str(size),
               "--result", str(result), "--threads", str(threads)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  preexec_fn=lambda: _limit_memory(memory_gb))  # fmt: skip
            failure = None if proc.returncode == 0 else _death(proc, memory_gb)
        except subprocess.TimeoutExpired:
            failure = f"timeout after {timeout:g} s"
        data = json.loads(result.read_text()) if result.exists() and result.stat().st_size else {}
        data.setdefault("model", name)
        data.setdefault("size", size)
        data.setdefault("cells", {})
        data.setdefault("sqnr_db", {})
        if failure:
            running = data.pop("running", None) or next((s for s in STEPS if s not in data["cells"]), "build")
            data["cells"][running] = {"ok": False, "text": f"{failure} in this step"}
        data["seconds"] = round(time.perf_counter() - start, 1)
        return data


def _limit_memory(memory_gb: float) -> None:
    """Bound the worker's address space, so one large model cannot take the shared machine's memory."""
    import resource

    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _death(proc: subprocess.CompletedProcess, memory_gb: float) -> str:
    """One line for a worker that exited abnormally: out of memory when the bound was hit."""
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    if "MemoryError" in tail or "alloc" in tail.lower() or proc.returncode in (-6, -9):
        return f"out of memory (bounded to {memory_gb:g} GB)"
    return f"the worker died (exit code {proc.returncode}: {tail[:150]})"


def passed(result: dict) -> bool:
    return all(result["cells"].get(s, {}).get("ok") for s in STEPS)


def render(results: list[dict], skipped: dict[str, str], command: str, wall_s: float, pending: int = 0) -> str:
    """docs/zoo.md: a row per model, a column per step, then the models left out and why."""
    import onnxruntime
    import torch
    import torch_pruning
    import torchvision

    listed = len(results) + len(skipped) + pending
    ok = sum(passed(r) for r in results)
    lines = [
        "# Torchvision classifiers through edgecv's chain",
        "",
        f"Generated by `{command}` (wall time {wall_s / 60:.0f} min). torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, torch-pruning {torch_pruning.__version__}, onnxruntime {onnxruntime.__version__}.",
        "",
        f"**{ok} of the {len(results)} builders run pass every step** ({100 * ok / max(len(results), 1):.0f} %); "
        f"{len(skipped)} of the {listed} listed builders are left out (below)"
        + (f"; **{pending} builders not run yet (the run was interrupted)**. " if pending else ". ")
        + "Random weights with BatchNorm "
        "statistics from three batches of synthetic images, 10 classes; the input size is in the table.",
        "",
        "Columns: **build** 10 class scores in eval and training mode, whatever the head; **reload** the built "
        "and the pruned checkpoint reloaded in a fresh process give identical outputs; **prune** "
        "`target_macs: 0.5, round_to: 8` (MACs kept; within 5 % of the ask); **ptq** fake-quant for both "
        "targets, calibrated; **export** both INT8 files; **ort** the ONNX Runtime-target file runs in ONNX "
        "Runtime (float Conv/Gemm named with the reason); **trt** the TensorRT-target file obeys TensorRT's "
        "Q/DQ rules; **parity** ONNX Runtime INT8 logits against the fake-quant torch model, both targets; "
        "**SQNR** of those logits in dB (onnxruntime / tensorrt target).",
        "",
        "| model | px | " + " | ".join(STEPS) + " | SQNR dB | s |",
        "|---|---|" + "---|" * len(STEPS) + "---|---|",
    ]
    for r in results:
        cells = []
        for s in STEPS:
            cell = r["cells"].get(s)
            cells.append("–" if cell is None else cell["text"].replace("|", "/"))
        sqnr = " / ".join(f"{r['sqnr_db'][t]:.1f}" if t in r["sqnr_db"] else "–" for t in SQNR_TARGETS)
        mark = "" if passed(r) else " ✗"
        lines.append(f"| {r['model']}{mark} | {r['size']} | " + " | ".join(cells) + f" | {sqnr} | {r['seconds']:.0f} |")
    lines += ["", "## Left out", ""]
    lines += [f"- **{name}**: {reason}" for name, reason in skipped.items()] or ["(none)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated builders (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input size in px (raised where a model needs it)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=8, help="address-space bound per model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md", help="Markdown table (JSON beside it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.size, args.result, args.threads)
        return 0
    names = args.models.split(",") if args.models else builders()
    unknown = [n for n in names if n not in builders()]
    if unknown:
        print(f"error: not a torchvision classification builder: {', '.join(unknown)}", file=sys.stderr)
        return 2
    skipped = {n: reason for n in names if (reason := left_out(n))}
    todo = sorted((n for n in names if n not in skipped), key=num_params)  # small first: partial runs say most
    command = "python tools/zoo_matrix.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    results: list[dict] = []
    lock = threading.Lock()

    def write(pending: int) -> None:
        wall = time.perf_counter() - start
        ordered = sorted(results, key=lambda r: names.index(r["model"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(ordered, skipped, command.strip(), wall, pending))
        args.out.with_suffix(".json").write_text(json.dumps(
            {"wall_s": round(wall, 1), "results": ordered, "left_out": skipped, "pending": pending},
            indent=1, default=str))  # fmt: skip

    def one(name: str) -> dict:
        result = run_model(name, input_size(name, args.size), args.timeout, args.threads, args.memory_gb)
        print(f"{name}: {'pass' if passed(result) else 'FAIL'} ({result['seconds']:.0f} s)", flush=True)
        with lock:  # the table is rewritten after every model, so an interrupted run still leaves one
            results.append(result)
            write(len(todo) - len(results))
        return result

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        list(pool.map(one, todo))
    write(0)
    print(f"{sum(passed(r) for r in results)} of {len(results)} pass every step; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
