"""``ops.tile_config``: the decisions a GPU launch makes, checked on the CPU with stub devices (H100, A100):
TF32 for fp32 operands, the default config per device and operand class, the split / launch-group plan,
and autotuning keyed by power-of-two size buckets."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from erpo_kernels.ops import tile_config
from erpo_kernels.ops._jit_helpers import dot_meta
from erpo_kernels.ops.tile_config import A100, H100

V, H = 151936, 4096


@pytest.mark.parametrize("precision,expected", [("tf32", True), ("ieee", False)])
def test_tf32_follows_torch_fp32_precision(precision, expected, monkeypatch):
    """torch >= 2.9 switch: ``torch.backends.cuda.matmul.fp32_precision`` (stubbed: the real one is global)."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(fp32_precision=precision))
    assert tile_config.tf32_allowed() is expected


@pytest.mark.parametrize("legacy,expected", [("highest", False), ("high", True), ("medium", True)])
def test_tf32_follows_legacy_matmul_precision(legacy, expected, monkeypatch):
    """Older torch, or fp32_precision "none" (never set): ``torch.get_float32_matmul_precision()``."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(fp32_precision="none"))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: legacy)
    assert tile_config.tf32_allowed() is expected


def test_tf32_default_torch_flags_say_ieee():
    """torch's defaults (fp32 matmuls in full precision) must not turn TF32 on."""
    assert torch.get_float32_matmul_precision() == "highest"
    assert tile_config.tf32_allowed() is False


@pytest.mark.parametrize("dtype,device,interpret,allowed,expected", [
    (torch.float32, "cuda", "0", True, "tf32"),
    (torch.float32, "cuda", "0", False, "ieee"),
    (torch.float32, "cuda", "1", True, "ieee"),    # the interpreter computes in numpy: always exact
    (torch.float32, "cpu", "0", True, "ieee"),
    (torch.bfloat16, "cuda", "0", True, "ieee"),   # ignored by tl.dot for 16-bit operands
], ids=["fp32-cuda-tf32", "fp32-cuda-highest", "fp32-interpreter", "fp32-cpu", "bf16"])
def test_dot_precision_decision(dtype, device, interpret, allowed, expected, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(tile_config, "tf32_allowed", lambda: allowed)
    meta = dot_meta(dtype, torch.device(device))
    assert meta["DOT_PRECISION"] == expected
    assert meta["DOT_UPCAST"] == (dtype == torch.bfloat16 and interpret == "1")


@pytest.mark.parametrize("spec", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("name", ["linear_stats_fwd", "linear_grad_fused"])
def test_defaults_fit_the_device_and_lead_their_candidates(spec, name):
    for cls, cfg in tile_config._GPU_DEFAULTS[name][spec.arch].items():
        dtype = torch.bfloat16 if cls == "16bit" else torch.float32
        assert cfg.smem_bytes(dtype.itemsize) <= spec.smem_per_block, (cls, cfg)
        assert tile_config._CANDIDATES[name][spec.arch][cls][0] == cfg, f"{cls}: the default comes first"
        assert tile_config.default_config(name, dtype, "tf32" if cls == "tf32" else "ieee", spec) == cfg


def test_sm90_16bit_tiles_are_warp_group_sized():
    """A warp group (4 warps) per 64 rows, and a tile at least 128 wide: large wgmma (m64n128 / m64n256)."""
    for name in ("linear_stats_fwd", "linear_grad_fused"):
        cfg = tile_config.default_config(name, torch.bfloat16, "ieee", H100)
        assert cfg.num_warps == 4 * cfg.block_n // 64 and cfg.block_v >= 128, (name, cfg)


def test_small_shared_memory_falls_back_to_a_fitting_candidate():
    ada = dataclasses.replace(A100, name="sm_89 stub", capability=89, smem_per_block=99 * 1024)
    cfg = tile_config.default_config("linear_stats_fwd", torch.bfloat16, "ieee", ada)
    assert cfg.smem_bytes(2) <= ada.smem_per_block


def test_interpreter_config_without_a_device():
    assert tile_config.default_config("linear_stats_fwd", torch.bfloat16, "ieee", None).block_n == 32
    plan = tile_config.split_plan(9, 203, 1, tile_config.default_config("linear_stats_fwd"), 4, None)
    assert (plan.splits, plan.group_size) == (1, 2)


def _check_cover(plan, inner):
    """Every split non-empty, together covering [0, inner), aligned to the largest vocab tile."""
    assert plan.split_len % tile_config._SPLIT_ALIGN == 0
    assert (plan.splits - 1) * plan.split_len < inner <= plan.splits * plan.split_len


@pytest.mark.parametrize("spec", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("n_tokens", [128, 1024, 2560, 32768])
def test_stats_plan_keeps_resident_hidden_blocks_in_l2(spec, n_tokens):
    cfg, plan = tile_config.launch_plan("linear_stats_fwd", torch.bfloat16, "ieee", spec, n_tokens, V, H)
    _check_cover(plan, V)
    token_blocks = -(-n_tokens // cfg.block_n)
    resident = tile_config._resident_programs(cfg, 2, spec)
    assert plan.group_size <= token_blocks and plan.group_size * plan.splits <= resident
    # the token blocks of one group (what runs at one time) fit in the L2 share
    assert plan.group_size * cfg.block_n * H * 2 <= spec.l2_bytes // tile_config._L2_SHARE
    programs = token_blocks * plan.splits
    if token_blocks <= plan.group_size:  # few tokens: one group, at most one wave, most SMs busy
        assert 0.85 * resident <= programs <= resident, programs
    else:  # many: every group but the last fills >= 90% of the resident slots
        assert plan.group_size * plan.splits >= 0.9 * resident


def test_h100_stats_plan_at_the_benchmark_shape():
    """The figures tile_config's docstring quotes: 16 token blocks x 8 splits per group, 16 groups."""
    cfg, plan = tile_config.launch_plan("linear_stats_fwd", torch.bfloat16, "ieee", H100, 32768, V, H)
    assert (cfg.block_n, cfg.block_v, plan.group_size, plan.splits) == (128, 256, 16, 8)
    assert -(-32768 // cfg.block_n // plan.group_size) == 16


def test_explicit_splits_and_group_win():
    cfg = tile_config.default_config("linear_stats_fwd", torch.bfloat16, "ieee", H100)
    plan = tile_config.split_plan(256, V, 2 ** 20, cfg, 2, H100, splits=3, group_size=5)
    assert (plan.splits, plan.group_size) == (3, 5)
    _check_cover(plan, V)


def test_autotune_is_bucketed_by_powers_of_two(monkeypatch):
    """One autotuner per (next_pow2(N), next_pow2(V), next_pow2(H)): N=3000 and N=4000 share one, 5000 not;
    its candidates fit the device's shared memory."""
    from erpo_kernels.ops.linear_stats import _linear_stats_fwd_kernel

    monkeypatch.setattr(tile_config, "autotune_enabled", lambda: True)

    def tuner(n_tokens, spec=H100):
        kernel, meta = tile_config.launch_params("linear_stats_fwd", _linear_stats_fwd_kernel,
                                                 dict(N=n_tokens, V=V, H=H), torch.bfloat16, "ieee", spec)
        assert meta == {}
        return kernel

    assert tuner(3000) is tuner(4000)
    assert tuner(3000) is not tuner(5000)
    small = dataclasses.replace(A100, smem_per_block=60 * 1024)
    for config in tuner(3000, small).configs:
        kw = config.kwargs
        assert (kw["BLOCK_N"] + kw["BLOCK_V"]) * kw["BLOCK_H"] * 2 * config.num_stages <= small.smem_per_block


def test_prune_drops_blocks_beyond_the_problem():
    import triton

    configs = [triton.Config(dict(BLOCK_N=n, BLOCK_V=256, BLOCK_H=64)) for n in (32, 64, 128)]
    kept = tile_config._prune(configs, dict(N=40, V=V, H=H))
    assert [c.kwargs["BLOCK_N"] for c in kept] == [32, 64]
