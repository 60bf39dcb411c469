"""Every TensorRT and CUDA name edgecv uses exists in the real bindings of each supported version.

tests/data/trt_api/<version>.txt lists the identifiers TensorRT's Python bindings define (8.6.1, 10.3.0,
10.13.3.9, 11.4.0.106; written by tools/trt_api_surface.py from the bindings wheels), tests/data/cuda_api/
those of cuda-python (12.2 with the old cuda.cudart layout, 12.9 and 13.0 cuda.bindings). This test reads
edgecv's code (ast), works out which objects are TensorRT's (the `trt` module, and what its constructors and
methods return), and fails on a name a version lacks unless that use is behind a check for it
(`hasattr(obj, "name")`, or `getattr(obj, "name", default)`). The installed cuda-bindings are checked too,
live, when they are importable.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TRT_VERSIONS = ("8.6.1", "10.3.0", "10.13.3.9", "11.4.0.106")
MODULE = "<module>"

# edgecv helpers that hand out TensorRT / CUDA objects (what the walker cannot see through)
KNOWN_RETURNS: dict[str, object] = {
    "import_tensorrt": MODULE,
    "deserialize": (MODULE, "Runtime", "ICudaEngine"),
    "_parse": ("Builder", "INetworkDefinition", "OnnxParser"),
    "_configure": "IBuilderConfig",
    "_cudart": "CUDA",
    "cuda_runtime": "CUDA",
}
# function parameters that always hold these objects in edgecv's TensorRT code
PARAMETER_TYPES = {"trt": MODULE, "engine": "ICudaEngine", "builder": "Builder", "config": "IBuilderConfig",
                   "network": "INetworkDefinition", "cudart": "CUDA"}
CUDA_RETURNS = {"cudaGetDeviceProperties": "cudaDeviceProp"}  # _cuda_call(runtime.F, ...) gives F's value


def load_surface(path: Path) -> tuple[set[str], dict[str, str]]:
    """(names, method -> return class) of one surface file."""
    names, returns = set(), {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, ret = line.partition(" -> ")
        names.add(name)
        if ret:
            returns[name] = ret
    return names, returns


TRT = {v: load_surface(DATA / "trt_api" / f"{v}.txt") for v in TRT_VERSIONS}
CUDA = {p.stem: load_surface(p)[0] for p in sorted((DATA / "cuda_api").glob("*.txt"))}
TRT_RETURNS = {k: v for _, (_, r) in TRT.items() for k, v in r.items()}


@dataclass
class Use:
    """One name edgecv uses: `qualified` ("ICudaEngine.device_memory_size"), where, and how."""

    kind: str  # "trt" or "cuda"
    qualified: str
    where: str
    guarded: bool = False
    optional: bool = False  # getattr(obj, "name", default): must exist in some version, not every one


@dataclass
class Walker(ast.NodeVisitor):
    """Collects the TensorRT / CUDA names a module uses, with the type of each object worked out from
    assignments (flow-insensitive, per function; `self.x` per class)."""

    source: str
    tensorrt_module: bool = True  # parameter names count only in modules that use TensorRT themselves
    uses: list[Use] = field(default_factory=list)
    env: dict[str, object] = field(default_factory=dict)
    guards: list[set[tuple[str, str]]] = field(default_factory=list)
    in_import_guard: int = 0

    # ---- types
    def type_of(self, node: ast.AST) -> object:
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.type_of(node.value)
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return self.env.get(f"self.{node.attr}")
            if base == MODULE and node.attr[:1].isupper():
                return node.attr  # trt.Class
            if base == "CUDA" and node.attr[:4] == "cuda" and node.attr[4:5].isupper():
                return node.attr  # cudart.cudaMemcpyKind (an enum or struct class)
            if isinstance(base, str) and base not in (MODULE, "CUDA") and node.attr[:1].isupper():
                return f"{base}.{node.attr}"  # trt.ILogger.Severity (a nested enum)
            return None
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in KNOWN_RETURNS and not (isinstance(func, ast.Attribute) and self.type_of(func.value)):
                return KNOWN_RETURNS[name]
            if name == "_cuda_call" and node.args and isinstance(node.args[0], ast.Attribute):
                return CUDA_RETURNS.get(node.args[0].attr)
            if isinstance(func, ast.Attribute):
                owner = self.type_of(func.value)
                if owner == MODULE:
                    return func.attr if func.attr[:1].isupper() else None  # trt.Runtime(...) -> Runtime
                if isinstance(owner, str) and owner not in (MODULE, "CUDA"):
                    return TRT_RETURNS.get(f"{owner}.{func.attr}")
        return None

    def bind(self, target: ast.AST, value: object) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            values = value if isinstance(value, tuple) else (None,) * len(target.elts)
            for t, v in zip(target.elts, values, strict=False):
                self.bind(t, v)
        elif isinstance(target, ast.Name) and value is not None:
            self.env[target.id] = value
        elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
              and target.value.id == "self" and value is not None):
            self.env[f"self.{target.attr}"] = value

    # ---- scopes
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = dict(self.env)
        for item in ast.walk(node):  # self.x assigned in any method is known in all of them
            if isinstance(item, ast.Assign):
                for target in item.targets:
                    self.bind(target, self.type_of(item.value))
        self.generic_visit(node)
        self.env = saved

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        saved = dict(self.env)
        for arg in node.args.args:
            if arg.arg in PARAMETER_TYPES and self.tensorrt_module:
                self.env[arg.arg] = PARAMETER_TYPES[arg.arg]
        self.generic_visit(node)
        self.env = {**saved, **{k: v for k, v in self.env.items() if k.startswith("self.")}}

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.bind(target, self.type_of(node.value))
            self.visit(target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "tensorrt":
                self.env[alias.asname or "tensorrt"] = MODULE

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module in ("cuda.bindings", "cuda"):
            for alias in node.names:
                if alias.name in ("runtime", "cudart"):
                    self.env[alias.asname or alias.name] = "CUDA"
        if node.module == "cuda.bindings.utils":
            for alias in node.names:
                self.uses.append(Use("cuda", f"utils.{alias.name}", self.where(node), bool(self.in_import_guard)))

    def visit_Try(self, node: ast.Try) -> None:
        catches = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                      for h in node.handlers)
        self.in_import_guard += catches
        for stmt in node.body:
            self.visit(stmt)
        self.in_import_guard -= catches
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(stmt)

    # ---- guards
    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self.guards.append(hasattr_checks(node.test))
        for stmt in node.body:
            self.visit(stmt)
        self.guards.pop()
        for stmt in node.orelse:
            self.visit(stmt)

    def guarded(self, owner: ast.AST, name: str) -> bool:
        text = ast.unparse(owner)
        return any((text, name) in g for g in self.guards)

    def where(self, node: ast.AST) -> str:
        return f"{self.source}:{node.lineno}"

    # ---- uses
    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            owner = self.type_of(node.args[0])
            if owner is not None:
                self.record(owner, node.args[1].value, node, optional=len(node.args) >= 3)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = self.type_of(node.value)
        if owner is not None and not node.attr.startswith("__"):
            self.record(owner, node.attr, node, guarded=self.guarded(node.value, node.attr))
        self.generic_visit(node)

    def record(self, owner: object, name: str, node: ast.AST, guarded: bool = False, optional: bool = False) -> None:
        if owner == "CUDA":
            self.uses.append(Use("cuda", name, self.where(node), guarded, optional))
        elif owner == MODULE:
            self.uses.append(Use("trt", name, self.where(node), guarded, optional))
        elif isinstance(owner, str):
            kind = "cuda" if owner.startswith("cuda") else "trt"
            self.uses.append(Use(kind, f"{owner}.{name}", self.where(node), guarded, optional))


def hasattr_checks(test: ast.AST) -> set[tuple[str, str]]:
    """(object source, name) of every `hasattr(obj, "name")` in an if-test (an and-chain counts)."""
    found = set()
    for node in ast.walk(test):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
            found.add((ast.unparse(node.args[0]), node.args[1].value))
    return found


def walk_source(text: str, source: str, tensorrt_module: bool | None = None) -> list[Use]:
    if tensorrt_module is None:
        tensorrt_module = "tensorrt" in text or "cudart" in text
    walker = Walker(source, tensorrt_module=tensorrt_module)
    walker.visit(ast.parse(text))
    return walker.uses


def edgecv_uses() -> list[Use]:
    uses = []
    for path in sorted((ROOT / "edgecv").rglob("*.py")):
        text = path.read_text()
        if "import tensorrt" in text or "import_tensorrt" in text or "cuda" in text:
            uses += walk_source(text, str(path.relative_to(ROOT)))
    return uses


def problems(uses: list[Use], surfaces: dict[str, set[str]], kind: str) -> list[str]:
    out = []
    for use in (u for u in uses if u.kind == kind):
        missing = [v for v, names in surfaces.items() if use.qualified not in names]
        if use.optional or use.guarded:
            if len(missing) == len(surfaces):
                out.append(f"{use.where}: {use.qualified} exists in no version ({', '.join(surfaces)})")
        elif missing:
            out.append(f"{use.where}: {use.qualified} is missing in {', '.join(missing)} (guard it with hasattr)")
    return out


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def uses() -> list[Use]:
    return edgecv_uses()


def test_surfaces_hold_what_the_issue_says():
    """The lists are real: names that exist, and names removed or added in a version."""
    names = {v: TRT[v][0] for v in TRT_VERSIONS}
    for v in TRT_VERSIONS:
        assert {"Builder.create_network", "IExecutionContext.execute_async_v3", "nptype",
                "ICudaEngine.get_tensor_dtype"} <= names[v]
    assert "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" not in names["11.4.0.106"]
    assert {"BuilderFlag.INT8", "BuilderFlag.FP16"}.isdisjoint(names["11.4.0.106"])
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in names["8.6.1"]
    assert "ICudaEngine.device_memory_size_v2" not in names["8.6.1"]
    assert TRT["10.3.0"][1]["Runtime.deserialize_cuda_engine"] == "ICudaEngine"


def test_every_tensorrt_name_exists_in_every_supported_version(uses):
    trt_uses = [u for u in uses if u.kind == "trt"]
    assert len({u.qualified for u in trt_uses}) >= 40, "the walker recognised too few TensorRT uses"
    assert not problems(uses, {v: TRT[v][0] for v in TRT_VERSIONS}, "trt")


def test_every_cuda_name_exists_in_cuda_python_12_and_13(uses):
    assert len({u.qualified for u in uses if u.kind == "cuda"}) >= 12
    assert not problems(uses, CUDA, "cuda")


def test_every_cuda_name_exists_in_the_installed_cuda_bindings(uses):
    from edgecv.device import cuda_runtime

    runtime = cuda_runtime()
    if runtime is None:
        pytest.skip("cuda-python is not installed")
    live = set()
    for use in (u for u in uses if u.kind == "cuda"):
        head, _, member = use.qualified.partition(".")
        if head == "utils":
            try:
                from cuda.bindings import utils
            except ImportError:
                continue
            if hasattr(utils, member):
                live.add(use.qualified)
        elif hasattr(runtime, head) and (not member or hasattr(getattr(runtime, head), member)):
            live.add(use.qualified)
    assert not problems(uses, {"installed": live}, "cuda")


@pytest.mark.parametrize("version", TRT_VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("dla_core", [None, 0])
def test_builder_flags_edgecv_picks_exist_in_that_version(version, precision, dla_core):
    """The flag names builder_options chooses per version (used through getattr) are that version's."""
    from edgecv.errors import EdgecvError
    from edgecv.export.trt.options import builder_options

    shapes = ([1, 3, 32, 32], [8, 3, 32, 32], [64, 3, 32, 32])
    try:
        options = builder_options(precision, version, 256, *shapes, has_qdq=precision == "int8", dla_core=dla_core)
    except EdgecvError as err:  # DLA has no FP32, and 10.8 to 11.4.0 have no DLA
        assert dla_core is not None and ("FP16 layers only" in str(err) or "does not drive the DLA" in str(err))
        return
    names = TRT[version][0]
    for flag in options["network_flags"]:
        assert f"NetworkDefinitionCreationFlag.{flag}" in names
    for flag in options["builder_flags"]:
        assert f"BuilderFlag.{flag}" in names


CHECKER_CASES = {
    "unguarded removed flag": ("def f(trt):\n    return trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH\n",
                               "missing in 11.4.0.106"),
    "guarded removed flag": ("def f(trt):\n    flags = trt.NetworkDefinitionCreationFlag\n"
                             "    if hasattr(flags, 'EXPLICIT_BATCH'):\n        return flags.EXPLICIT_BATCH\n", None),
    "unguarded old property": ("def f(engine):\n    return engine.device_memory_size\n", "missing in 11.4.0.106"),
    "through a returned object": ("import tensorrt as trt\ndef f(data):\n    e = trt.Runtime(None).deserialize_cuda_engine(data)\n"
                                  "    return e.device_memory_size_v2\n", "missing in 8.6.1"),
    "typo behind getattr": ("def f(engine):\n    return getattr(engine, 'device_memory_sise', None)\n",
                            "exists in no version"),
    "missing cuda call": ("from cuda.bindings import runtime\ndef f():\n    return runtime.cudaMallocTypo(4)\n",
                          "missing in"),
}


@pytest.mark.parametrize("case", CHECKER_CASES)
def test_the_checker_catches_what_it_should(case):
    code, message = CHECKER_CASES[case]
    found = walk_source(code, "snippet.py", tensorrt_module=True)
    assert found, "the walker recognised nothing"
    errors = problems(found, {v: TRT[v][0] for v in TRT_VERSIONS}, "trt") + problems(found, CUDA, "cuda")
    if message is None:
        assert not errors
    else:
        assert any(message in e for e in errors), errors


def iter_uses(kind: str) -> Iterator[str]:
    yield from sorted({u.qualified for u in edgecv_uses() if u.kind == kind})
