"""The package's imports point one way, with no cycle, and the device-side commands load no training code.

Order, top to bottom: cli -> pipeline -> run_report / model_files -> recipe -> stages -> report -> train ->
bench -> checkpoint -> export -> compress -> models -> data -> config -> io, console, device, registry ->
errors. A module may import its own package and anything lower; nothing higher, at module level or inside
a function (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgecv"

ORDER = [
    ["errors", "__init__"],
    ["registry", "io", "console", "device"],
    ["config"],
    ["data"],
    ["models"],
    ["compress"],
    ["export"],
    ["checkpoint"],
    ["bench"],
    ["train"],
    ["report"],
    ["stages"],
    ["recipe"],
    ["run_report", "model_files"],
    ["pipeline"],
    ["cli"],
    ["__main__"],
]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """edgecv modules that `path` imports (a `from pkg import sub` of a submodule counts as pkg.sub)."""
    tree = ast.parse(path.read_text())
    known = _modules()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("edgecv")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("edgecv"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


def _unit(module: str) -> str:
    """The layer a module belongs to: edgecv.compress.quantize.placement -> compress; edgecv -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {_unit(m) for m in _modules()} <= set(RANK), {_unit(m) for m in _modules()} - set(RANK)


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        for target in _imports(path, module, top_level_only=False):
            src, dst = _unit(module), _unit(target)
            if src != dst and RANK[dst] >= RANK[src]:
                wrong.append(f"{module} imports {target} ({src} must not depend on {dst})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_at_module_level():
    graph = {m: {t for t in _imports(p, m, top_level_only=True) if t != m} for m, p in _modules().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_layering_test_catches_an_upward_import(tmp_path):
    """The checker itself: a low module that imports the pipeline is reported."""
    fake = tmp_path / "edgecv" / "io.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from edgecv.pipeline import Pipeline\n")
    found = _imports(fake, "edgecv.io", top_level_only=False)
    assert "edgecv.pipeline" in found and RANK[_unit("edgecv.pipeline")] > RANK[_unit("edgecv.io")]


@pytest.mark.parametrize("command", ["bench", "eval", "inspect"])
def test_device_side_commands_do_not_load_training_code(command, tmp_path):
    """`edgecv bench|eval|inspect` on an ONNX file import neither the pipeline, the stages, the recipe
    schema nor the training loop."""
    import torch

    from edgecv.export.onnx import export_onnx
    from edgecv.models import build_model

    onnx = export_onnx(build_model("edgecv:resnet8", 4, 3, 16, width=8).eval(), tmp_path / "m.onnx",
                       torch.zeros(1, 3, 16, 16))
    data = '{"data": {"dataset": "synthetic", "image_size": 16, "num_classes": 4, "val_size": 64}}'
    (tmp_path / "metadata.json").write_text(data)
    args = {"bench": ["bench", str(onnx), "--runs", "2", "--rounds", "1", "--warmup", "0", "--batch-sizes", "1"],
            "eval": ["eval", str(onnx)], "inspect": ["inspect", str(onnx)]}[command]
    code = (
        "import sys\nfrom edgecv.cli import main\n"
        f"rc = main({args!r})\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('edgecv'))\n"
        "print('RC', rc); print('LOADED', ' '.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "RC 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    loaded = proc.stdout.split("LOADED", 1)[1].split()
    forbidden = [m for m in loaded if m.split(".")[1:2] in (["pipeline"], ["stages"], ["recipe"], ["run_report"])
                 or m.startswith("edgecv.train")]
    assert not forbidden, forbidden


# A function longer than this reads as several steps: split it into named ones. One that genuinely is one
# step (a table, a generated schema) is listed here with its reason.
MAX_FUNCTION_LINES = 60
LONG_ON_PURPOSE: dict[str, str] = {}


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted((ROOT / "edgecv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(ROOT).as_posix()}:{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in LONG_ON_PURPOSE:
                    long.append(f"{name} ({lines} lines)")
    assert not long, "split these into named steps, or list them in LONG_ON_PURPOSE with the reason: " + ", ".join(long)
