"""Power and energy per inference on a Jetson, from `tegrastats` power rails: sampled live during a timed
run (`measure_energy`), or read from a saved log (`edgecv power LOG`).

tegrastats prints one line per interval; each power rail reads `NAME cur/avg`, with `mW` units on
JetPack 5/6 (`VDD_IN 5123mW/5000mW`), `cur/avg/max` on JetPack 7.2 (`VDD_GPU 4925mW/4925mW/4925mW`) and
bare numbers on JetPack 4 (`POM_5V_IN 2000/2100`). Only the current reading is used: the average is
tegrastats' own running mean since it started. Energy is the integral of the summed rails' power over the
run, divided by the images.

Which rails are "the module": Orin Nano / Orin NX / Xavier NX / TX1 / TX2 measure the module's input,
VDD_IN (Nano: POM_5V_IN), which is the whole module but not the carrier board. AGX Orin, AGX Xavier and
Thor have no module-input rail: their module rails (GPU+SOC, CPU+CV, system 5 V, ...) are summed. Thor's
VIN, where tegrastats prints it, is the developer kit's input, carrier board included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime

from edgecv.errors import EdgecvError

# `NAME cur[mW]/avg[mW][/max[mW]]`; the lookahead rejects `RAM 2840/7620MB` and `SWAP 0/4096MB (cached 0MB)`.
_RAIL_PAIR = re.compile(
    r"(?<!\S)([A-Za-z][A-Za-z0-9_]*) (\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?(?:/\d+(?:\.\d+)?(?:mW)?)?(?=\s|$)"
)
# `NAME curmW` without an average (some JetPack 6 builds / wrappers print only the current value).
_RAIL_SINGLE = re.compile(r"(?<!\S)([A-Za-z][A-Za-z0-9_]*) (\d+(?:\.\d+)?)mW(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "EMC_FREQ", "GR3D_FREQ", "APE", "NC"}  # NC: an unconnected channel

# Rails that measure the whole module's input, best first. Summing one of these with sub-rails would
# count the same power twice, so when one is present it is used alone.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
# Rails that measure the developer kit's input, carrier board included (Thor): reported, never summed.
BOARD_RAILS = ("VIN",)

Sample = tuple[float, dict[str, float]]


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """Rail name -> current power in mW, for every power rail on one tegrastats line."""
    rails: dict[str, float] = {}
    for name, current, _avg in _RAIL_PAIR.findall(line):
        if name not in _NOT_RAILS:
            rails[name] = float(current)
    for name, current in _RAIL_SINGLE.findall(line):
        if name not in _NOT_RAILS:
            rails.setdefault(name, float(current))
    return rails


def default_rails(sample_rails: Iterable[str]) -> list[str]:
    """The rails whose sum is the module's power: VDD_IN (Orin Nano/NX, Xavier NX, TX1/TX2) or POM_5V_IN
    (Nano) when present; otherwise (AGX Orin: VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 [+ VDDQ...]; AGX
    Xavier: GPU, CPU, SOC, CV, VDDRQ, SYS5V; Thor: VDD_GPU + VDD_CPU_SOC_MSS + VIN_SYS_5V0) the module's
    rails, which do not overlap, summed. A board-input rail (Thor's VIN) is never part of the sum."""
    names = list(dict.fromkeys(sample_rails))
    for total in TOTAL_RAILS:
        if total in names:
            return [total]
    module = [n for n in names if n not in BOARD_RAILS]
    if not module:
        raise EdgecvError("tegrastats printed no power rails (run as root, or check `tegrastats` output)")
    return sorted(module)


def module_power_label(rails: Sequence[str]) -> str:
    """Says plainly what the summed rails measure."""
    if len(rails) == 1 and rails[0] in TOTAL_RAILS:
        return f"module power ({rails[0]}: the Jetson module's input; the carrier board is not included)"
    return (f"module power (sum of the module's rails {' + '.join(rails)}; this board has no module-input "
            "rail; the carrier board is not included)")


def _power_at(samples: Sequence[Sample], rails: Sequence[str], index: int) -> float:
    t, values = samples[index]
    missing = [r for r in rails if r not in values]
    if missing:
        raise EdgecvError(
            f"rail {missing[0]!r} is not in tegrastats output at t={t:.3f}; rails seen: "
            f"{', '.join(sorted(values)) or 'none'}"
        )
    return sum(values[r] for r in rails)


def _interpolate(ts: list[float], ps: list[float], t: float) -> float:
    """Power at time t: linear between samples, held flat beyond the first/last sample."""
    if t <= ts[0]:
        return ps[0]
    if t >= ts[-1]:
        return ps[-1]
    for i in range(1, len(ts)):
        if t <= ts[i]:
            span = ts[i] - ts[i - 1]
            w = (t - ts[i - 1]) / span if span > 0 else 1.0
            return ps[i - 1] + w * (ps[i] - ps[i - 1])
    return ps[-1]


def energy_per_inference(
    samples: list[Sample], rails: Sequence[str], t0: float, t1: float, inferences: int
) -> dict:
    """Trapezoid integral of the summed `rails` (mW) over [t0, t1] (seconds), per inference:
    {"energy_mj_per_image", "avg_power_mw", "rails", "samples", "duration_s"}. Samples inside the window
    are used as they are; the power at t0 and t1 is interpolated (held flat outside the sampled span)."""
    if t1 <= t0:
        raise EdgecvError(f"energy window is empty (t0={t0}, t1={t1})")
    if inferences < 1:
        raise EdgecvError(f"inferences must be >= 1, got {inferences}")
    if not rails:
        raise EdgecvError("no power rails chosen to sum")
    ordered = sorted(samples, key=lambda s: s[0])
    if not ordered:
        raise EdgecvError("no tegrastats samples were recorded during the run (interval too long?)")
    ts = [t for t, _ in ordered]
    ps = [_power_at(ordered, rails, i) for i in range(len(ordered))]
    points = [(t0, _interpolate(ts, ps, t0))]
    points += [(t, p) for t, p in zip(ts, ps, strict=True) if t0 < t < t1]
    points.append((t1, _interpolate(ts, ps, t1)))
    # mW x s = mJ
    energy_mj = sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(points, points[1:], strict=False))
    inside = sum(1 for t in ts if t0 <= t <= t1)
    return {
        "energy_mj_per_image": energy_mj / inferences,
        "avg_power_mw": energy_mj / (t1 - t0),
        "rails": list(rails),
        "samples": inside,
        "duration_s": t1 - t0,
    }


class TegrastatsSampler:
    """Runs `tegrastats --interval N` while the block is open and records (time, rails) per line, with
    time.perf_counter() of arrival, so the caller's perf_counter t0/t1 bracket the timed run:

        with TegrastatsSampler(interval_ms=100) as power:
            t0 = time.perf_counter(); ...; t1 = time.perf_counter()
        energy_per_inference(power.samples, default_rails(power.rails), t0, t1, n)
    """

    def __init__(self, interval_ms: int = 100, executable: str = "tegrastats") -> None:
        if interval_ms < 1:
            raise EdgecvError(f"tegrastats interval must be >= 1 ms, got {interval_ms}")
        self.interval_ms = interval_ms
        self.executable = executable
        self.samples: list[Sample] = []
        self.lines: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    @staticmethod
    def available(executable: str = "tegrastats") -> bool:
        return shutil.which(executable) is not None

    @property
    def rails(self) -> list[str]:
        """Rail names seen in the first sample."""
        with self._lock:
            return list(self.samples[0][1]) if self.samples else []

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.perf_counter()
            rails = parse_tegrastats_line(line)
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                if rails:
                    self.samples.append((now, rails))

    def start(self) -> TegrastatsSampler:
        exe = shutil.which(self.executable)
        if exe is None:
            raise EdgecvError(
                f"{self.executable!r} not found on PATH: power is measured on NVIDIA Jetson boards only"
            )
        cmd = [exe, "--interval", str(self.interval_ms)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # tegrastats writes through stdio; line-buffer it so each sample arrives on time
            cmd = [stdbuf, "-oL", *cmd]
        # Its own process group, so stop() also ends any child it started (a wrapper script's `sleep`).
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._reader.start()
        return self

    def wait_for_samples(self, count: int = 1, timeout_s: float = 5.0) -> None:
        """Block until `count` samples arrived, so a timed run starts with the sampler running."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            with self._lock:
                if len(self.samples) >= count:
                    return
            if self._proc is not None and self._proc.poll() is not None:
                break
            time.sleep(min(0.01, self.interval_ms / 1000))
        raise EdgecvError(
            f"tegrastats printed no power rails within {timeout_s:.0f} s "
            f"(output: {self.lines[-1][:120] if self.lines else 'nothing'})"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group this sampler created for it, and nothing else
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> TegrastatsSampler:
        self.start()
        try:
            self.wait_for_samples(1)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_energy(
    runner,
    batch,
    warmup: int = 10,
    runs: int = 200,
    interval_ms: int = 100,
    rails: Sequence[str] | None = None,
) -> dict:
    """Energy per image of `runner` on `batch` (a Jetson with tegrastats on PATH): warm-up, then `runs`
    timed calls while tegrastats samples; energy_per_inference over exactly the timed calls, per image
    (batch size x runs). Choose `runs` so the timed part spans several sampling intervals."""
    from edgecv.bench.latency import time_block

    with TegrastatsSampler(interval_ms=interval_ms) as sampler:
        time_block(runner, batch, warmup, 0)
        t0 = time.perf_counter()
        time_block(runner, batch, 0, runs)
        t1 = time.perf_counter()
        time.sleep(interval_ms / 1000)  # one more sample after t1, so the end is interpolated, not held
    chosen = list(rails) if rails else default_rails(sampler.rails)
    return energy_per_inference(sampler.samples, chosen, t0, t1, inferences=int(batch.shape[0]) * runs)


# ------------------------------------------------------------------------------------------ saved logs
_STAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")


def parse_tegrastats_log(text: str) -> list[tuple[datetime | None, dict[str, float]]]:
    """(time stamp or None, rails) per tegrastats line that has power rails. tegrastats (JetPack 5+)
    starts each line with `MM-DD-YYYY HH:MM:SS`; older releases print no time."""
    samples = []
    for line in text.splitlines():
        rails = parse_tegrastats_line(line)
        if not rails:
            continue
        stamp = _STAMP.match(line.strip())
        when = datetime.strptime(stamp.group(1), "%m-%d-%Y %H:%M:%S") if stamp else None
        samples.append((when, rails))
    return samples


def log_duration(stamps: Sequence[datetime | None], interval_ms: float | None = None,
                 duration_s: float | None = None) -> tuple[float | None, str]:
    """(seconds the log covers, how that was found): given, or samples x interval, or estimated from the
    time stamps (1 s resolution: n samples spanning first..last stamp cover span * n / (n - 1))."""
    if duration_s is not None:
        return float(duration_s), "given (--duration)"
    if interval_ms is not None:
        return len(stamps) * interval_ms / 1000.0, f"{len(stamps)} samples x {interval_ms:g} ms (--interval-ms)"
    known = [s for s in stamps if s is not None]
    if len(known) >= 2 and len(known) == len(stamps):
        span = (known[-1] - known[0]).total_seconds()
        if span > 0:
            return span * len(known) / (len(known) - 1), "estimated from the log's time stamps (1 s resolution)"
    return None, "unknown: pass --duration S or --interval-ms MS"


def _rail_stats(values: list[float]) -> dict[str, float]:
    return {"avg_mw": sum(values) / len(values), "min_mw": min(values), "max_mw": max(values)}


def power_summary(text: str, frames: int | None = None, duration_s: float | None = None,
                  interval_ms: float | None = None, rails: Sequence[str] | None = None) -> dict:
    """Average power per rail over a saved tegrastats log (from the current readings), the module's power
    (default_rails, or `rails`) and, with a duration, energy; per image when `frames` images ran.
    Samples are equally spaced, so the mean of the readings is the time average."""
    if frames is not None and frames < 1:
        raise EdgecvError(f"--frames must be >= 1, got {frames}")
    samples = parse_tegrastats_log(text)
    if not samples:
        raise EdgecvError("no tegrastats power rails in the log (is it tegrastats output? rails need root on some boards)")
    per_rail: dict[str, list[float]] = {}
    for _, values in samples:
        for name, mw in values.items():
            per_rail.setdefault(name, []).append(mw)
    chosen = list(rails) if rails else default_rails(per_rail)
    missing = [r for r in chosen if r not in per_rail]
    if missing:
        raise EdgecvError(f"rail {missing[0]!r} is not in the log; rails seen: {', '.join(sorted(per_rail))}")
    module_mw = [sum(values[r] for r in chosen) for _, values in samples if all(r in values for r in chosen)]
    seconds, how = log_duration([t for t, _ in samples], interval_ms, duration_s)
    module = {"rails": chosen, "label": module_power_label(chosen), **_rail_stats(module_mw)}
    result: dict = {"samples": len(samples), "rails": {n: _rail_stats(v) for n, v in per_rail.items()},
                    "module": module, "duration_s": seconds, "duration_from": how, "frames": frames}
    board = [r for r in BOARD_RAILS if r in per_rail]
    result["board"] = ({"rails": board, "label": "board power (VIN: the developer kit's input, carrier "
                        "board included)", **_rail_stats(per_rail[board[0]])} if board else None)
    if seconds is not None:
        result["energy_j"] = module["avg_mw"] * seconds / 1000.0
        if frames:
            result["energy_mj_per_image"] = module["avg_mw"] * seconds / frames
    return result


def format_power_summary(summary: dict) -> list[str]:
    """The lines `edgecv power` prints."""
    lines = [f"{summary['samples']} tegrastats samples; average power per rail (current readings):"]
    for name, stats in summary["rails"].items():
        lines.append(f"  {name:<18} {stats['avg_mw']:9.0f} mW  (min {stats['min_mw']:.0f}, max {stats['max_mw']:.0f})")
    module = summary["module"]
    lines.append(f"{module['label']}: {module['avg_mw'] / 1000:.2f} W average")
    if summary.get("board"):
        lines.append(f"{summary['board']['label']}: {summary['board']['avg_mw'] / 1000:.2f} W average")
    duration = summary.get("duration_s")
    lines.append(f"duration: {'-' if duration is None else f'{duration:.1f} s'} ({summary['duration_from']})")
    if "energy_j" in summary:
        lines.append(f"module energy: {summary['energy_j']:.2f} J")
    if "energy_mj_per_image" in summary:
        lines.append(f"energy per image: {summary['energy_mj_per_image']:.3f} mJ ({summary['frames']} images)")
    elif summary.get("frames"):
        lines.append("energy per image: - (the duration is unknown)")
    return lines
