"""Tile sizes and launch heuristics for every kernel in ``erpo_kernels.ops``, in one place.

Each kernel has one fixed default (fast to start and deterministic on the first call).  Autotuning runs
only when ``ERPO_AUTOTUNE=1`` (never under ``TRITON_INTERPRET=1``), over a small candidate list pruned by
:func:`_prune` (blocks far larger than the problem, or over the shared-memory budget).  Under the
interpreter every block is 32: interpreter time is Python overhead per program and loop step, so 16
(the smallest ``tl.dot`` accepts) was 10x slower at N=257, V=1003, while 32 still gives the test shapes
several token blocks, vocab tiles and H chunks (ragged last tiles included).

Tuning notes (H100 guesses, not yet measured on a device; see bench/RESULTS.md once they are):

- ``linear_stats_fwd`` is one GEMM (2·N·H·V FLOPs) plus an fp32 online-softmax epilogue per
  [BLOCK_N, BLOCK_V] tile.  Start at 64x128x64, 8 warps, 3 stages (two bf16 operand tiles of 8 and
  16 KiB per stage).  Try 128x128x64 with 8 warps (fewer weight re-reads: W is streamed N/BLOCK_N
  times), 128x256x64 with 2 stages, and exp2 with a log2(e)-scaled logit if the epilogue shows up
  in the profile.  The vocab split count (``num_splits``) should keep >= 2 programs per SM; check
  that the merge kernel stays < 1% of the run time.
- ``linear_grad_fused`` recomputes the logits tile, forms dz, then streams H again twice
  (dz @ W and dz^T @ h) with fp32 atomics.  Its extra HBM/L2 traffic is N·H·4·2·V/BLOCK_V (grad_hidden)
  plus V·H·4·2·N/BLOCK_N (grad_weight), so bigger tiles pay off until registers spill: try 128x128x64
  and 64x256x64 with 8 warps; watch for the atomics becoming the bottleneck (Nsight "lts__t_sectors_
  op_red").  Vocab-major order (``deterministic=True``) wants BLOCK_N large (it streams tokens).
- ``dz_epilogue`` is elementwise over the [chunk, V] fp32 logits: pure bandwidth; 32x256 with 4 warps
  is a fine start, larger BLOCK_V (512, 1024) with 8 warps may help a little.
- ``logits_stats`` streams a [chunk, V] fp32 logits buffer once (row-wise online softmax): pure
  bandwidth, rows are independent; wide BLOCK_V tiles and few rows per program.
- Compare the chunked design (logits recompute + 2 grad GEMMs in cuBLAS around the epilogue,
  ``ERPO_TRITON_GRAD=chunked``) with the fused one at N=32768, H=4096, V=151936 bf16 before changing
  the default in ``backends/triton.py``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_h: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def meta(self, blocks: Sequence[str]) -> Dict[str, int]:
        """Launch keyword arguments: the block sizes a kernel takes, plus num_warps / num_stages."""
        names = {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_H": self.block_h}
        out = {name: names[name] for name in blocks}
        out.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return out


# kernel name -> (the block meta-parameters it takes, GPU default, candidates for ERPO_AUTOTUNE=1)
_GPU_DEFAULTS: Dict[str, TileConfig] = {
    "linear_stats_fwd": TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    "linear_grad_fused": TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    "dz_epilogue": TileConfig(32, 256, num_warps=4, num_stages=1),
    "logits_stats": TileConfig(16, 1024, num_warps=8, num_stages=1),
    "linear_stats_merge": TileConfig(128, 16, num_warps=4, num_stages=1),  # [BLOCK_N, splits]; never tuned
}
_BLOCKS: Dict[str, Tuple[str, ...]] = {
    "linear_stats_fwd": ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
    "linear_grad_fused": ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
    "dz_epilogue": ("BLOCK_N", "BLOCK_V"),
    "logits_stats": ("BLOCK_N", "BLOCK_V"),
}
_CANDIDATES: Dict[str, List[TileConfig]] = {
    "linear_stats_fwd": [TileConfig(n, v, h, w, s) for n, v, h, w, s in [
        (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 2),
        (32, 128, 128, 4, 3), (16, 256, 64, 4, 3)]],
    "linear_grad_fused": [TileConfig(n, v, h, w, s) for n, v, h, w, s in [
        (64, 128, 64, 8, 3), (128, 128, 64, 8, 2), (64, 256, 64, 8, 2), (32, 128, 64, 4, 3),
        (128, 64, 64, 4, 3)]],
    "dz_epilogue": [TileConfig(n, v, 16, w, 1) for n, v, w in [
        (32, 256, 4), (16, 512, 4), (32, 1024, 8), (64, 256, 8)]],
    "logits_stats": [TileConfig(n, v, 16, w, 1) for n, v, w in [
        (16, 1024, 8), (8, 2048, 8), (32, 512, 4), (4, 4096, 8)]],
}
_INTERPRETER = TileConfig(32, 32, 32, num_warps=1, num_stages=1)
# Inner-loop splits are aligned to this many columns (the largest candidate BLOCK_V), so every tile but
# the last of a split is full whatever config runs; 16 under the interpreter, so tests reach many splits.
_SPLIT_ALIGN = 256
_SMEM_BUDGET = 200 * 1024  # bytes; H100 has 227 KiB per block


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("ERPO_AUTOTUNE", "0") == "1" and not interpreter_enabled()


def default_config(name: str) -> TileConfig:
    return _INTERPRETER if interpreter_enabled() else _GPU_DEFAULTS[name]


def _prune(configs, named_args, **kwargs):
    """Drop configs whose blocks dwarf the problem or whose pipelined operand tiles overflow shared memory."""
    def next_pow2(x):
        return 1 << max(int(x) - 1, 0).bit_length()

    n_cap = max(16, next_pow2(named_args.get("N", 1 << 30)))
    v_cap = max(16, next_pow2(named_args.get("V", 1 << 30)))
    h_cap = max(16, next_pow2(named_args.get("H", 1 << 30)))
    operand = named_args.get("hidden_ptr")
    elem_bytes = operand.element_size() if hasattr(operand, "element_size") else 2
    kept = []
    for cfg in configs:
        bn, bv, bh = (cfg.kwargs.get(k, 16) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
        smem = (bn + bv) * bh * elem_bytes * cfg.num_stages
        if bn <= n_cap and bv <= v_cap and bh <= h_cap and smem <= _SMEM_BUDGET:
            kept.append(cfg)
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, kernel, key: Tuple[str, ...], reset_to_zero: Tuple[str, ...],
               restore_value: Tuple[str, ...]):
    import triton

    blocks = _BLOCKS[name]
    configs = [triton.Config({b: c.meta(blocks)[b] for b in blocks}, num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in _CANDIDATES[name]]
    return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": _prune},
                           reset_to_zero=list(reset_to_zero) or None,
                           restore_value=list(restore_value) or None)(kernel)


def launch_params(name: str, kernel, key: Sequence[str] = ("N", "V", "H"), reset_to_zero: Sequence[str] = (),
                  restore_value: Sequence[str] = ()):
    """``(callable_kernel, meta_kwargs)``: the kernel with its fixed default config, or (ERPO_AUTOTUNE=1)
    an autotuned wrapper and no meta kwargs.  Grids must read block sizes from their ``META`` argument."""
    if autotune_enabled():
        return _autotuned(name, kernel, tuple(key), tuple(reset_to_zero), tuple(restore_value)), {}
    return kernel, default_config(name).meta(_BLOCKS[name])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(num_outer_blocks: int, inner_extent: int, device: torch.device, max_splits: int = 64) -> int:
    """Splits of the inner (vocab) loop so that outer blocks x splits keeps every SM busy (>= 2 programs
    per SM), flash-decoding style.  On the CPU (interpreter) programs run one after another: 1 split."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = -(-target // max(num_outer_blocks, 1))
    return max(1, min(splits, max_splits, -(-inner_extent // _SPLIT_ALIGN)))


def split_size(inner_extent: int, splits: int) -> int:
    """Columns per split: a multiple of the split alignment, at least 1 (the caller launches
    ``cdiv(inner_extent, split_size)`` splits, so none is empty)."""
    align = 16 if interpreter_enabled() else _SPLIT_ALIGN
    per = -(-max(inner_extent, 1) // max(splits, 1))
    return -(-per // align) * align

