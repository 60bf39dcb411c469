"""Parse trtexec's "Performance summary" so users can compare edgecv's numbers with NVIDIA's tool: a saved
trtexec log becomes a row of edgecv's bench table (`edgecv bench --trtexec-log LOG`)."""

from __future__ import annotations

import re
from pathlib import Path

from edgecv.bench.measure import BatchResult, BenchRow
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
# TensorRT 10: "Input binding for x with dimensions 1x3x224x224 is created."; 8.x: "Created input binding for
# x with dimensions 8x3x224x224"
_INPUT_BINDING = re.compile(r"[Ii]nput binding for \S+ with dimensions (\d+)x[\dx]+")
_QUERIES = re.compile(r"Timing trace has (\d+) queries over")
_DEVICE = re.compile(r"Selected Device:\s*(.+?)\s*$", re.MULTILINE)
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
    for key, pattern, kind in (("batch_size", _INPUT_BINDING, int), ("queries", _QUERIES, int),
                               ("device", _DEVICE, str)):
        found = pattern.findall(text)
        if found:
            result[key] = kind(found[-1])
    return result


def trtexec_row(text: str, name: str = "trtexec") -> BenchRow:
    """A saved trtexec log as a row of edgecv's bench table: host latency median / p90 / p99 per query
    (one query is one batch), throughput in images/s (queries/s x batch), and GPU compute time in the note."""
    parsed = parse_trtexec_output(text)
    batch = parsed.get("batch_size", 1)
    latency = parsed["latency"]
    result = BatchResult(
        batch_size=batch, p50_ms=latency["median"], p90_ms=latency.get("p90"), p99_ms=latency.get("p99"),
        mean_ms=latency.get("mean"), min_ms=latency.get("min"),
        throughput_ips=parsed["throughput_qps"] * batch, runs=parsed.get("queries", 0),
    )  # type: ignore[arg-type]  # None: not printed by this trtexec (shown as "-")
    gpu = parsed.get("gpu_compute", {})
    note = "trtexec: host latency (H2D + compute + D2H)"
    if gpu:
        note += (f"; GPU compute median {gpu.get('median', float('nan')):.3f} ms, "
                 f"p99 {gpu.get('p99', float('nan')):.3f} ms")
    return BenchRow(model=name, stage=None, format="engine", backend="trtexec",
                    device=parsed.get("device", "trtexec"), latency=[result], note=note)


def trtexec_log_row(path: str | Path) -> BenchRow:
    """trtexec_row of a log file, named after it; one clear line when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise EdgecvError(f"--trtexec-log {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        return trtexec_row(text, name=path.name)
    except EdgecvError as exc:
        raise EdgecvError(f"--trtexec-log {str(path)!r}: {exc}") from None
