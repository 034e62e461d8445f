"""The benchmark harness itself, on the CPU at the tiny preset: a well-formed table, JSON, CSV and PNG.

Runs in CI in seconds and is never skipped: it needs nothing beyond the [test] extra (matplotlib
for the plot; tqdm for the bar, which the harness does without when tqdm is missing).
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from erpo_kernels.benchmark import PRESETS, Contender, all_contenders, cli
from erpo_kernels.benchmark.common import BenchShape, Row, add_floor_ratios, gemm_flops, peak_extra_bytes
from erpo_kernels.benchmark.runner import classify_error

RUN_CONTENDERS = ["erpo-chunked", "pytorch", "floor"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _raising_train(inputs):
    def run():
        raise RuntimeError("injected failure\nsecond line")
    return run


BROKEN = Contender("broken", "erpo", _raising_train, None, note="always raises (test double)")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    registry = [c for c in all_contenders() if c.name in RUN_CONTENDERS] + [BROKEN]
    argv = ["--preset", "tiny", "--dtypes", "fp32", "--repeats", "2", "--warmup", "1", "--threads", "1",
            "--no-progress", "--out", str(out)]
    status = cli.main(argv, contenders=registry)
    return status, out


def test_exit_status_and_files(bench_run):
    status, out = bench_run
    assert status == 0
    for name in ("results.md", "results.json", "results.csv", "bench.png"):
        assert (out / name).stat().st_size > 0, name


def test_markdown_table_has_a_row_per_case(bench_run, capsys):
    _, out = bench_run
    lines = (out / "results.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:3] == ["contender", "pass", "dtype"] and "x floor" in header and "peak extra MiB" in header
    assert set(table[1].replace("|", "").replace(":", "")) == {"-"}
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert all(len(cells) == len(header) for cells in body)
    shapes = PRESETS["tiny"]
    # every runnable contender x shape x its passes (broken has no stats pass), one dtype
    expected = {(name, p, str(s.tokens)) for s in shapes for name in RUN_CONTENDERS for p in ("train", "stats")}
    expected |= {("broken", "train", str(s.tokens)) for s in shapes}
    got = {(cells[0], cells[1], cells[3].split()[0]) for cells in body}
    assert got == expected
    assert len(body) == len(expected)


def test_json_rows_and_floor_ratio(bench_run):
    _, out = bench_run
    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"meta", "rows", "unavailable", "checks"}
    for key in ("device", "torch", "triton", "date_utc", "preset", "repeats", "warmup", "memory_method"):
        assert key in payload["meta"], key
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["contender"] for r in ok} == set(RUN_CONTENDERS)
    for r in ok:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2 and r["peak_mib"] >= 0
        assert r["ratio_to_floor"] > 0 and r["gemm_tflops"] > 0
        assert r["check"].startswith("ok") or r["contender"] == "floor", r
    floors = [r for r in ok if r["contender"] == "floor"]
    assert all(abs(r["ratio_to_floor"] - 1.0) < 1e-12 for r in floors)
    assert payload["checks"]["erpo-chunked/train/fp32"].startswith("ok")


def test_failing_contender_is_a_row_not_a_crash(bench_run):
    _, out = bench_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    broken = [r for r in rows if r["contender"] == "broken"]
    assert len(broken) == len(PRESETS["tiny"])
    for r in broken:
        assert r["status"] == "error: RuntimeError: injected failure"
        assert r["median_ms"] is None and r["ratio_to_floor"] is None
        assert r["check"].startswith("FAIL")


def test_csv_and_png(bench_run):
    _, out = bench_run
    with (out / "results.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert records and {"contender", "median_ms", "ratio_to_floor", "peak_mib", "status"} <= set(records[0])
    png = (out / "bench.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def test_unknown_contender_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--contenders", "nope", "--out", str(tmp_path)])


def test_unavailable_contenders_say_why():
    reasons = {c.name: c.unavailable(torch.device("cpu")) for c in all_contenders()}
    assert reasons["erpo-chunked"] is None and reasons["floor"] is None and reasons["pytorch"] is None
    assert "CUDA" in reasons["erpo-triton"]
    assert reasons["cce"]   # not installed, or no CUDA: either way a reason
    assert reasons["liger"] is None or "not installed" in reasons["liger"]   # its torch path runs on the CPU


def test_error_classification():
    assert classify_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    assert classify_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")) == "oom"
    assert classify_error(MemoryError()) == "oom"
    assert classify_error(ValueError("bad shape\nmore")) == "error: ValueError: bad shape"


def test_floor_flops_and_ratio():
    shape = BenchShape(2, 3, 4, 5)
    assert gemm_flops(shape, "train") == 3 * 2 * 6 * 4 * 5 and gemm_flops(shape, "stats") == 2 * 6 * 4 * 5
    rows = [Row.for_case("floor", "train", "fp32", shape, median_ms=2.0),
            Row.for_case("x", "train", "fp32", shape, median_ms=5.0),
            Row.for_case("y", "train", "fp32", shape, status="oom")]
    add_floor_ratios(rows)
    assert rows[0].ratio_to_floor == 1.0 and rows[1].ratio_to_floor == 2.5
    assert rows[2].ratio_to_floor != rows[2].ratio_to_floor   # NaN: no time, no ratio


def test_peak_memory_sees_a_torch_allocation():
    size = 64 * 1024 * 1024

    def allocate():
        buffer = torch.ones(size // 4)   # 64 MiB, touched
        return float(buffer[-1])

    extra = peak_extra_bytes(allocate, torch.device("cpu"))
    assert 0.75 * size <= extra <= 1.5 * size, extra
