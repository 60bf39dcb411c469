"""The package's imports point one way, with no cycle (lazy imports included), and the device-side commands
load no training code. Modules stay under 450 lines and functions under 60; private names stay in their module.

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
    ["registry", "io", "console", "device", "sqnr"],
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


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each group of modules that import one another, directly or around a circle (Tarjan's strongly
    connected components), as "a <-> b <-> c"."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(" <-> ".join(sorted(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    return {m: {t for t in _imports(p, m, top_level_only) if t != m} for m, p in _modules().items()}


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "lazy-included"])
def test_no_import_cycle(top_level_only):
    """No circle of imports, not even one closed by an import inside a function: a lazy import hides a
    circle from Python, not from the reader, and breaks as soon as someone moves it to the top."""
    cycles = _cycles(_import_graph(top_level_only))
    assert not cycles, "move the shared piece down, or pass the function in:\n" + "\n".join(cycles)


def test_the_cycle_check_catches_a_circle_closed_by_a_lazy_import(tmp_path):
    """The checker itself: b imports a at module level, a imports b inside a function."""
    package = tmp_path / "edgecv" / "data"
    package.mkdir(parents=True)
    (package / "a.py").write_text("def f():\n    from edgecv.data.b import g\n    return g\n")
    (package / "b.py").write_text("from edgecv.data.a import f\n\ng = f\n")
    graph = {f"edgecv.data.{n}": _imports(package / f"{n}.py", f"edgecv.data.{n}", top_level_only=False)
             for n in ("a", "b")}
    assert _cycles(graph) == ["edgecv.data.a <-> edgecv.data.b"]
    top = {f"edgecv.data.{n}": _imports(package / f"{n}.py", f"edgecv.data.{n}", top_level_only=True)
           for n in ("a", "b")}
    assert _cycles(top) == []  # what the module-level check alone missed


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


# A module holds one concern; past this many lines it holds several: split it along its seams.
MAX_MODULE_LINES = 450


def _module_lengths() -> dict[str, int]:
    return {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}


def _too_long(lengths: dict[str, int]) -> list[str]:
    return [f"{path} ({n} lines)" for path, n in lengths.items() if n > MAX_MODULE_LINES]


def test_no_module_is_longer_than_450_lines():
    lengths = _module_lengths()
    long = _too_long(lengths)
    assert not long, "split these modules along their seams: " + ", ".join(long)


def test_the_module_length_check_names_a_long_module():
    lengths = {"edgecv/a.py": MAX_MODULE_LINES, "edgecv/b.py": MAX_MODULE_LINES + 1}
    assert _too_long(lengths) == [f"edgecv/b.py ({MAX_MODULE_LINES + 1} lines)"]


# Private names (a leading underscore) stay in their module: one that another module needs gets a public
# name.


def _private_uses(path: Path, module: str) -> set[str]:
    """Private names of other edgecv modules that `path` uses: `from edgecv.x import _name`, and
    `alias._name` where alias was imported from edgecv (a module, a class, a function)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found, imported = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgecv"):
                    imported[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("edgecv"):
                continue
            for a in node.names:
                if _is_private(a.name):
                    found.add(f"{module} uses {base}.{a.name}")
                imported[a.asname or a.name] = f"{base}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = ast.unparse(node.value)
            if owner in imported:
                found.add(f"{module} uses {imported[owner]}.{node.attr}")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_across_modules():
    crossing = set().union(*(_private_uses(p, m) for m, p in _modules().items()))
    assert not crossing, "give these a public name (or keep them in their module):\n" + "\n".join(sorted(crossing))


def test_the_private_name_check_catches_each_form(tmp_path):
    fake = tmp_path / "edgecv" / "bench" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "from edgecv.export import engine as e\nfrom edgecv.data.datasets import _read, DataBundle\n"
        "import edgecv.io\nfrom . import runners\n\n"
        "def f():\n    e._load()\n    DataBundle._hidden\n    edgecv.io._write()\n    runners._run()\n"
        "    return _own_helper(), e.__name__\n"
    )
    assert _private_uses(fake, "edgecv.bench.x") == {
        "edgecv.bench.x uses edgecv.export.engine._load", "edgecv.bench.x uses edgecv.data.datasets._read",
        "edgecv.bench.x uses edgecv.data.datasets.DataBundle._hidden", "edgecv.bench.x uses edgecv.io._write",
        "edgecv.bench.x uses edgecv.bench.runners._run",
    }
