"""Killing `compress` mid-stage and running the same command again resumes instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import TINY, run_cli, write_recipe


def test_kill_9_then_rerun_resumes(tmp_path):
    recipe = {
        **TINY,
        "name": "resume",
        "data": {**TINY["data"], "train_size": 1024},
        "stages": [{"prune": {"ratio": 0.5}}, {"finetune": {"epochs": 3, "lr": 0.02}}],
        "bench": {**TINY["bench"], "backends": ["torch"]},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    run = runs / "resume"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecv", "compress", str(path), "--out", str(runs), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    state = run / "02-finetune" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists(), "fine-tuning never saved its first epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    manifest = json.loads((run / "manifest.json").read_text())
    status = {s["name"]: s["status"] for s in manifest["stages"]}
    assert status == {"train": "done", "prune": "done", "finetune": "running"}
    assert not list(run.rglob("*.tmp")), "a half-written file was left behind"
    baseline = (run / "00-train" / "model.pt").read_bytes()

    again = run_cli("compress", str(path), "--out", str(runs), "--device", "cpu")
    assert again.returncode == 0, again.stderr
    out = again.stdout
    assert "00-train: finished earlier, skipped" in out and "01-prune: finished earlier, skipped" in out
    assert "train epoch" not in out
    assert "resuming finetune from epoch" in out
    first_resumed = int(out.split("resuming finetune from epoch ")[1].split("/")[0])
    assert first_resumed >= 2
    assert f"finetune epoch {first_resumed - 1}/3" not in out  # finished epochs are not redone
    assert "finetune epoch 3/3" in out
    assert (run / "00-train" / "model.pt").read_bytes() == baseline
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 3
    assert not (run / "02-finetune" / "state.pt").exists()
    log = [json.loads(line) for line in (run / "02-finetune" / "log.jsonl").read_text().splitlines()]
    events = [("resume", e["epochs_done"]) if e["event"] == "resume" else ("epoch", e["epoch"]) for e in log
              if e["event"] in ("resume", "epoch")]
    resume_at = events.index(("resume", first_resumed - 1))
    assert [n for kind, n in events[resume_at + 1 :]] == list(range(first_resumed, 4))


def test_changed_stage_config_reruns_that_stage_only(tmp_path):
    recipe = {**TINY, "name": "change", "stages": [{"prune": {"ratio": 0.5}}],
              "train": {**TINY["train"], "epochs": 1}, "bench": {**TINY["bench"], "backends": ["torch"]}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    runs = tmp_path / "runs"
    assert run_cli("compress", str(path), "--out", str(runs), "--device", "cpu").returncode == 0
    proc = run_cli("compress", str(path), "--out", str(runs), "--device", "cpu", "--set", "stages.prune.ratio=0.25")
    assert proc.returncode == 0, proc.stderr
    assert "00-train: finished earlier, skipped" in proc.stdout
    assert "pruned at ratio 0.25" in proc.stdout
