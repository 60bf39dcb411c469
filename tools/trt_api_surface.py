#!/usr/bin/env python3
"""Write the identifiers that TensorRT's and cuda-python's Python bindings define, one file per version, so
that tests/test_trt_api.py can check every TensorRT and CUDA name edgecv uses without a GPU.

TensorRT: the bindings wheels (tensorrt-bindings 8.6.1, tensorrt-cu12-bindings 10.3.0 / 10.13.3.9,
tensorrt-cu13-bindings 11.4.0.106) are small and install anywhere, but their module links against
libnvinfer / libnvonnxparser, which only come with TensorRT. So the module is imported against stub
libraries (gcc builds one that defines every TensorRT symbol it imports; module import only registers
classes), and its classes are read with dir(): `Class`, `Class.member`, `Class.method -> ReturnClass`
(from the pybind11 signatures). cuda-python imports without a GPU; its runtime module's `cuda*` names,
and the members of the few classes edgecv reads, are written the same way.

    python tools/trt_api_surface.py                 # TensorRT lists -> tests/data/trt_api/<version>.txt
    python tools/trt_api_surface.py --cuda          # also tests/data/cuda_api/<dist>-<version>.txt

Needs: pip (PyPI), gcc and binutils (nm, readelf). Downloads go to --work (default /tmp/edgecv-api-surface).
The wheels are built for one Python version: run it with the Python the wheels exist for (3.8-3.13).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TENSORRT_WHEELS = {
    "8.6.1": "tensorrt-bindings==8.6.1",
    "10.3.0": "tensorrt-cu12-bindings==10.3.0",
    "10.13.3.9": "tensorrt-cu12-bindings==10.13.3.9",
    "11.4.0.106": "tensorrt-cu13-bindings==11.4.0.106",
}
# cuda-python as JetPack 6 (CUDA 12; the old cuda.cudart layout and cuda.bindings) and JetPack 7 (CUDA 13)
CUDA_WHEELS = {
    "cuda-python-12.2.1": "cuda-python==12.2.1",
    "cuda-bindings-12.9.6": "cuda-bindings==12.9.6",
    "cuda-bindings-13.0.3": "cuda-bindings==13.0.3",
}
CUDA_CLASSES_WITH_MEMBERS = ("cudaDeviceProp", "cudaMemcpyKind")

# Runs in a subprocess whose LD_LIBRARY_PATH holds the stubs: dumps the module's names as JSON.
TRT_DUMP = r"""
import inspect, json, re, sys
sys.path.insert(0, sys.argv[1])
import tensorrt_bindings as trt

RETURN = re.compile(r"->\s*(?:[\w.:]*(?:\.|::))?(\w+)\s*$")
names = {}

def returns(member):
    doc = getattr(member, "__doc__", None) or ""
    found = {m.group(1) for line in doc.splitlines() for m in [RETURN.search(line.strip())] if m}
    # 8.6 names some classes by their C++ name (nvinfer1::IEngineInspector for EngineInspector)
    found = {f if inspect.isclass(getattr(trt, f, None)) else f[1:] for f in found}
    found = {f for f in found if inspect.isclass(getattr(trt, f, None))}
    return sorted(found)[0] if len(found) == 1 else None

def walk(obj, prefix, depth):
    for name in dir(obj):
        if name.startswith("_"):
            continue
        value = getattr(obj, name, None)
        names[prefix + name] = returns(value) if callable(value) and not inspect.isclass(value) else None
        if inspect.isclass(value) and depth < 2 and (value.__module__ or "").startswith("tensorrt"):
            walk(value, prefix + name + ".", depth + 1)

walk(trt, "", 0)
print(json.dumps({"version": trt.__version__, "names": names}))
"""

CUDA_DUMP = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
try:
    from cuda.bindings import runtime as rt
    layout = "cuda.bindings.runtime"
except ImportError:
    from cuda import cudart as rt
    layout = "cuda.cudart"
names = {n: None for n in dir(rt) if n.startswith("cuda")}
for cls in sys.argv[2].split(","):
    value = getattr(rt, cls, None)
    if inspect.isclass(value):
        names.update({f"{cls}.{m}": None for m in dir(value) if not m.startswith("_")})
try:
    from cuda.bindings import utils
    names.update({f"utils.{n}": None for n in dir(utils)
                  if not n.startswith("_") and (getattr(getattr(utils, n), "__module__", "") or "").startswith("cuda")})
except ImportError:
    pass
print(json.dumps({"layout": layout, "names": names}))
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)


def install(spec: str, target: Path, deps: bool) -> Path:
    """`pip install --target` one wheel (binary only) for this Python; returns the folder."""
    if not target.is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--only-binary=:all:", "--target", str(target), spec]
        run(cmd if deps else [*cmd, "--no-deps"])
    return target


def stub_libraries(module: Path, out: Path) -> Path:
    """Build, for every NVIDIA library `module` links against, a library of the same soname that defines
    every symbol the module imports from outside libc/libstdc++/Python as a function returning 0."""
    out.mkdir(parents=True, exist_ok=True)
    needed = re.findall(r"\(NEEDED\).*\[(lib(?:nv|cudart)[^\]]+)\]", run(["readelf", "-d", str(module)]).stdout)
    undefined = []
    for line in run(["nm", "-D", "--undefined-only", str(module)]).stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "U" and "@" not in fields[1] and not fields[1].startswith(("Py", "_Py")):
            undefined.append(fields[1])
    source = out / "stub.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in sorted(set(undefined))))
    for soname in needed:
        run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(out / soname), str(source)])
    return out


def write_list(path: Path, header: str, names: dict[str, str | None]) -> None:
    lines = [f"{name} -> {ret}" if ret else name for name, ret in sorted(names.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + "\n".join(lines) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({len(lines)} names)")


def tensorrt_surface(version: str, spec: str, work: Path, out_dir: Path) -> None:
    folder = install(spec, work / f"trt-{version}", deps=False)
    module = next(folder.glob("tensorrt_bindings/tensorrt*.so"))
    stubs = stub_libraries(module, work / f"stubs-{version}")
    env = {"LD_LIBRARY_PATH": str(stubs), "PATH": "/usr/bin:/bin"}
    data = json.loads(run([sys.executable, "-S", "-c", TRT_DUMP, str(folder)], env=env).stdout)
    if data["version"] != version:
        raise SystemExit(f"{spec} reports version {data['version']}, expected {version}")
    write_list(out_dir / f"{version}.txt", f"TensorRT {version} Python bindings ({spec}); "
               "written by tools/trt_api_surface.py", data["names"])


def cuda_surface(name: str, spec: str, work: Path, out_dir: Path) -> None:
    folder = install(spec, work / name, deps=True)
    data = json.loads(run([sys.executable, "-S", "-c", CUDA_DUMP, str(folder), ",".join(CUDA_CLASSES_WITH_MEMBERS)]).stdout)
    write_list(out_dir / f"{name}.txt", f"{spec}: {data['layout']} names starting with 'cuda', members of "
               f"{', '.join(CUDA_CLASSES_WITH_MEMBERS)}; written by tools/trt_api_surface.py", data["names"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgecv-api-surface"))
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument("--cuda", action="store_true", help="also write the cuda-python lists")
    args = parser.parse_args()
    for tool in ("gcc", "nm", "readelf"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install gcc and binutils")
    args.work.mkdir(parents=True, exist_ok=True)
    for version, spec in TENSORRT_WHEELS.items():
        tensorrt_surface(version, spec, args.work, args.out / "trt_api")
    if args.cuda:
        for name, spec in CUDA_WHEELS.items():
            cuda_surface(name, spec, args.work, args.out / "cuda_api")


if __name__ == "__main__":
    main()
