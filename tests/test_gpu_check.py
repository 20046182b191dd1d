"""``experiments/gpu_check.sh``'s CPU dry run: the script that measures the GPU path runs end to end (both
backbones, bare forward, decode+forward and the full mapper, the consistency check) and writes its summary.
The figures themselves come from a GPU machine; here only their presence and coherence are checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_dry_run_writes_the_summary(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "BUDGET_S": "50", "TIMEOUT_S": "110"}
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), "--device", "cpu", "--n", "8",
                           "--max-side", "128", "--batch-size", "4", "--locals", "50", "--threads", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and summary["max_side"] == 128
    assert [b["backbone"] for b in summary["backbones"]] == ["mobilenet_v2", "resnet101"]
    for b in summary["backbones"]:
        assert set(b["phases"]) == {"bare forward", "decode+forward", "mapper, lanes=auto"}
        for phase in b["phases"].values():
            assert phase["images"] > 0 and phase["images_per_s"] > 0 and phase["gpu_util"] is None
        for name in ("decode+forward", "mapper, lanes=auto"):
            assert b["phases"][name]["errors"] == 0 and b["phases"][name]["decoded_on_device"] == 0
    # on the CPU the "device" descriptors are the CPU ones: the consistency check must find them equal
    cos = summary["backbones"][0]["min_cosine_vs_cpu"]
    assert cos and min(cos.values()) > 0.999
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| resnet101 |" in md and "ratio to bare" in md
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
