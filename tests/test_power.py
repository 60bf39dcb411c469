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
        sampler.wait_for_samples(count=5, timeout_s=60)  # five lines, however busy the machine is
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
        deadline = time.monotonic() + 60
        while not sampler.lines and time.monotonic() < deadline:  # its first line, however busy the machine
            time.sleep(0.01)
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


# ------------------------------------------------------------------------------------------------------
# Real tegrastats lines, as the boards print them today (JetPack 6.2 / 7.1 / 7.2); time stamps kept.
ORIN_NANO_JP6 = (
    "04-27-2026 14:59:41 RAM 775/7620MB (lfb 3x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729,0%@729,"
    "0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@48.468C soc2@47.531C soc0@48.062C gpu@48.562C tj@49.156C "
    "soc1@49.156C VDD_IN 4761mW/4778mW VDD_CPU_GPU_CV 515mW/501mW VDD_SOC 1428mW/1428mW"
)
ORIN_NANO_JP7 = (  # JetPack 7.2 prints cur/avg/max
    "10-01-2026 20:36:32 RAM 974/7546MB (lfb 6x4MB) SWAP 0/5821MB (cached 0MB) CPU [0%@729,0%@729,0%@883,"
    "0%@883,0%@729,0%@729] GR3D_FREQ 12% cpu@49.843C/49.843C soc2@49.156C/49.156C soc0@50.187C/50.187C "
    "gpu@50.875C/50.875C tj@50.875C/50.875C soc1@50.218C/50.218C VDD_IN 4548mW/4548mW/4548mW "
    "VDD_CPU_GPU_CV 483mW/483mW/483mW VDD_SOC 1489mW/1489mW/1489mW"
)
ORIN_NX_JP7 = (
    "10-01-2026 20:36:35 RAM 2432/15598MB (lfb 4x4MB) SWAP 0/6144MB (cached 0MB) CPU [55%@1036,9%@1036,"
    "24%@1036,64%@1036,off,off,0%@729,0%@729] GR3D_FREQ 0% cv0@56.281C/56.281C cpu@57.156C/57.156C "
    "tj@59.687C/59.687C VDD_IN 7280mW/7280mW/7280mW"
)
AGX_ORIN_JP6 = (
    "05-09-2026 18:42:07 RAM 18202/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) CPU [16%@1949,6%@1761,"
    "4%@1222,4%@2201,4%@1036,33%@1036,0%@1036,40%@1036,3%@1190,46%@1190,6%@1190,2%@1190] EMC_FREQ 3%@2133 "
    "GR3D_FREQ 0%@[0,0] NVENC 78%@166 NVDEC off NVJPG off NVJPG1 off VIC 32%@115 OFA off NVDLA0 off NVDLA1 off "
    "PVA0_FREQ off APE 174 cpu@52.343C soc2@48.343C soc0@49.062C tj@52.343C soc1@49.531C "
    "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4607mW/4657mW"
)
AGX_ORIN_JP7 = (
    "07-31-2026 14:58:05 RAM 4714/62878MB (lfb 7x4MB) SWAP 0/2048MB (cached 0MB) CPU [78%@1728,33%@1728,"
    "off,off] EMC_FREQ 2%@2133 GR3D_FREQ 0%@[0,0] NVENC0 off NVDLA0 off APE 174 cpu@50.718C/50.718C "
    "tj@50.718C/50.718C soc1@49C/49C VDD_GPU_SOC 2265mW/2265mW/2265mW VDD_CPU_CV 2643mW/2643mW/2643mW "
    "VIN_SYS_5V0 4722mW/4722mW/4722mW"
)
AGX_ORIN_NC = (  # JetPack 5: an unconnected INA3221 channel is printed as NC
    "11-29-2025 10:14:02 RAM 6421/30536MB (lfb 3x4MB) SWAP 0/15268MB (cached 0MB) CPU [24%@2201,18%@2201] "
    "EMC_FREQ 31%@3199 GR3D_FREQ 78%@[1300] CV0@-256C CPU@57.593C GPU@56.125C tj@57.593C "
    "VDD_GPU_SOC 9431mW/8102mW VDD_CPU_CV 3122mW/2874mW VIN_SYS_5V0 4835mW/4610mW NC 0mW/0mW"
)
AGX_XAVIER_JP5 = (
    "RAM 3120/31920MB (lfb 7047x4MB) SWAP 0/15960MB (cached 0MB) CPU [0%@1190,1%@1190,0%@1190,0%@1189,"
    "0%@1190,0%@1191,0%@1190,0%@1190] EMC_FREQ 0%@1331 GR3D_FREQ 0%@114 VIC_FREQ 115 APE 150 AUX@36C "
    "CPU@36.5C thermal@35.7C Tboard@37C AO@35C GPU@35C Tdiode@38.75C PMIC@50C GPU 467mW/467mW CPU 467mW/467mW "
    "SOC 1245mW/1245mW CV 0mW/0mW VDDRQ 311mW/311mW SYS5V 2768mW/2768mW"
)
XAVIER_NX_JP4 = (
    "RAM 2673/7765MB (lfb 118x4MB) SWAP 0/3883MB (cached 0MB) CPU [12%@1190,8%@1190,4%@1190,off,off,off] "
    "EMC_FREQ 7% GR3D_FREQ 33% AO@35C GPU@33C PMIC@100C AUX@33.5C CPU@35C thermal@33.9C "
    "VDD_IN 3902/3611 VDD_CPU_GPU_CV 1331/1180 VDD_SOC 997/941"
)
THOR_JP71 = (
    "05-17-2026 10:00:33 RAM 4280/125773MB (lfb 29x4MB) SWAP 0/2048MB (cached 0MB) CPU [0%@972,0%@972,"
    "0%@2601,17%@2601] EMC_FREQ 0%@665 GR3D_FREQ @[0,0,0] NVENC0_FREQ @0 NVENC1_FREQ @0 VIC off OFA_FREQ @0 "
    "PVA0_FREQ off APE 300 cpu@35.25C tj@36.031C soc012@36.062C soc345@34.5C VDD_GPU 0mW/0mW "
    "VDD_CPU_SOC_MSS 4923mW/4544mW VIN_SYS_5V0 4327mW/4227mW"
)
THOR_JP72 = (
    "07-23-2026 15:29:27 RAM 9091/125811MB (lfb 19x4MB) SWAP 0/2048MB (cached 0MB) CPU [40%@972,16%@972] "
    "EMC_FREQ 7%@3200 GR3D_FREQ @[314,314,314] NVENC0_FREQ @1556 VIC 59%@423 OFA_FREQ @1556 PVA0_FREQ off "
    "APE 300 cpu@34.312C/34.843C tj@35.906C/35.906C gpu@35.906C/35.906C VDD_GPU 4925mW/4925mW/4925mW "
    "VDD_CPU_SOC_MSS 7953mW/8332mW/8710mW VIN_SYS_5V0 6667mW/6717mW/6767mW"
)
THOR_WITH_VIN = THOR_JP71 + " VIN 23150mW/23010mW"  # where tegrastats also prints the kit's input (INA238)

BOARDS = {
    "orin-nano-jp6": (ORIN_NANO_JP6, {"VDD_IN": 4761, "VDD_CPU_GPU_CV": 515, "VDD_SOC": 1428}, ["VDD_IN"]),
    "orin-nano-jp7.2": (ORIN_NANO_JP7, {"VDD_IN": 4548, "VDD_CPU_GPU_CV": 483, "VDD_SOC": 1489}, ["VDD_IN"]),
    "orin-nx-jp7.2": (ORIN_NX_JP7, {"VDD_IN": 7280}, ["VDD_IN"]),
    "agx-orin-jp6": (AGX_ORIN_JP6, {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4607},
                     ["VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]),
    "agx-orin-jp7.2": (AGX_ORIN_JP7, {"VDD_GPU_SOC": 2265, "VDD_CPU_CV": 2643, "VIN_SYS_5V0": 4722},
                       ["VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]),
    "agx-orin-nc": (AGX_ORIN_NC, {"VDD_GPU_SOC": 9431, "VDD_CPU_CV": 3122, "VIN_SYS_5V0": 4835},
                    ["VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]),
    "agx-xavier-jp5": (AGX_XAVIER_JP5, {"GPU": 467, "CPU": 467, "SOC": 1245, "CV": 0, "VDDRQ": 311, "SYS5V": 2768},
                       ["CPU", "CV", "GPU", "SOC", "SYS5V", "VDDRQ"]),
    "xavier-nx-jp4": (XAVIER_NX_JP4, {"VDD_IN": 3902, "VDD_CPU_GPU_CV": 1331, "VDD_SOC": 997}, ["VDD_IN"]),
    "thor-jp7.1": (THOR_JP71, {"VDD_GPU": 0, "VDD_CPU_SOC_MSS": 4923, "VIN_SYS_5V0": 4327},
                   ["VDD_CPU_SOC_MSS", "VDD_GPU", "VIN_SYS_5V0"]),
    "thor-jp7.2": (THOR_JP72, {"VDD_GPU": 4925, "VDD_CPU_SOC_MSS": 7953, "VIN_SYS_5V0": 6667},
                   ["VDD_CPU_SOC_MSS", "VDD_GPU", "VIN_SYS_5V0"]),
    "thor-with-vin": (THOR_WITH_VIN, {"VDD_GPU": 0, "VDD_CPU_SOC_MSS": 4923, "VIN_SYS_5V0": 4327, "VIN": 23150},
                      ["VDD_CPU_SOC_MSS", "VDD_GPU", "VIN_SYS_5V0"]),
}


@pytest.mark.parametrize("board", BOARDS)
def test_current_readings_and_module_rails_of_every_board(board):
    """The current reading of every rail (not tegrastats' running average or max), and the rails whose sum
    is the module's power; a board input (Thor's VIN) is never part of it."""
    from edgecv.bench.power import module_power_label

    line, rails, chosen = BOARDS[board]
    parsed = parse_tegrastats_line(line)
    assert parsed == {k: float(v) for k, v in rails.items()}
    assert default_rails(parsed) == chosen
    label = module_power_label(chosen)
    assert label.startswith("module power") and "carrier board is not included" in label
    assert ("module's input" in label) == (chosen == ["VDD_IN"])


def _log(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def test_power_of_a_saved_log_averages_the_current_readings():
    from edgecv.bench.power import power_summary

    # Thor on JetPack 7.2, one line per second: VDD_GPU rises 4925 -> 8925 mW; tegrastats' own averages lag.
    lines = [THOR_JP72.replace("15:29:27", f"15:29:{27 + i}").replace("VDD_GPU 4925mW/4925mW/4925mW",
             f"VDD_GPU {4925 + 1000 * i}mW/4925mW/4925mW") for i in range(5)]
    summary = power_summary(_log(["some other output", *lines]))
    assert summary["samples"] == 5
    assert summary["rails"]["VDD_GPU"] == {"avg_mw": 6925.0, "min_mw": 4925.0, "max_mw": 8925.0}
    assert summary["module"]["rails"] == ["VDD_CPU_SOC_MSS", "VDD_GPU", "VIN_SYS_5V0"]
    assert summary["module"]["avg_mw"] == pytest.approx(6925 + 7953 + 6667)
    assert summary["duration_s"] == pytest.approx(5.0)  # 5 samples over 4 s of stamps: 1 s each
    assert summary["energy_j"] == pytest.approx((6925 + 7953 + 6667) * 5 / 1000)
    assert summary["board"] is None and "energy_mj_per_image" not in summary


def test_energy_per_image_from_frames_and_interval():
    from edgecv.bench.power import format_power_summary, power_summary

    lines = [ORIN_NANO_JP6.replace("VDD_IN 4761mW", f"VDD_IN {4000 + 200 * i}mW") for i in range(10)]
    summary = power_summary(_log(lines), frames=250, interval_ms=100)
    avg = sum(4000 + 200 * i for i in range(10)) / 10  # 4900 mW over 10 x 100 ms
    assert summary["module"]["avg_mw"] == pytest.approx(avg) and summary["duration_s"] == pytest.approx(1.0)
    assert summary["energy_mj_per_image"] == pytest.approx(avg * 1.0 / 250)  # mW x s / images = mJ
    text = "\n".join(format_power_summary(summary))
    assert "module power (VDD_IN: the Jetson module's input; the carrier board is not included): 4.90 W" in text
    assert "energy per image: 19.600 mJ (250 images)" in text
    given = power_summary(_log(lines), frames=250, duration_s=2.0)
    assert given["energy_mj_per_image"] == pytest.approx(avg * 2.0 / 250)


def test_board_input_is_reported_beside_module_power():
    from edgecv.bench.power import format_power_summary, power_summary

    summary = power_summary(_log([THOR_WITH_VIN] * 3), frames=10)
    assert summary["board"]["avg_mw"] == 23150 and summary["module"]["avg_mw"] == 0 + 4923 + 4327
    assert summary["duration_s"] is None and "energy_j" not in summary  # one time stamp: no duration
    text = "\n".join(format_power_summary(summary))
    assert "board power (VIN: the developer kit's input, carrier board included): 23.15 W" in text
    assert "energy per image: - (the duration is unknown)" in text


def test_power_log_errors():
    from edgecv.bench.power import power_summary

    with pytest.raises(EdgecvError, match="no tegrastats power rails"):
        power_summary("RAM 2840/7620MB (lfb 512x4MB) SWAP 0/4096MB (cached 0MB)\n")
    with pytest.raises(EdgecvError, match="'VDD_GPU' is not in the log; rails seen: VDD_CPU_GPU_CV, VDD_IN"):
        power_summary(_log([ORIN_NANO_JP6]), rails=["VDD_GPU"])
    with pytest.raises(EdgecvError, match="--frames must be >= 1"):
        power_summary(_log([ORIN_NANO_JP6]), frames=0)


def test_power_cli(tmp_path):
    import json

    from conftest import run_cli

    log = tmp_path / "tegrastats.log"
    log.write_text(_log([AGX_ORIN_JP6] * 4))
    proc = run_cli("power", str(log), "--frames", "40", "--interval-ms", "500", "--json", str(tmp_path / "p.json"),
                   timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("module power (sum of the module's rails VDD_CPU_CV + VDD_GPU_SOC + VIN_SYS_5V0; this board has no "
            "module-input rail; the carrier board is not included): 8.63 W") in proc.stdout
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["energy_mj_per_image"] == pytest.approx((2412 + 1607 + 4607) * 2.0 / 40)
    missing = run_cli("power", str(tmp_path / "nope.log"), timeout=120)
    assert missing.returncode == 2 and "nope.log" in missing.stderr and "cannot read the log" in missing.stderr
