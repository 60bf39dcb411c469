#!/usr/bin/env python3
"""Collect the sections tools/gpu_check.sh ran into one JSON object (printed, and written to
OUT/gpu_check.json). Each section left OUT/<name>.status.json ({"status": ok|failed|timeout|skipped,
"rc", "seconds", "reason"}) and, for some, its own output: gpu_tests.xml (pytest's JUnit report),
<throughput>.json (benchmarks/train_throughput.py), runs/quickstart/report.json.

    python tools/gpu_check_summary.py OUT
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

THROUGHPUT = [("resnet50", "eager"), ("resnet18", "eager"), ("resnet50", "compile"), ("resnet18", "compile")]
RESNET50_TARGET = 3000  # images/s, ResNet-50 AMP on one H100/H200 (A100-80GB reference: 2,470)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def section_status(out: Path, name: str) -> dict:
    status = _read_json(out / f"{name}.status.json") or {"status": "not run"}
    err = out / f"{name}.err"
    if status.get("status") in ("failed", "timeout") and err.is_file():
        tail = [line for line in err.read_text(errors="replace").splitlines() if line.strip()][-3:]
        status["stderr_tail"] = tail
    return status


def gpu_tests(out: Path) -> dict:
    """Counts and names from pytest's JUnit XML."""
    result = section_status(out, "gpu_tests")
    try:
        root = ET.parse(out / "gpu_tests.xml").getroot()
    except (OSError, ET.ParseError):
        return result
    passed, failed, skipped = [], [], []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append(f"{name}: {skip.get('message', '')}")
        else:
            passed.append(name)
    return {**result, "passed": len(passed), "failed": failed, "skipped": skipped, "tests": passed}


def throughput(out: Path) -> dict:
    rows: dict[str, dict] = {}
    for model, mode in THROUGHPUT:
        name = f"train_{model}_{mode}"
        status = section_status(out, name)
        measured = _read_json(out / f"{name}.json")
        rows.setdefault(model, {})[mode] = {**status, **(measured or {})}
    best = max((r.get("images_per_s", 0) for r in rows.get("resnet50", {}).values()), default=0)
    rows["resnet50_target_images_per_s"] = RESNET50_TARGET
    rows["resnet50_meets_target"] = best >= RESNET50_TARGET
    return rows


def quickstart(out: Path) -> dict:
    result = {**section_status(out, "quickstart"), "note": "ran beside the gpu tests: its wall time is not a clean figure"}
    report = _read_json(out / "runs" / "quickstart" / "report.json")
    if report is not None:
        result["summary"] = report.get("summary")
        result["stages_s"] = report.get("stages")
    return result


def summarize(out: Path) -> dict:
    return {
        "device": _read_json(out / "device.json"),
        "gpu_tests": gpu_tests(out),
        "train_images_per_s": throughput(out),
        "quickstart_cuda": quickstart(out),
        "wall_s": (_read_json(out / "wall.json") or {}).get("seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: gpu_check_summary.py OUT", file=sys.stderr)
        return 2
    out = Path(args[0])
    summary = summarize(out)
    text = json.dumps(summary, indent=1, default=str)
    (out / "gpu_check.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
