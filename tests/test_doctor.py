"""``erpo-doctor`` end to end on the CPU: the tiny run passes, and a planted bug makes it fail.

The subprocess gets ``TRITON_INTERPRET=1`` in its own environment, so the Triton backend is checked
under the interpreter; the in-process runs use the session's setting (tests/conftest.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erpo_kernels import doctor
from erpo_kernels.backends import resolve_backend_name, torch_chunked

ROOT = Path(__file__).resolve().parents[1]
QUANTITIES = [f"{section}.{name}" for section, names in doctor.SECTIONS.items() for name in names]


def _backend_status(stdout: str):
    """backend name -> the rest of its "backend <name> ..." line."""
    status = {}
    for line in stdout.splitlines():
        if line.startswith("backend "):
            _, name, rest = line.split(None, 2)
            status[name] = rest
    return status


def test_tiny_run_passes_every_check(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    report = tmp_path / "doctor.json"
    run = subprocess.run([sys.executable, "-m", "erpo_kernels.doctor", "--size", "tiny", "--json", str(report)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "torch" in out and "triton" in out and "device" in out   # the environment header
    status = _backend_status(out)
    assert sorted(status) == sorted(doctor.BACKENDS)
    # on this machine the interpreter runs Triton; native is optional and says why when it is missing
    for name in ("torch", "chunked", "triton"):
        assert status[name].startswith("available"), status[name]
    assert status["native"].startswith(("available", "unavailable: ")), status["native"]
    available = [name for name, rest in status.items() if rest.startswith("available")]
    for name in available:
        for dtype in doctor.DTYPES:
            for quantity in QUANTITIES:
                matches = [line.split() for line in out.splitlines()
                           if line.split()[:3] == [name, dtype, quantity]]
                assert len(matches) == 1 and matches[0][-1] == "PASS", (name, dtype, quantity, matches)
    assert " FAIL" not in out and "ERROR" not in out
    assert "result: OK" in out
    # timing: the default backend on the CPU (native where it is built, else chunked), both passes, as ratios
    # to the GEMM floor
    default = resolve_backend_name("auto", torch.device("cpu"))
    assert f"timing {default} bf16" in out and "goal <= 1.10x" in out
    data = json.loads(report.read_text())
    assert data["result"] == "OK" and len(data["checks"]) == len(available) * len(doctor.DTYPES) * len(QUANTITIES)
    assert all(c["status"] == "PASS" and c["error"] <= c["tolerance"] for c in data["checks"])
    assert [row["pass_name"] for row in data["timing"]] == ["train", "stats"]
    assert all(row["ms"] > 0 and row["floor_ms"] > 0 and row["ratio"] > 0 for row in data["timing"])


def test_planted_bug_fails_with_exit_status_1(monkeypatch, capsys):
    """An entropy 1% too large in the chunked backend's stats pass: exit 1 and FAIL lines naming it."""
    correct = torch_chunked.linear_stats

    def buggy(*args, **kwargs):
        logprobs, entropy, lse = correct(*args, **kwargs)
        return logprobs, entropy * 1.01, lse

    monkeypatch.setattr(torch_chunked, "linear_stats", buggy)
    status = doctor.main(["--size", "tiny", "--backends", "chunked", "--dtypes", "fp32", "--no-timing",
                          "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    failed = [line.split() for line in out.splitlines() if line.strip().endswith("FAIL")]
    assert ["chunked", "fp32", "stats.entropy"] in [words[:3] for words in failed], out
    # the logprobs are untouched: the doctor names the wrong quantity, not everything
    assert any(line.split()[:3] == ["chunked", "fp32", "stats.logprobs"] and line.endswith("PASS")
               for line in out.splitlines())
    assert "result: FAILED" in out


def test_backend_error_is_a_failure_not_a_crash(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(torch_chunked, "linear_fused_train", broken)
    status = doctor.main(["--size", "tiny", "--backends", "chunked", "--dtypes", "fp32", "--no-timing",
                          "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1
    assert any("one-sweep" in line and "ERROR" in line and "kernel exploded" in line for line in out.splitlines())
    # the other paths still ran and passed
    assert any(line.split()[:3] == ["chunked", "fp32", "two-pass.grad_weight"] and line.endswith("PASS")
               for line in out.splitlines())


@pytest.mark.parametrize("argv, option", [
    (["--backends", "chunked,bogus"], "--backends"),
    (["--dtypes", "fp16"], "--dtypes"),
    (["--size", "huge"], "--size"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
], ids=["backend", "dtype", "size", "device"])
def test_bad_arguments_exit_2_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["erpo-doctor"] == "erpo_kernels.doctor:main"
