"""One writer per run dir: a second `compress`, `train` or `sensitivity` into a run dir in use is refused in
one line naming the holder; a lock left by a killed run is taken over (with a warning) and the run resumes.
Real subprocesses throughout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY, run_cli, write_recipe

from edgecv.io import LOCK_FILE

# The baseline alone (2 epochs of a ResNet-8 on 512 synthetic images), timed on torch only.
LOCKED = {**TINY, "name": "locked", "train": {**TINY["train"], "epochs": 2}, "stages": [],
          "bench": {**TINY["bench"], "batch_sizes": [1], "backends": ["torch"]}}  # fmt: skip
IN_USE = re.compile(r"^error: run dir (\S+) is in use by pid (\d+) \((.+)\) since \d\d:\d\d; wait for it or use --out$")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgecv", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, what: str, key: str | None = None) -> None:
    """Poll until `path` exists (and, with `key`, holds JSON with that key) while `proc` runs."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if path.exists() and (key is None or key in json.loads(path.read_text())):
                return
        except ValueError:  # written just now: not complete yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} never appeared (exit code {proc.poll()})")


def test_a_second_compress_into_a_run_dir_in_use_is_refused_while_the_first_finishes(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", LOCKED)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "locked"
    first = _start("compress", str(recipe), "--out", str(runs), "--device", "cpu")
    try:
        _wait_for(run / LOCK_FILE, first, "the first run's lock", key="pid")
        os.killpg(first.pid, signal.SIGSTOP)  # frozen while holding the lock: the second surely meets it
        try:
            second = run_cli("compress", str(recipe), "--out", str(runs), "--device", "cpu")
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    match = IN_USE.match(lines[0])
    assert match, lines[0]
    assert match.group(1) == str(run) and int(match.group(2)) == first.pid
    assert match.group(3) == f"edgecv compress {recipe} --out {runs} --device cpu"
    assert "train epoch" not in second.stdout  # refused before any work
    assert first.returncode == 0, err[-3000:]
    assert "train epoch 2/2" in out and "warning" not in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"]
    assert not (run / LOCK_FILE).exists()  # released on a normal exit


def test_after_kill_9_a_rerun_takes_the_stale_lock_over_and_resumes(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", LOCKED)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "locked"
    first = _start("compress", str(recipe), "--out", str(runs), "--device", "cpu")
    try:
        _wait_for(run / "00-train" / "state.pt", first, "the first epoch's training state")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid  # left behind by the killed run

    again = run_cli("compress", str(recipe), "--out", str(runs), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning: run dir")]
    assert warnings == [f"warning: run dir {run} was left locked by pid {first.pid} (edgecv compress {recipe} --out "
                        f"{runs} --device cpu) since {warnings[0].split(' since ')[1].split(',')[0]}, which is no "
                        "longer running; taking its lock over"], again.stderr  # fmt: skip
    assert "error" not in again.stderr
    resumed = int(again.stdout.split("resuming train from epoch ")[1].split("/")[0])
    assert resumed == 2 and "train epoch 1/2" not in again.stdout  # the finished epoch is not redone
    assert "train epoch 2/2" in again.stdout
    assert [s["status"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == ["done"]
    assert not (run / LOCK_FILE).exists()


HOLD = """
import sys
from pathlib import Path
from edgecv.io import lock_run_dir
lock_run_dir(Path(sys.argv[1]), "edgecv compress held.yaml")
print("locked", flush=True)
sys.stdin.read()
"""


def test_train_and_sensitivity_refuse_a_run_dir_in_use(tmp_path):
    """Another live process holds the run dir: both commands stop in one line before writing anything."""
    recipe = write_recipe(tmp_path / "r.yaml", {**LOCKED, "stages": [{"ptq": {"calib_batches": 1}}]})
    runs, run = tmp_path / "runs", tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["train"], ["sensitivity"]):
            proc = run_cli(*command, str(recipe), "--out", str(runs), "--device", "cpu")
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (command, proc.stderr)
            match = IN_USE.match(lines[0])
            assert match and match.groups() == (str(run), str(holder.pid), "edgecv compress held.yaml"), lines[0]
            assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and (run / LOCK_FILE).exists()  # the holder exited without unlocking
    # its lock died with it: the run dir is free again, and the stale file is taken over
    proc = run_cli("train", str(recipe), "--out", str(runs), "--device", "cpu", "--set", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"was left locked by pid {holder.pid} (edgecv compress held.yaml)" in proc.stderr
    assert not (run / LOCK_FILE).exists()
