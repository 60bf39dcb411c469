"""Jetson facts every report carries: model, L4T/JetPack, `nvpmodel -q` mode, whether the clocks are locked
(`jetson_clocks --show`), from outputs captured on the boards."""

from __future__ import annotations

import pytest

from edgecv.device import (
    JETPACK_TENSORRT,
    clock_warning,
    jetpack_for_l4t,
    jetson_facts,
    jetson_summary,
    parse_jetson_clocks_show,
    parse_nvpmodel_query,
)

# `jetson_clocks --show` on a Jetson Nano (JetPack 4.6), before and after `sudo jetson_clocks`
NANO_DYNAMIC = """\
SOC family:tegra210  Machine:NVIDIA Jetson Nano Developer Kit
Online CPUs: 0-3
CPU Cluster Switching: Disabled
cpu0: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=921600 IdleStates: WFI=1 c7=1
cpu2: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=1132800 IdleStates: WFI=1 c7=1
cpu3: Online=1 Governor=schedutil MinFreq=102000 MaxFreq=1428000 CurrentFreq=1326000 IdleStates: WFI=1 c7=1
GPU MinFreq=76800000 MaxFreq=921600000 CurrentFreq=230400000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=0
Fan: speed=0
NV Power Mode: MAXN
"""
NANO_LOCKED = """\
SOC family:tegra210  Machine:NVIDIA Jetson Nano Developer Kit
Online CPUs: 0-3
CPU Cluster Switching: Disabled
cpu0: Online=1 Governor=schedutil MinFreq=1428000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=1428000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=0 c7=0
cpu2: Online=1 Governor=schedutil MinFreq=1428000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=0 c7=0
cpu3: Online=1 Governor=schedutil MinFreq=1428000 MaxFreq=1428000 CurrentFreq=1428000 IdleStates: WFI=0 c7=0
GPU MinFreq=921600000 MaxFreq=921600000 CurrentFreq=921600000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=1
Fan: speed=255
NV Power Mode: MAXN
"""
# 5 W mode: two cores are off; an offline core's frequencies do not count
NANO_5W_LOCKED = """\
cpu0: Online=1 Governor=schedutil MinFreq=921600 MaxFreq=921600 CurrentFreq=921600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=921600 MaxFreq=921600 CurrentFreq=921600 IdleStates: WFI=0 c7=0
cpu2: Online=0 Governor=schedutil MinFreq=102000 MaxFreq=921600 CurrentFreq=921600 IdleStates: WFI=0 c7=0
cpu3: Online=0 Governor=schedutil MinFreq=102000 MaxFreq=921600 CurrentFreq=921600 IdleStates: WFI=0 c7=0
GPU MinFreq=614400000 MaxFreq=614400000 CurrentFreq=614400000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=1
Fan: speed=255
NV Power Mode: 5W
"""
# Orin Nano Super (JetPack 6.2): GPU pinned, memory clock not overridden
ORIN_PARTLY = """\
cpu0: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000
cpu1: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000
GPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=1020000000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=0
NV Power Mode: MAXN_SUPER
"""
THOR_NOT_ROOT = "Error: Run this script(/usr/bin/jetson_clocks) as a root user\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (NANO_DYNAMIC, {"locked": False, "unlocked": ["4 CPU cores", "GPU", "EMC"]}),
        (NANO_LOCKED, {"locked": True, "unlocked": []}),
        (NANO_5W_LOCKED, {"locked": True, "unlocked": []}),
        (ORIN_PARTLY, {"locked": False, "unlocked": ["EMC"]}),
        (THOR_NOT_ROOT, None),
        ("", None),
    ],
    ids=["nano-dynamic", "nano-locked", "nano-5w-locked", "orin-emc-free", "thor-not-root", "nothing"],
)
def test_jetson_clocks_show(text, expected):
    assert parse_jetson_clocks_show(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NV Power Mode: MAXN\n0\n", {"name": "MAXN", "id": 0}),
        ("NV Power Mode: MAXN_SUPER\n2\n", {"name": "MAXN_SUPER", "id": 2}),
        ("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n1\n", {"name": "15W", "id": 1}),
        ("NV Power Mode: 120W\n", {"name": "120W", "id": None}),
        ("nvpmodel: command failed", None),
    ],
)
def test_nvpmodel_query(text, expected):
    assert parse_nvpmodel_query(text) == expected


def test_clock_warning_and_summary():
    facts = {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "36.4.3", "jetpack": "6.2",
             "power_mode": {"name": "MAXN", "id": 0}, "clocks": parse_jetson_clocks_show(ORIN_PARTLY)}
    warning = clock_warning(facts)
    assert warning.startswith("clocks are not locked (EMC scale with load)") and "sudo jetson_clocks" in warning
    assert jetson_summary(facts) == ("NVIDIA Jetson AGX Orin Developer Kit, JetPack 6.2 (L4T 36.4.3), "
                                     "power mode MAXN (0), clocks not locked")
    assert clock_warning({**facts, "clocks": parse_jetson_clocks_show(NANO_LOCKED)}) is None
    assert "unknown" in clock_warning({**facts, "clocks": None}) and clock_warning(None) is None


def test_jetson_facts_run_the_tools(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R39 (release), REVISION: 2.0, GCID: 45755727, "
                                                     "BOARD: generic, EABI: aarch64\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Thor Developer Kit\x00")
    outputs = {"nvpmodel": "NV Power Mode: 120W\n0\n", "jetson_clocks": THOR_NOT_ROOT}
    facts = jetson_facts(tmp_path, run=lambda cmd: outputs[cmd[0]])
    assert facts == {"model": "NVIDIA Jetson AGX Thor Developer Kit", "l4t": "39.2.0", "jetpack": "7.2",
                     "tensorrt_expected": "11.4", "power_mode": {"name": "120W", "id": 0}, "clocks": None}


@pytest.mark.parametrize(("l4t", "jetpack"), [("38.2.0", "7.0"), ("38.4.0", "7.1"), ("39.2.0", "7.2"), ("39.9", "7")])
def test_jetpack_7_releases(l4t, jetpack):
    assert jetpack_for_l4t(l4t) == jetpack
    assert JETPACK_TENSORRT.get(jetpack, "any").startswith(("10.", "11.", "any"))
