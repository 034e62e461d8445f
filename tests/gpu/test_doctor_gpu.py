"""``erpo-doctor`` at full size on a CUDA device (``pytest -m gpu``; skipped without CUDA).

Every backend available there (Triton natively, not under the interpreter) against the fp64 oracle,
then the realistic timing shape (N = 8192, H = 4096, V = 151936, bf16) against its GEMM floor.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_doctor_full_size_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # native kernels only
    report = tmp_path / "doctor.json"
    run = subprocess.run([sys.executable, "-m", "erpo_kernels.doctor", "--size", "full", "--json", str(report)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout)   # the report is worth reading in the test log (pytest -s / -rP)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["backends"]["triton"].startswith("available"), data["backends"]["triton"]
    assert data["result"] == "OK" and all(c["status"] == "PASS" for c in data["checks"])
    assert {c["backend"] for c in data["checks"]} >= {"torch", "chunked", "triton"}
    assert [row["backend"] for row in data["timing"]] == ["triton", "triton"]
    assert all(row["ratio"] > 0 for row in data["timing"])
