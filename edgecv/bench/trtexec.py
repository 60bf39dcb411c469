"""Parse trtexec's "Performance summary" so users can compare edgecv's numbers with NVIDIA's tool."""

from __future__ import annotations

import re

from edgecv.errors import EdgecvError

_UNIT_TO_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
# Summary lines carrying timing statistics (TensorRT 8.x and 10.x print the same names).
_STAT_LINES = {
    "latency": "Latency",
    "enqueue": "Enqueue Time",
    "h2d": "H2D Latency",
    "gpu_compute": "GPU Compute Time",
    "d2h": "D2H Latency",
}
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+0-9.eE]+)\s*(ms|us|s)\b")
_THROUGHPUT = re.compile(r"Throughput:\s*([0-9.eE+-]+)\s*qps")
_TOTALS = {
    "total_host_walltime_s": re.compile(r"Total Host Walltime:\s*([0-9.eE+-]+)\s*s\b"),
    "total_gpu_compute_s": re.compile(r"Total GPU Compute Time:\s*([0-9.eE+-]+)\s*s\b"),
}


def _parse_stats(body: str) -> dict[str, float]:
    stats = {}
    for name, pct, value, unit in _STAT.findall(body):
        key = f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}" if pct else name
        stats[key] = float(value) * _UNIT_TO_MS[unit]
    return stats


def _last_line(text: str, label: str) -> str | None:
    """The text after `label:` on the last summary line that has it (trtexec may print several runs)."""
    found = None
    for match in re.finditer(rf"(?:^|\]\s*){re.escape(label)}:\s*(min\s*=.*)$", text, re.MULTILINE):
        found = match.group(1)
    return found


def parse_trtexec_output(text: str) -> dict:
    """From trtexec's log: {"throughput_qps", "latency": {min, max, mean, median, p90, p95, p99}, and where
    printed "gpu_compute", "enqueue", "h2d", "d2h" (same keys) and total_host_walltime_s /
    total_gpu_compute_s}. Times in ms. "Latency" is host latency (H2D + compute + D2H) per query."""
    throughputs = _THROUGHPUT.findall(text)
    latency_line = _last_line(text, "Latency")
    if not throughputs or latency_line is None:
        missing = "Throughput" if not throughputs else "Latency"
        raise EdgecvError(
            f"not trtexec output: no '{missing}:' line in its performance summary "
            "(pass the full log of `trtexec --loadEngine=... ` or `--onnx=...`)"
        )
    result: dict = {"throughput_qps": float(throughputs[-1])}
    for key, label in _STAT_LINES.items():
        line = _last_line(text, label)
        if line is not None:
            stats = _parse_stats(line)
            if stats:
                result[key] = stats
    if "median" not in result.get("latency", {}):
        raise EdgecvError("trtexec output has a 'Latency:' line without a median value")
    for key, pattern in _TOTALS.items():
        found = pattern.findall(text)
        if found:
            result[key] = float(found[-1])
    return result
