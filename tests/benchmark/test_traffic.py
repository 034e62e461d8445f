"""The traffic model against hand counts of each data flow, its monotonicity, its calibration, and the
estimate column of erpo-bench.

Hand cases use a toy GPU with round numbers and efficiencies of 1, explicit tiles, splits, launch groups and
programs per SM (so they do not move when tile_config is retuned).  Expected numbers are written out from the
data flow of each kernel (docstrings of ops/linear_stats.py, linear_grad.py, linear_grad_chunked.py,
chunk_gemms.py, and the launch order of _jit_helpers._grouped_program); [N]-sized vectors (targets, per-token
statistics) are left to a tolerance of 64 bytes per token.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from erpo_kernels.benchmark import cli, traffic, traffic_table
from erpo_kernels.benchmark.contenders import all_contenders
from erpo_kernels.benchmark.roofline import GPUS, Assumptions, GPUSpec, known_gpu
from erpo_kernels.ops import tile_config
from erpo_kernels.ops.tile_config import TileConfig

TOY = GPUSpec("toy", {"bf16": 100.0, "fp16": 100.0, "fp32": 10.0}, hbm_tb_s=1.0, memory_gb=10, l2_mib=1,
              l2_tb_s=2.0, sms=4, clock_ghz=1.0, smem_per_sm_kib=228)
EXACT = Assumptions(mma_efficiency=1.0, hbm_efficiency=1.0, l2_efficiency=1.0, l2_usable_fraction=1.0)
TILE_64x128 = TileConfig(64, 128, 64, num_warps=8, num_stages=3)
# N=256 tokens, H=64, V=1024 on the toy GPU with one program per SM: 4 token blocks of 64 in one launch group,
# all resident at once, one split of 8 vocab tiles of 128
SMALL = dict(tokens=256, hidden=64, vocab=1024, dtype="bf16", gpu=TOY, tiles=TILE_64x128, splits=1, group_size=4,
             programs=1, assumptions=EXACT)
PER_TOKEN_SLACK = 64 * 256


def _phase(estimate, name):
    return next(p for p in estimate.phases if p.name == name)


# ----------------------------------------------------------------------------------------------
# the floor and the calibration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gemms", [1, 3, 4], ids=["stats", "sweep", "with-stats"])
def test_floor_is_2nhv_per_gemm(gemms):
    floor = traffic.gemm_floor(1000, 64, 500, gemms, "bf16", TOY, EXACT)
    assert floor.floor_flops == gemms * 2 * 1000 * 64 * 500
    assert floor.seconds == pytest.approx(gemms * 64e6 / 100e12)
    assert floor.ratio_to_floor == pytest.approx(1.0)


def test_every_pass_names_its_floor():
    passes = traffic.estimate_passes(4096, 256, 4000, "bf16", "h100")
    gemm = 2 * 4096 * 256 * 4000
    expected = {"floor-1": 1, "stats": 1, "floor-3": 3, "sweep": 3, "floor-4": 4, "train-a": 4, "train-b": 4}
    assert {name: p.floor_flops / gemm for name, p in passes.items()} == expected


def test_calibration_reproduces_the_h100_anchor():
    """DESIGN.md: 3 GEMMs at N=32768, H=4096, V=151936 bf16 take about 177 ms on an H100."""
    floor = traffic.gemm_floor(32768, 4096, 151936, 3, "bf16", "h100")
    assert floor.ms == pytest.approx(177, rel=0.01)


# ----------------------------------------------------------------------------------------------
# hand counts
# ----------------------------------------------------------------------------------------------
def test_stats_pass_hand_count():
    est = traffic.stats_pass(**SMALL)
    kernel = _phase(est, "stats kernel")
    # 4 token blocks x 8 vocab tiles, each K-loop reads a [64, 64] hidden and a [128, 64] weight tile per step:
    # 4 * 8 * (64 + 128) * 64 * 2 bytes through L2
    assert kernel.l2_bytes == 4 * 8 * 192 * 64 * 2 == 786_432
    # working sets (4 hidden blocks: 32 KiB; 2 weight tiles: 32 KiB) fit in 1 MiB: each hidden block and the
    # weight come from HBM once (one wave of token blocks)
    assert dict(kernel.detail)["hidden hbm"] == 256 * 64 * 2
    assert dict(kernel.detail)["weight hbm"] == 1024 * 64 * 2
    # split 0 gathers one weight row per token for the target logit: N·H·e
    assert dict(kernel.detail)["target rows hbm"] == 256 * 64 * 2
    assert kernel.hbm_bytes == pytest.approx(32_768 + 131_072 + 32_768 + 3 * 256 * 4, abs=PER_TOKEN_SLACK)
    assert kernel.flops == 2 * 256 * 1024 * 64
    assert kernel.exps == 256 * 1024 and kernel.tail == 1.0
    times = kernel.times(TOY, "bf16", EXACT)
    mma = 2 * 256 * 1024 * 64 / 100e12
    per_logit = traffic.EPILOGUE_INSTRUCTIONS["linear_stats_fwd"]["sm90"]           # the toy GPU is sm90
    issue = 256 * 1024 * per_logit / (128 * 4 * 1e9)                                 # 128 lanes x 4 SMs x 1 GHz
    exps = 256 * 1024 / (16 * 4 * 1e9)
    assert times["compute"] == pytest.approx(mma + max(issue, exps))
    assert times["l2"] == pytest.approx(786_432 / 2e12)
    assert est.extra_bytes == pytest.approx(3 * 256 * 4, abs=PER_TOKEN_SLACK)   # fp32 partials [3, N, 1]


def test_stats_pass_hidden_rereads_when_l2_is_short():
    # capacity = the 2 weight tiles (32 KiB) + half of the 4 hidden blocks (16 of 32 KiB): half of the 7
    # re-reads of each hidden block miss
    small_l2 = dataclasses.replace(TOY, l2_mib=(32_768 + 16_384) / 2 ** 20)
    kernel = _phase(traffic.stats_pass(**{**SMALL, "gpu": small_l2}), "stats kernel")
    assert dict(kernel.detail)["hidden hbm"] == pytest.approx(256 * 64 * 2 * (1 + 7 * 0.5))
    assert dict(kernel.detail)["weight hbm"] == 1024 * 64 * 2


def test_stats_pass_tail_and_waves():
    # 6 token blocks in groups of 4 on 4 resident programs: 2 waves for 1.5 waves of work; the weight is
    # fetched once per group, twice
    kernel = _phase(traffic.stats_pass(**{**SMALL, "tokens": 384}), "stats kernel")
    assert kernel.tail == pytest.approx(2 / 1.5)
    assert dict(kernel.detail)["weight hbm"] == 2 * 1024 * 64 * 2


@pytest.mark.parametrize("group_size, weight_passes, hidden_passes", [(2, 4, 1), (4, 2, 2), (3, 4, 1.5)])
def test_stats_pass_launch_groups(group_size, weight_passes, hidden_passes):
    """N=512 (8 token blocks of 64), V=1024 in 2 splits of 512 columns, 4 resident programs.
    Groups of 2 blocks x 2 splits = 4 programs: each wave is one group, whose 2 blocks are fetched once and
    share the whole weight (fetched once per group: 4 times).  Groups of 4 blocks x 2 splits = 8 programs:
    a wave holds one split of 4 blocks, so each block is fetched once per split (twice) and the weight once
    per group (twice).  Groups of 3 (6 programs; the last group 2 blocks) straddle the waves: the waves hold
    blocks {0,1,2}, {1,2,3,4}, {3,4,5}, {6,7}, each with both splits: 12 block fetches, 4 weight passes."""
    est = traffic.stats_pass(**{**SMALL, "tokens": 512, "splits": 2, "group_size": group_size})
    detail = dict(_phase(est, "stats kernel").detail)
    assert detail["weight hbm"] == weight_passes * 1024 * 64 * 2
    assert detail["hidden hbm"] == hidden_passes * 512 * 64 * 2
    assert est.extra_bytes == pytest.approx(3 * 512 * 2 * 4, abs=64 * 512)   # fp32 partials [3, N, 2]


def test_stats_pass_reads_the_weight_once_per_group_on_h100():
    """tile_config's docstring: at N=32768, H=4096, V=151936 bf16 on an H100, 16 groups of 16 token blocks x
    8 splits read the weight 16 times (20 GB)."""
    order = traffic.launch_order("linear_stats_fwd", 32768, 4096, 151936, "bf16", "h100")
    assert (order.tiles.block_n, order.tiles.block_v, order.splits, order.group_size) == (128, 256, 8, 16)
    assert order.groups == 16
    weight = dict(_phase(traffic.stats_pass(32768, 4096, 151936), "stats kernel").detail)["weight hbm"]
    assert weight == pytest.approx(16 * 151936 * 4096 * 2, rel=0.05)


def test_design_b_hand_count():
    est = traffic.design_b_backward(**SMALL)
    kernel = _phase(est, "fused grad kernel")
    detail = dict(kernel.detail)
    # one split: each of the 8 vocab tiles loads and stores the fp32 [64, 64] grad_hidden rows of each block
    assert detail["grad_hidden l2"] == 256 * 64 * 8 * 8
    # each of the 4 token blocks sends fp32 reductions (4 bytes each) into the whole [1024, 64] grad_weight
    assert detail["grad_weight l2"] == 1024 * 64 * 4 * 4
    # K-loop (hidden + weight tile), then weight again (dz @ W) and hidden again (dz^T @ h)
    assert detail["operands l2"] == 4 * 8 * 2 * (64 + 128) * 64 * 2
    # everything fits in 1 MiB: hidden read once, grad_hidden read and written once, weight read once (one
    # wave), grad_weight fetched and written back once
    assert (detail["hidden hbm"], detail["grad_hidden hbm"]) == (256 * 64 * 2, 256 * 64 * 8)
    assert (detail["weight hbm"], detail["grad_weight hbm"]) == (1024 * 64 * 2, 1024 * 64 * 8)
    assert kernel.flops == 3 * 2 * 256 * 1024 * 64
    assert _phase(est, "zero fp32 grads").hbm_bytes == (256 + 1024) * 64 * 4
    assert _phase(est, "cast grads").hbm_bytes == (256 + 1024) * 64 * (4 + 2)
    assert est.extra_bytes == (256 + 1024) * 64 * 4


def test_design_b_reproduces_the_reviewers_count():
    """"about 1.3 TB of traffic each [grad_hidden and grad_weight] at N=32768, H=4096, V=151936" with 64x128
    tiles: N·H·8·V/128 (load + store per vocab tile) and V·H·4·N/64 (a 4-byte reduction per token block)."""
    est = traffic.design_b_backward(32768, 4096, 151936, "bf16", "h100", tiles=TILE_64x128, splits=1)
    detail = dict(_phase(est, "fused grad kernel").detail)
    assert detail["grad_hidden l2"] == 32768 * 4096 * 8 * 1187 == pytest.approx(1.27e12, rel=0.01)
    assert detail["grad_weight l2"] == 151936 * 4096 * 4 * 512 == pytest.approx(1.27e12, rel=0.01)
    stats = traffic.stats_pass(32768, 4096, 151936, "bf16", "h100", tiles=TILE_64x128)
    with_stats = traffic.training_with_stats(stats, est, "train-b")
    assert 2.5 < with_stats.ratio_to_floor < 5   # "estimated 3-5x the 4-GEMM floor"


@pytest.mark.parametrize("with_stats", [False, True], ids=["design-a", "sweep"])
def test_chunked_hand_count(with_stats):
    # N=1000 in chunks of 300 (4 chunks: 300, 300, 300, 100), H=64, V=500, bf16
    fn = traffic.training_sweep if with_stats else traffic.design_a_backward
    est = fn(1000, 64, 500, "bf16", TOY, chunk_size=300, assumptions=EXACT)
    h, w, acc, logits = 1000 * 64 * 2, 500 * 64 * 2, 500 * 64 * 4, 1000 * 500
    # logits GEMM: h once, W once per chunk, fp32 logits written once
    assert _phase(est, "logits GEMM").hbm_bytes == h + 4 * w + logits * 4
    # dz epilogue: fp32 logits read, dz written in bf16
    assert _phase(est, "dz epilogue").hbm_bytes == pytest.approx(logits * 6, abs=64 * 1000)
    assert _phase(est, "grad_hidden GEMM").hbm_bytes == logits * 2 + 4 * w + h
    # grad_weight GEMM: dz and h read; the first chunk writes the fp32 [V, H] accumulator, the 3 others read
    # and write it
    assert _phase(est, "grad_weight GEMM").hbm_bytes == logits * 2 + h + 7 * acc
    assert _phase(est, "cast grad_weight").hbm_bytes == acc + w
    assert sum(p.flops for p in est.phases) == 3 * 2 * 1000 * 64 * 500
    # buffers: one fp32 [300, V] logits chunk, one bf16 dz chunk, the fp32 accumulator
    assert est.extra_bytes == pytest.approx(300 * 500 * 6 + acc, abs=300 * 12)
    names = [p.name for p in est.phases]
    assert ("logits stats" in names) is with_stats
    if with_stats:
        assert _phase(est, "logits stats").hbm_bytes == pytest.approx(logits * 4, abs=64 * 1000)
        # one coefficient kernel per chunk
        assert _phase(est, "per-token coefficients").fixed_s == pytest.approx(4 * 1 * 4e-6)


def test_chunked_dz_dtypes():
    """fp32: dz overwrites the fp32 logits (read 4, write 4 per logit), the fp32 accumulator is grad_weight
    itself (no cast, no extra [V, H]).  fp16: dz in fp32 over the logits too, and the grad GEMMs take fp32
    operands: an fp32 copy of the weight (made once: read 2, write 4 per element; 4 extra), fp32 GEMM speed."""
    logits, vh = 1000 * 500, 500 * 64
    fp32 = traffic.design_a_backward(1000, 64, 500, "fp32", TOY, chunk_size=300, assumptions=EXACT)
    assert _phase(fp32, "dz epilogue").hbm_bytes == pytest.approx(logits * 8, abs=64 * 1000)
    assert "cast grad_weight" not in [p.name for p in fp32.phases]
    assert fp32.extra_bytes == 300 * 500 * 4
    fp16 = traffic.design_a_backward(1000, 64, 500, "fp16", TOY, chunk_size=300, assumptions=EXACT)
    assert _phase(fp16, "dz epilogue").hbm_bytes == pytest.approx(logits * 8, abs=64 * 1000)
    assert _phase(fp16, "upcast weight").hbm_bytes == vh * 6
    assert fp16.extra_bytes == 300 * 500 * 4 + 2 * vh * 4         # the fp32 accumulator and weight copy
    gemm = 2 * 1000 * 64 * 500
    grad_s = _phase(fp16, "grad_hidden GEMM").times(TOY, "fp16", EXACT)["compute"]
    assert grad_s == pytest.approx(gemm / 10e12)                   # TOY: 10 TFLOP/s fp32
    assert _phase(fp16, "logits GEMM").times(TOY, "fp16", EXACT)["compute"] == pytest.approx(gemm / 100e12)


def test_sweep_code_flow_costs_more():
    """In-place fp32 dz then a cast copy, and a zero-filled logits buffer (the code at c81f427), cost
    2·n·V·4 + 2·n·V·4 more bytes than the planned flow."""
    planned = traffic.training_sweep(1000, 64, 500, "bf16", TOY, chunk_size=300, assumptions=EXACT)
    legacy = traffic.training_sweep(1000, 64, 500, "bf16", TOY, chunk_size=300, dz_cast_in_epilogue=False,
                                    logits_zero_filled=True, assumptions=EXACT)
    assert legacy.hbm_bytes - planned.hbm_bytes == pytest.approx(4 * 1000 * 500 * 4)


def test_accumulator_alone_exceeds_the_memory_goal():
    passes = traffic.estimate_passes(32768, 4096, 151936, "bf16", "h100")
    assert 151936 * 4096 * 4 > 2 * 2 ** 30
    verdicts = {v.goal: v for v in traffic_table.goal_verdicts(passes, 32768)}
    assert not verdicts["sweep: extra <= 2 GiB at N=32768"].met
    assert verdicts["stats: extra <= 2 GiB at N=32768"].met


# ----------------------------------------------------------------------------------------------
# monotonicity
# ----------------------------------------------------------------------------------------------
def _design_b(tiles, gpu="h100"):
    return traffic.design_b_backward(32768, 4096, 151936, "bf16", gpu, tiles=tiles, splits=1, programs=1)


def test_bigger_tiles_cut_design_b_traffic():
    sizes = [(64, 128), (128, 128), (128, 256), (256, 256)]
    estimates = [_design_b(TileConfig(bn, bv, 64, 8, 2)) for bn, bv in sizes]
    l2 = [e.l2_bytes for e in estimates]
    assert all(a > b for a, b in zip(l2, l2[1:])), l2
    # HBM: the fp32 grad_hidden rows are revisited once per vocab tile, so a wider BLOCK_V cuts it
    hbm = [_design_b(TileConfig(64, bv, 64, 8, 2)).hbm_bytes for bv in (64, 128, 256, 512)]
    assert all(a > b for a, b in zip(hbm, hbm[1:])), hbm
    assert estimates[2].hbm_bytes < estimates[0].hbm_bytes


def test_taller_tiles_alone_do_not_cut_design_b_hbm():
    """With one split, the resident programs hold 132 different token blocks whatever the launch groups (a
    group is one block per split): a taller BLOCK_N puts more rows in flight (fewer L2 hits) while the
    revisits (one per vocab tile) stay, so HBM bytes do not fall."""
    short, tall = (_design_b(TileConfig(bn, 256, 64, 8, 2)) for bn in (128, 256))
    assert tall.l2_bytes < short.l2_bytes
    assert tall.hbm_bytes >= short.hbm_bytes


@pytest.mark.parametrize("pass_fn", [traffic.stats_pass, traffic.design_b_backward], ids=["stats", "design-b"])
def test_more_l2_means_fewer_hbm_bytes(pass_fn):
    hbm = [pass_fn(32768, 4096, 151936, "bf16", dataclasses.replace(GPUS["h100"], l2_mib=mib)).hbm_bytes
           for mib in (10, 25, 50, 100, 400, 4000)]
    assert all(a >= b for a, b in zip(hbm, hbm[1:])) and hbm[0] > hbm[-1], hbm


def test_more_bandwidth_is_never_slower():
    h100, h200 = (traffic.estimate_passes(32768, 4096, 151936, "bf16", g) for g in ("h100", "h200"))
    assert all(h200[name].seconds <= h100[name].seconds for name in h100)


# ----------------------------------------------------------------------------------------------
# defaults follow the other modules, GPU names, occupancy
# ----------------------------------------------------------------------------------------------
def test_defaults_are_read_at_call_time(monkeypatch):
    before = traffic.stats_pass(32768, 4096, 151936)
    monkeypatch.setitem(tile_config._GPU_DEFAULTS["linear_stats_fwd"]["sm90"], "16bit", TILE_64x128)
    after = traffic.stats_pass(32768, 4096, 151936)
    assert after.l2_bytes > before.l2_bytes                 # smaller tiles re-read more operand bytes
    assert after.l2_bytes == traffic.stats_pass(32768, 4096, 151936, tiles=TILE_64x128).l2_bytes
    assert traffic.launch_order("linear_stats_fwd", 32768, 4096, 151936).tiles == TILE_64x128
    from erpo_kernels.backends import torch_chunked
    sweep = traffic.training_sweep(32768, 4096, 151936)
    monkeypatch.setattr(torch_chunked, "CUDA_CHUNK_BYTES", 256 * 1024 * 1024)
    smaller = traffic.training_sweep(32768, 4096, 151936)
    assert smaller.extra_bytes < sweep.extra_bytes


def test_device_specs_are_tile_configs_stubs():
    assert traffic.device_spec("h100") is tile_config.H100
    assert traffic.device_spec("a100") is tile_config.A100
    h200 = traffic.device_spec("h200")   # the H100 stub with the H200's L2 (50 MiB, as the H100's)
    assert dataclasses.replace(h200, name=tile_config.H100.name) == dataclasses.replace(
        tile_config.H100, l2_bytes=50 * 2 ** 20)


@pytest.mark.parametrize("gpu, spec", [("h100", tile_config.H100), ("a100", tile_config.A100),
                                       ("h200", dataclasses.replace(tile_config.H100, l2_bytes=50 * 2 ** 20))])
@pytest.mark.parametrize("kernel", ["linear_stats_fwd", "linear_grad_fused"])
def test_launch_order_matches_tile_config(gpu, spec, kernel):
    for tokens, vocab, dtype, torch_dtype in [(8192, 151936, "bf16", torch.bfloat16),
                                              (32768, 151936, "bf16", torch.bfloat16),
                                              (131072, 151936, "bf16", torch.bfloat16),
                                              (1000, 32000, "fp32", torch.float32), (64, 5000, "bf16", torch.bfloat16)]:
        order = traffic.launch_order(kernel, tokens, 4096, vocab, dtype, gpu)
        cfg, plan = tile_config.launch_plan(kernel, torch_dtype, "ieee", spec, tokens, vocab, 4096)
        assert (order.tiles, order.splits, order.split_len, order.group_size) == \
            (cfg, plan.splits, plan.split_len, plan.group_size), (tokens, vocab, dtype)
        assert traffic.launch_order(kernel, tokens, 4096, vocab, dtype, gpu, tiles=cfg) == order


def test_programs_per_sm():
    """tile_config's rule: 256 registers per thread (8 warps: 1 program per SM, 4 warps: 2, 2 warps: 4) and
    the shared memory of the pipelined operand tiles plus 1 KiB per program."""
    assert traffic.programs_per_sm(TileConfig(64, 128, 64, 8, 3), "h100", 2) == 1     # registers
    assert traffic.programs_per_sm(TileConfig(64, 128, 64, 4, 3), "h100", 2) == 2
    assert traffic.programs_per_sm(TileConfig(32, 64, 32, 2, 2), "h100", 2) == 4
    assert traffic.programs_per_sm(TileConfig(128, 128, 64, 2, 3), "h100", 2) == 2    # 96 KiB shared memory
    assert traffic.programs_per_sm(TileConfig(256, 256, 64, 4, 3), "h100", 2) == 1    # 192 KiB
    assert traffic.programs_per_sm(TileConfig(128, 128, 64, 4, 3), "a100", 2) == 1    # 96 of 164 KiB


def test_programs_per_sm_agrees_with_the_offline_compile():
    """bench/OFFLINE.md's programs per SM, from the compiled registers and shared memory of every tiled launch,
    are what the rule gives for the same configs."""
    device, checked = None, 0
    for line in (Path(__file__).parents[2] / "bench" / "OFFLINE.md").read_text().splitlines():
        device = {"## H100": "h100", "## A100": "a100"}.get(line[:7], device)
        row = re.match(r"\| (linear_stats_fwd|linear_grad_fused) \|[^|]*\| (\w+) \| (\d+)x(\d+)x(\d+) w(\d+) s(\d+) "
                       r"\|.*\| (\d+) \|$", line)
        if row and device:
            dtype, *config, programs = row.groups()[1:]
            tiles = TileConfig(*(int(x) for x in config))
            assert traffic.programs_per_sm(tiles, device, 2 if dtype in ("bf16", "fp16") else 4) == int(programs), line
            checked += 1
    assert checked >= 16


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 PCIe", None),
                                       ("NVIDIA A100-PCIE-40GB", None), ("x86_64 CPU", None)])
def test_known_gpu(name, key):
    assert known_gpu(name) == key


# ----------------------------------------------------------------------------------------------
# erpo-bench and the README table
# ----------------------------------------------------------------------------------------------
def test_erpo_bench_prints_the_estimate(tmp_path, capsys):
    floor = [c for c in all_contenders() if c.name == "floor"]
    argv = ["--preset", "tiny", "--dtypes", "bf16", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--no-progress", "--gpu-model", "a100", "--out", str(tmp_path)]
    assert cli.main(argv, contenders=floor) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "est. ms (x floor)" in header
    column = header.index("est. ms (x floor)")
    body = [line for line in lines[2:] if line.startswith("| floor")]
    assert body and all(line.strip("|").split("|")[column].strip().endswith("(1.00x)") for line in body)
    assert GPUS["a100"].name in table and "not a measurement" in table
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["meta"]["estimate_gpu"] == GPUS["a100"].name
    for row in payload["rows"]:
        assert row["est_gpu"] == "a100" and row["est_ms"] > 0 and row["est_ratio_to_floor"] == pytest.approx(1.0)


def test_readme_table_renders():
    text = traffic_table.estimate_table("h100", [8192, 32768], 4096, 151936, "bf16")
    assert text.count("\n") == 2 + len(traffic_table.PASS_LABELS)
    goals = traffic_table.goals_table(["h100", "a100"], [32768, 131072], 4096, 151936, "bf16")
    assert "fits at N=131072" in goals and "stats <= 1.10x" in goals
