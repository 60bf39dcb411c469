"""tegrastats parsing on several boards, the energy integral, and the sampler against a fake tegrastats."""

from __future__ import annotations

import os
import stat
import time

import pytest

from edgecv.bench.power import TegrastatsSampler, default_rails, energy_per_inference, parse_tegrastats_line
from edgecv.errors import EdgecvError

# Lines in the formats tegrastats prints on each board family (JetPack 6 Orin Nano/NX with `mW`, AGX
# Orin, JetPack 4 Nano with bare numbers, AGX Xavier on JetPack 4 with short rail names, TX1).
ORIN_NANO = (
    "11-18-2024 10:21:44 RAM 2840/7620MB (lfb 512x4MB) SWAP 0/4096MB (cached 0MB) "
    "CPU [25%@1420,off,off,20%@1420,22%@1420,18%@1420] GR3D_FREQ 76% cpu@42.5C soc2@40.1C "
    "soc0@41.3C gpu@40C tj@42.5C soc1@40.8C VDD_IN 5123mW/5000mW VDD_CPU_GPU_CV 1234mW/1200mW "
    "VDD_SOC 1500mW/1490mW"
)
AGX_ORIN = (
    "RAM 5187/30536MB (lfb 5837x4MB) SWAP 0/15268MB (cached 0MB) CPU [3%@729,1%@729,0%@729,0%@729,"
    "0%@2201,0%@2201,0%@2201,0%@2201] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305,305] VIC_FREQ 729 APE 174 "
    "CV0@-256C CPU@47.531C SOC2@44.843C SOC0@45.625C CV1@-256C GPU@43.937C tj@47.531C SOC1@44.375C "
    "CV2@-256C VDD_GPU_SOC 2389mW/2389mW VDD_CPU_CV 398mW/398mW VIN_SYS_5V0 2821mW/2821mW "
    "VDDQ_VDD2_1V8AO 402mW/402mW"
)
NANO = (
    "RAM 613/3964MB (lfb 634x4MB) SWAP 0/1982MB (cached 0MB) CPU [2%@102,1%@102,0%@102,0%@102] "
    "EMC_FREQ 0% GR3D_FREQ 0% PLL@39C CPU@40.5C PMIC@100C GPU@41C AO@46C thermal@41C "
    "POM_5V_IN 900/943 POM_5V_GPU 0/0 POM_5V_CPU 123/123"
)
AGX_XAVIER = (
    "RAM 14700/15692MB (lfb 3x2MB) SWAP 898/8192MB (cached 23MB) CPU [0%@1190,0%@1190,0%@1190,"
    "0%@1190,0%@1190,0%@1190,0%@1190,0%@1190] EMC_FREQ 0% GR3D_FREQ 0% AO@30C GPU@30.5C Tboard@31C "
    "Tdiode@32C AUX@30.5C CPU@31.5C thermal@30.8C PMIC@100C GPU 463/463 CPU 618/618 SOC 2936/2936 "
    "CV 0/0 VDDRQ 309/309 SYS5V 3306/3306"
)
TX1 = (
    "RAM 1179/3983MB (lfb 120x4MB) IRAM 0/252kB(lfb 252kB) CPU [1%@102,4%@102,0%@102,0%@102] "
    "EMC_FREQ 7%@408 GR3D_FREQ 0%@76 APE 25 AO@42.5C CPU@37.5C GPU@39C PLL@37C Tdiode@42.75C "
    "PMIC@100C Tboard@42C thermal@38.5C VDD_IN 2532/2698 VDD_CPU 76/178 VDD_GPU 19/19"
)
CURRENT_ONLY = (
    "RAM 2840/7620MB (lfb 512x4MB) GR3D_FREQ 76% VDD_IN 5765mW VDD_CPU_GPU_CV 1548mW VDD_SOC 1497mW"
)


@pytest.mark.parametrize(
    ("line", "rails", "chosen"),
    [
        (ORIN_NANO, {"VDD_IN": 5123, "VDD_CPU_GPU_CV": 1234, "VDD_SOC": 1500}, ["VDD_IN"]),
        (
            AGX_ORIN,
            {"VDD_GPU_SOC": 2389, "VDD_CPU_CV": 398, "VIN_SYS_5V0": 2821, "VDDQ_VDD2_1V8AO": 402},
            ["VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"],
        ),
        (NANO, {"POM_5V_IN": 900, "POM_5V_GPU": 0, "POM_5V_CPU": 123}, ["POM_5V_IN"]),
        (
            AGX_XAVIER,
            {"GPU": 463, "CPU": 618, "SOC": 2936, "CV": 0, "VDDRQ": 309, "SYS5V": 3306},
            ["CPU", "CV", "GPU", "SOC", "SYS5V", "VDDRQ"],
        ),
        (TX1, {"VDD_IN": 2532, "VDD_CPU": 76, "VDD_GPU": 19}, ["VDD_IN"]),
        (CURRENT_ONLY, {"VDD_IN": 5765, "VDD_CPU_GPU_CV": 1548, "VDD_SOC": 1497}, ["VDD_IN"]),
    ],
    ids=["orin-nano", "agx-orin", "nano", "agx-xavier", "tx1", "current-only"],
)
def test_parse_rails_per_board(line, rails, chosen):
    parsed = parse_tegrastats_line(line)
    assert parsed == {k: float(v) for k, v in rails.items()}  # RAM/SWAP/IRAM never taken for rails
    assert default_rails(parsed) == chosen


def test_line_without_rails():
    assert parse_tegrastats_line("RAM 2840/7620MB (lfb 512x4MB) SWAP 0/4096MB (cached 0MB)") == {}
    with pytest.raises(EdgecvError, match="no power rails"):
        default_rails([])


def test_energy_of_constant_power():
    samples = [(t / 10, {"VDD_IN": 5000.0, "VDD_SOC": 1000.0}) for t in range(0, 31)]  # 0..3 s
    result = energy_per_inference(samples, ["VDD_IN"], t0=1.0, t1=3.0, inferences=100)
    assert result["energy_mj_per_image"] == pytest.approx(5000 * 2 / 100)  # 5 W for 2 s = 10 J
    assert result["avg_power_mw"] == pytest.approx(5000)
    assert result["rails"] == ["VDD_IN"] and result["duration_s"] == pytest.approx(2.0)


def test_energy_of_a_ramp_with_window_between_samples():
    # Power rises 1000 mW per second, sampled each second; the window [0.5, 2.5] s falls between samples.
    samples = [(float(t), {"A": 1000.0 * t, "B": 500.0}) for t in range(4)]
    result = energy_per_inference(samples, ["A", "B"], t0=0.5, t1=2.5, inferences=4)
    # integral of (1000 t + 500) from 0.5 to 2.5 = 500 (2.5^2 - 0.5^2) + 500 * 2 = 3000 + 1000 mJ
    assert result["energy_mj_per_image"] == pytest.approx(4000 / 4)
    assert result["avg_power_mw"] == pytest.approx(2000)
    assert result["samples"] == 2


def test_energy_holds_power_beyond_the_samples_and_rejects_bad_input():
    samples = [(1.0, {"VDD_IN": 4000.0}), (2.0, {"VDD_IN": 4000.0})]
    assert energy_per_inference(samples, ["VDD_IN"], 0.0, 4.0, 1)["energy_mj_per_image"] == pytest.approx(
        16000
    )
    with pytest.raises(EdgecvError, match="'VDD_GPU'.*rails seen: VDD_IN"):
        energy_per_inference(samples, ["VDD_GPU"], 0.0, 1.0, 1)
    with pytest.raises(EdgecvError, match="empty"):
        energy_per_inference(samples, ["VDD_IN"], 2.0, 1.0, 1)
    with pytest.raises(EdgecvError, match="no tegrastats samples"):
        energy_per_inference([], ["VDD_IN"], 0.0, 1.0, 1)


def fake_tegrastats(folder, lines: list[str]) -> None:
    """A `tegrastats` on PATH that replays recorded lines every --interval ms, like the real one."""
    (folder / "lines.txt").write_text("\n".join(lines) + "\n")
    script = folder / "tegrastats"
    script.write_text(
        "#!/bin/bash\n"
        "interval=1000\n"
        'while [ $# -gt 0 ]; do case "$1" in --interval) interval="$2"; shift 2;; *) shift;; esac; done\n'
        'delay=$(awk "BEGIN { print $interval / 1000 }")\n'
        "while true; do\n"
        f'  while IFS= read -r line; do echo "$line"; sleep "$delay"; done < "{folder}/lines.txt"\n'
        "done\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_sampler_records_a_real_subprocess(tmp_path, monkeypatch):
    fake_tegrastats(tmp_path, [ORIN_NANO, ORIN_NANO.replace("VDD_IN 5123mW", "VDD_IN 6123mW")])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert TegrastatsSampler.available()
    with TegrastatsSampler(interval_ms=20) as sampler:
        t0 = time.perf_counter()
        time.sleep(0.3)
        t1 = time.perf_counter()
    assert sampler._proc is None  # stopped
    assert len(sampler.samples) >= 5
    assert sampler.rails == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert {s[1]["VDD_IN"] for s in sampler.samples} == {5123.0, 6123.0}
    times = [t for t, _ in sampler.samples]
    assert times == sorted(times)
    energy = energy_per_inference(sampler.samples, default_rails(sampler.rails), t0, t1, inferences=10)
    assert 5123 <= energy["avg_power_mw"] <= 6123
    assert energy["energy_mj_per_image"] == pytest.approx(energy["avg_power_mw"] * (t1 - t0) / 10)


def test_sampler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgecvError, match="not found on PATH.*Jetson"):
        TegrastatsSampler().start()
    fake_tegrastats(tmp_path, ["RAM 2840/7620MB (lfb 512x4MB) SWAP 0/4096MB (cached 0MB)"])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    sampler = TegrastatsSampler(interval_ms=10).start()
    try:
        with pytest.raises(EdgecvError, match="no power rails.*RAM 2840"):
            sampler.wait_for_samples(timeout_s=0.3)
    finally:
        sampler.stop()


def test_measure_energy_brackets_the_timed_runs(tmp_path, monkeypatch):
    import numpy as np

    from edgecv.bench.power import measure_energy

    fake_tegrastats(tmp_path, [ORIN_NANO])  # a constant 5123 mW on VDD_IN
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    calls: list[int] = []

    def runner(batch):
        calls.append(batch.shape[0])
        time.sleep(0.01)
        return np.zeros((batch.shape[0], 10), dtype=np.float32)

    result = measure_energy(
        runner, np.zeros((4, 1, 28, 28), dtype=np.float32), warmup=2, runs=10, interval_ms=20
    )
    assert calls == [4] * 12
    assert result["rails"] == ["VDD_IN"] and result["avg_power_mw"] == pytest.approx(5123)
    assert result["energy_mj_per_image"] == pytest.approx(5123 * result["duration_s"] / 40)
