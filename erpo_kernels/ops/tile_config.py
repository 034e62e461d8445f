"""Tile sizes and launch heuristics for every kernel in ``erpo_kernels.ops``, in one place.

Each kernel has one fixed default per device class and operand class (fast to start, deterministic on the
first call).  Autotuning runs only when ``ERPO_AUTOTUNE=1`` (never under ``TRITON_INTERPRET=1``), over a
short candidate list cut to the device's shared memory and pruned by :func:`_prune`, with one tuning per
power-of-two bucket of the problem sizes (``next_power_of_2`` of N, V, H), not per exact N.  Under the
interpreter every block is 32: interpreter time is Python overhead per program and loop step, so 16 (the
smallest ``tl.dot`` accepts) was 10x slower at N=257, V=1003, while 32 still gives the test shapes several
token blocks, vocab tiles, splits, launch groups and H chunks (ragged last ones included).

Device classes: "sm90" (Hopper: warp-group MMA, ``wgmma.m64nNk16``, one warp group of 4 warps per 64 rows
of a tile) and "sm80" (Ampere and Ada: ``mma.sync.m16n8k16``).  Operand classes: "16bit" (bf16, fp16),
"tf32" (fp32 operands when torch allows TF32, see :func:`tf32_allowed`) and "fp32" (fp32 operands,
"ieee": no tensor cores, FMA; small tiles or the accumulators spill).

Why the defaults are what they are (checked offline, ``python -m erpo_kernels.benchmark.offline``, table in
bench/OFFLINE.md: registers, spills, shared memory and MMA instruction per kernel and config):

- ``linear_stats_fwd`` is one GEMM (2·N·H·V FLOPs) plus a per-element online-softmax epilogue.  On sm90 a
  128x256 tile with 8 warps is two warp groups, each issuing ``wgmma.m64n256k16``; it reads
  128·256/(128+256) = 85 FLOP per byte of its operand tiles from L2 (the former 64x128 tile: 43, and its
  8 warps split the 128 columns: ``m64n64k16``).  Its 128 fp32 accumulator registers per thread leave room
  for the epilogue without spills only because the target logit is taken outside the tile loop (see
  linear_stats.py) and the epilogue is a handful of instructions per logit (log2 units: one exp2).
- Launch order (:func:`split_plan`): one grid axis, programs grouped so the programs resident at one time
  cover ``group_size`` token blocks x ``splits`` vocab ranges.  Each program re-reads its [BLOCK_N, H]
  hidden block (1 MiB at BLOCK_N=128, H=4096, bf16) once per vocab tile, so the resident hidden blocks
  must stay in L2 (a third of it); programs of one split walk the same weight tiles in step, so each
  weight tile comes from HBM once per group.  At N=32768, H=4096, V=151936 bf16 on an H100 that is
  16 token blocks x 8 splits = 128 programs per group and 16 groups, so the weight is read 16 times
  (estimate, not measured: 16 x 1.25 GB = 20 GB, ~6 ms at 3.35 TB/s, beside the 41 ms that 2·N·H·V FLOPs
  take at the 989 TFLOP/s dense bf16 peak).  Before: one split per token block (512 programs of 64 rows,
  token blocks on axis 0), so the 132 resident programs held 132 x 512 KiB = 66 MiB of hidden blocks,
  more than the 50 MiB L2.
- ``linear_grad_fused`` (design (b), opt-in on CUDA) recomputes the logits tile, forms dz, then streams H
  again twice (dz @ W and dz^T @ h) with fp32 atomics; see linear_grad.py for its traffic.  128x128x64
  compiles without spills for all three of its launches on sm90 (64x256x64 spills in the vocab-major one).
- fp32 operands with "ieee" precision run on FMA units: 64x64 tiles (the fused backward at 64x64x32
  spilled 11 KB on sm_90a; 64x64x16 does not).  ``dz_epilogue`` and ``logits_stats`` stream a [chunk, V]
  fp32 buffer: pure bandwidth, no MMA.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

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

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined operand tiles of a GEMM-like kernel (the bulk of its allocation)."""
        return (self.block_n + self.block_v) * self.block_h * elem_bytes * self.num_stages


@dataclass(frozen=True)
class DeviceSpec:
    """What the launch heuristics read from a GPU; a stub one describes a device offline."""
    name: str
    capability: int       # 90 for sm_90 (compiled as sm_90a), 80 for sm_80
    sm_count: int
    smem_per_block: int   # opt-in maximum dynamic shared memory per block, bytes
    l2_bytes: int

    @property
    def arch(self) -> str:
        return "sm90" if self.capability >= 90 else "sm80"


H100 = DeviceSpec("H100 SXM5", 90, 132, 227 * 1024, 50 * 2 ** 20)
A100 = DeviceSpec("A100 SXM4", 80, 108, 163 * 1024, 40 * 2 ** 20)

# kernel -> device class -> operand class -> the default (one per combination; "any": every operand class).
# Each compiles without spills for its device (bench/OFFLINE.md); see the module docstring for why.
_GPU_DEFAULTS: Dict[str, Dict[str, Dict[str, TileConfig]]] = {
    "linear_stats_fwd": {
        "sm90": {"16bit": TileConfig(128, 256, 64, 8, 3), "tf32": TileConfig(128, 256, 32, 8, 3),
                 "fp32": TileConfig(64, 64, 32, 4, 2)},
        # 128x256x32 spilled with a bias on sm_80; 128x128x32 leaves ~80 registers of headroom
        "sm80": {"16bit": TileConfig(128, 128, 32, 8, 4), "tf32": TileConfig(128, 128, 16, 8, 4),
                 "fp32": TileConfig(64, 64, 32, 4, 2)},
    },
    "linear_grad_fused": {
        "sm90": {"16bit": TileConfig(128, 128, 64, 8, 2), "tf32": TileConfig(128, 128, 32, 8, 2),
                 "fp32": TileConfig(64, 64, 16, 4, 2)},
        "sm80": {"16bit": TileConfig(128, 128, 32, 8, 2), "tf32": TileConfig(64, 64, 32, 4, 2),
                 "fp32": TileConfig(64, 64, 16, 4, 2)},
    },
    "dz_epilogue": {"sm90": {"any": TileConfig(32, 256, num_warps=4, num_stages=1)},
                    "sm80": {"any": TileConfig(32, 256, num_warps=4, num_stages=1)}},
    # 16x1024 with 8 warps spilled on sm_90a (before this change too); 8x1024: 32 fp32 loads per thread
    "logits_stats": {"sm90": {"any": TileConfig(8, 1024, num_warps=8, num_stages=1)},
                     "sm80": {"any": TileConfig(8, 1024, num_warps=8, num_stages=1)}},
    # [rows, splits] partials: only num_warps is read (rows: merge_block_n; columns: the splits); never tuned
    "linear_stats_merge": {"sm90": {"any": TileConfig(128, 16, num_warps=4, num_stages=1)},
                           "sm80": {"any": TileConfig(128, 16, num_warps=4, num_stages=1)}},
}
_BLOCKS: Dict[str, Tuple[str, ...]] = {
    "linear_stats_fwd": ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
    "linear_grad_fused": ("BLOCK_N", "BLOCK_V", "BLOCK_H"),
    "dz_epilogue": ("BLOCK_N", "BLOCK_V"),
    "logits_stats": ("BLOCK_N", "BLOCK_V"),
}


_OPERAND_TILED = ("linear_stats_fwd", "linear_grad_fused")  # kernels whose shared memory is operand tiles


def _configs(rows) -> List[TileConfig]:
    return [TileConfig(*row) for row in rows]


# ERPO_AUTOTUNE=1 candidates: kernel -> device class -> operand class -> configs (the default first)
_CANDIDATES: Dict[str, Dict[str, Dict[str, List[TileConfig]]]] = {
    "linear_stats_fwd": {
        "sm90": {"16bit": _configs([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5),
                                    (128, 128, 64, 8, 4), (64, 256, 64, 4, 4)]),
                 "tf32": _configs([(128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 256, 16, 8, 5)]),
                 "fp32": _configs([(64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2)])},
        "sm80": {"16bit": _configs([(128, 128, 32, 8, 4), (128, 256, 16, 8, 4), (128, 256, 32, 8, 3),
                                    (128, 128, 64, 8, 3)]),
                 "tf32": _configs([(128, 128, 16, 8, 4), (128, 128, 32, 8, 3)]),
                 "fp32": _configs([(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)])},
    },
    "linear_grad_fused": {
        "sm90": {"16bit": _configs([(128, 128, 64, 8, 2), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3)]),
                 "tf32": _configs([(128, 128, 32, 8, 2), (128, 64, 32, 8, 3)]),
                 "fp32": _configs([(64, 64, 16, 4, 2), (32, 64, 16, 4, 2), (32, 32, 32, 4, 2)])},
        "sm80": {"16bit": _configs([(128, 128, 32, 8, 2), (128, 64, 32, 8, 2)]),
                 "tf32": _configs([(64, 64, 32, 4, 2), (64, 64, 16, 4, 3)]),
                 "fp32": _configs([(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)])},
    },
    "dz_epilogue": {arch: {"any": _configs([(n, v, 16, w, 1) for n, v, w in [
        (32, 256, 4), (16, 512, 4), (32, 1024, 8), (64, 256, 8)]])} for arch in ("sm90", "sm80")},
    "logits_stats": {arch: {"any": _configs([(n, v, 16, w, 1) for n, v, w in [
        (8, 1024, 8), (8, 2048, 8), (16, 512, 8), (4, 4096, 8)]])} for arch in ("sm90", "sm80")},
}
_INTERPRETER = TileConfig(32, 32, 32, num_warps=1, num_stages=1)
_INTERPRETER_GROUP = 2   # token blocks per launch group under the interpreter: tests cross group boundaries
# Inner-loop splits are aligned to this many columns (the largest candidate BLOCK_V), so every tile but
# the last of a split is full whatever config runs; 16 under the interpreter, so tests reach many splits.
_SPLIT_ALIGN = 256
_MAX_SPLITS = 256        # the merge reads [rows, next_pow2(splits)] tiles; 256 columns at 8 rows
_L2_SHARE = 3            # a launch group's outer operand blocks may take 1/_L2_SHARE of the L2


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("ERPO_AUTOTUNE", "0") == "1" and not interpreter_enabled()


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32 tensor cores (what cuBLAS would do with the same flags).

    torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none" = not set);
    older torch, or "none": ``torch.get_float32_matmul_precision() != "highest"`` (which also reflects
    ``torch.backends.cuda.matmul.allow_tf32``).  Read per call: the flags may change between calls."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch refuses to answer once the legacy and new TF32 switches were both used
        return False


def operand_class(dtype: torch.dtype, dot_precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "tf32" if dot_precision == "tf32" else "fp32"


@functools.lru_cache(maxsize=None)
def _cuda_spec(device_index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(device_index)
    capability = props.major * 10 + props.minor
    stub = H100 if capability >= 90 else A100
    return DeviceSpec(props.name, capability, props.multi_processor_count,
                      int(getattr(props, "shared_memory_per_block_optin", stub.smem_per_block)),
                      int(getattr(props, "L2_cache_size", stub.l2_bytes)))


def device_spec(device: torch.device) -> Optional[DeviceSpec]:
    """The DeviceSpec of a CUDA device (cached per index); None when the kernels run in the interpreter
    (``TRITON_INTERPRET=1`` or not CUDA), which every heuristic below reads as "interpreter"."""
    if device.type != "cuda" or interpreter_enabled():
        return None
    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())


def _fits(cfg: TileConfig, elem_bytes: int, spec: DeviceSpec) -> bool:
    return cfg.smem_bytes(elem_bytes) <= spec.smem_per_block


def default_config(name: str, dtype: torch.dtype = torch.bfloat16, dot_precision: str = "ieee",
                   spec: Optional[DeviceSpec] = None) -> TileConfig:
    """The fixed config of kernel ``name`` for operands of ``dtype`` on ``spec`` (None: the interpreter's).
    On a device with less shared memory than the default needs (sm_86 / sm_89 have 99 KiB per block), the
    candidate that fits with the least shared memory."""
    if spec is None:
        return _INTERPRETER
    by_class = _GPU_DEFAULTS[name][spec.arch]
    cls = operand_class(dtype, dot_precision)
    cfg = by_class.get(cls, by_class.get("any"))
    if name in _OPERAND_TILED and not _fits(cfg, dtype.itemsize, spec):
        fitting = [c for c in _CANDIDATES[name][spec.arch][cls] if _fits(c, dtype.itemsize, spec)]
        cfg = min(fitting or [_INTERPRETER], key=lambda c: c.smem_bytes(dtype.itemsize))
    return cfg


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _prune(configs, named_args, **kwargs):
    """Drop configs whose blocks dwarf the problem (beyond the next power of two of N, V, H)."""
    caps = {b: max(16, next_pow2(named_args.get(s, 1 << 30)))
            for b, s in (("BLOCK_N", "N"), ("BLOCK_V", "V"), ("BLOCK_H", "H"))}
    kept = [cfg for cfg in configs if all(cfg.kwargs.get(b, 16) <= cap for b, cap in caps.items())]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, kernel, arch: str, cls: str, smem_budget: int, elem_bytes: int,
               size_bucket: Tuple[int, ...], reset_to_zero: Tuple[str, ...], restore_value: Tuple[str, ...]):
    """One autotuner per power-of-two size bucket (``size_bucket`` is only part of the cache key): it tunes
    on the first call in its bucket and reuses the winner for every size in it."""
    import triton

    blocks = _BLOCKS[name]
    by_class = _CANDIDATES[name][arch]
    candidates = [c for c in by_class.get(cls, by_class.get("any"))
                  if name not in _OPERAND_TILED or c.smem_bytes(elem_bytes) <= smem_budget]
    configs = [triton.Config({b: c.meta(blocks)[b] for b in blocks}, num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in candidates]
    return triton.autotune(configs=configs, key=[], prune_configs_by={"early_config_prune": _prune},
                           reset_to_zero=list(reset_to_zero) or None,
                           restore_value=list(restore_value) or None)(kernel)


def launch_params(name: str, kernel, sizes: Mapping[str, int], dtype: torch.dtype = torch.bfloat16,
                  dot_precision: str = "ieee", spec: Optional[DeviceSpec] = None,
                  reset_to_zero: Sequence[str] = (), restore_value: Sequence[str] = ()):
    """``(callable_kernel, meta_kwargs)``: the kernel with its fixed default config, or (ERPO_AUTOTUNE=1)
    the autotuned wrapper of the power-of-two bucket of ``sizes`` and no meta kwargs.  Grids must read block
    sizes from their ``META`` argument."""
    if autotune_enabled() and spec is not None:
        bucket = tuple(next_pow2(v) for _, v in sorted(sizes.items()))
        return _autotuned(name, kernel, spec.arch, operand_class(dtype, dot_precision), spec.smem_per_block,
                          dtype.itemsize, bucket, tuple(reset_to_zero), tuple(restore_value)), {}
    return kernel, default_config(name, dtype, dot_precision, spec).meta(_BLOCKS[name])


@dataclass(frozen=True)
class SplitPlan:
    """How a (outer blocks x inner extent) sweep is cut: ``splits`` ranges of ``split_len`` inner elements
    (the last may be shorter, none empty), launched in groups of ``group_size`` outer blocks."""
    splits: int
    split_len: int
    group_size: int


def _resident_programs(cfg: TileConfig, elem_bytes: int, spec: DeviceSpec) -> int:
    """Estimate of the programs resident at once: by shared memory (1 KiB reserved per block), and by
    registers assuming 256 per thread (the large-tile defaults use 208-255, bench/OFFLINE.md)."""
    by_smem = (spec.smem_per_block + 1024) // (cfg.smem_bytes(elem_bytes) + 1024)
    by_regs = 65536 // (cfg.num_warps * 32 * 256)
    return spec.sm_count * max(1, min(by_smem, by_regs))


@functools.lru_cache(maxsize=1024)  # launchers ask per call; the answer depends only on the arguments
def split_plan(num_outer_blocks: int, inner_extent: int, outer_block_bytes: int, cfg: TileConfig,
               elem_bytes: int, spec: Optional[DeviceSpec], splits: Optional[int] = None,
               group_size: Optional[int] = None) -> SplitPlan:
    """Splits of the inner (vocab) loop and the launch group size, flash-decoding style.

    GPU: a group's outer blocks (``outer_block_bytes`` each, the operand block a program re-reads per inner
    tile) must fit in a third of the L2, and a group (group x splits programs) should fill the resident
    programs, so that one group runs at a time.  Among group sizes from half that L2 bound up to it, the one
    whose patch fills the resident slots best and whose last group is least ragged (fewest idle slots over
    the whole launch), the largest on a tie; splits = resident // group.  Few outer blocks: one group of
    all of them.  Interpreter (``spec`` None): programs run one after another, 1 split, groups of 2.
    Explicit ``splits`` / ``group_size`` win."""
    if spec is None:
        splits = splits or 1
        group = group_size or _INTERPRETER_GROUP
    else:
        resident = _resident_programs(cfg, elem_bytes, spec)
        fit = max(1, min(num_outer_blocks, resident, spec.l2_bytes // _L2_SHARE // max(outer_block_bytes, 1)))

        def filled(g):  # share of the resident slots busy, over the launch (last group ragged)
            groups = num_outer_blocks / g
            return round(groups / -(-num_outer_blocks // g) * g * (resident // g) / resident, 2)

        if group_size is not None:
            group = group_size
        elif splits is not None or fit == num_outer_blocks:
            group = fit
        else:
            group = max(range(-(-fit // 2), fit + 1), key=lambda g: (filled(g), g))
        splits = splits or max(1, resident // group)
    align = 16 if spec is None else _SPLIT_ALIGN
    splits = max(1, min(splits, _MAX_SPLITS, -(-inner_extent // align)))
    split_len = -(-max(inner_extent, 1) // splits)
    split_len = -(-split_len // align) * align
    return SplitPlan(-(-max(inner_extent, 1) // split_len), split_len, max(1, group))


# Bytes per outer row that a program re-reads per inner tile, beyond its operand row (dim * itemsize): the
# fused backward also read-modify-writes an fp32 grad row (grad_hidden token-major, grad_weight vocab-major).
_RMW_ROW_BYTES = {"linear_stats_fwd": 0, "linear_grad_fused": 4}


def launch_plan(name: str, dtype: torch.dtype, dot_precision: str, spec: Optional[DeviceSpec], outer: int,
                inner: int, dim: int, outer_is_vocab: bool = False, splits: Optional[int] = None,
                group_size: Optional[int] = None) -> Tuple[TileConfig, SplitPlan]:
    """(default config, split plan) of a GEMM-like sweep of kernel ``name``: ``outer`` rows (tokens, or vocab
    rows when ``outer_is_vocab``) in blocks, each program streaming ``inner`` elements of the other side."""
    cfg = default_config(name, dtype, dot_precision, spec)
    block = cfg.block_v if outer_is_vocab else cfg.block_n
    row_bytes = dim * (dtype.itemsize + _RMW_ROW_BYTES[name])
    plan = split_plan(-(-outer // block), inner, block * row_bytes, cfg, dtype.itemsize, spec, splits, group_size)
    return cfg, plan


def merge_block_n(splits: int, spec: Optional[DeviceSpec]) -> int:
    """Rows per program of the split merge: 128, fewer when [rows, next_pow2(splits)] would pass 2048 (three
    such fp32 tiles per program; 4096 took 247 registers on sm_80)."""
    return _INTERPRETER.block_n if spec is None else max(8, min(128, 2048 // max(next_pow2(splits), 2)))
