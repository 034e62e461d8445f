"""Traffic model: FLOPs, HBM and L2 bytes, epilogue work and extra memory of each pass, from the shapes, tiles,
splits and chunk size, turned into a roofline estimate for a named GPU by :mod:`roofline`.  Estimates, not
measurements: a GPU run confirms or corrects them (bench/README.md, "Traffic model").

Passes (hidden [N, H], weight [V, H], e bytes per element of the GEMM dtype; a GEMM is 2·N·H·V FLOPs):
- ``stats_pass``: ``_linear_stats_fwd_kernel`` over a (token blocks x vocab splits) grid, then the merge.
- ``design_b_backward``: ``_linear_grad_fused_kernel``: per [BLOCK_N, BLOCK_V] tile, recompute z, form dz,
  then dz @ W into fp32 grad_hidden rows and dz^T @ h as fp32 reductions into grad_weight.
- ``design_a_backward`` / ``training_sweep``: per token chunk, vendor GEMMs around Triton epilogues with an
  fp32 [chunk, V] logits buffer (the sweep also reads that buffer once for the stats).
- ``training_with_stats``: the stats pass, then a backward design (no old entropy given: 4 GEMMs).
Defaults (tiles, splits, chunk size) are read at call time from ``ops/tile_config.py`` and
``torch_chunked.resolve_chunk_size``, so the estimates follow retuning.  No Triton import.

L2 residency of the Triton kernels: the programs resident at once (SMs x programs per SM, launch order with
token blocks fastest) touch some token blocks (hidden rows, fp32 grad_hidden rows: re-used across the vocab
loop, "long" re-use) and some vocab tiles (weight, fp32 grad_weight: shared at the same moment by the
programs of one split, "short" re-use).  Short re-use hits L2 while its tiles fit; long re-use then hits in
proportion to the capacity left (a cache keeping a random part of a cyclic working set; strict LRU would
keep none).  Vendor GEMMs read each operand ``vendor_operand_reads`` times (good rasterization); their L2
traffic is inside the calibration.  Not modeled: launch latency beyond a fixed cost per tiny kernel,
atomic-unit throughput, the per-step address arithmetic of the fused grad kernel's H-loops (design (b) is
optimistic), bias terms, clocks below boost.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from erpo_kernels.benchmark.roofline import (ASSUMPTIONS, Assumptions, GPULike, GPUSpec, PassEstimate, Phase,
                                             get_gpu)

GIB = 1 << 30
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Triton 3.9, offline compile for sm_90a (stub GPUTarget, launch-time divisibility hints), bf16, 8 warps:
# _linear_stats_fwd_kernel 64x128x64 uses 137 registers, 128x128 and 128x256 use 255 (with spills);
# _linear_grad_fused_kernel 64x128x64 uses 233.  With 8 warps anything above 128 allows one program per SM,
# so 255 predicts the occupancy of every config tried (4 warps: 2 per SM).
REGISTERS_PER_THREAD = 255
# Issued instructions per logit in the epilogue (same compile; static SASS count per tile / logits per thread):
# ~26 in the stats kernel (1 ex2; the division by the temperature becomes 1 RCP per tile + FMULs), ~34 in the
# fused grad kernel (1 ex2).  The elementwise dz epilogue of design (a) is taken as 34 too (it is HBM-bound).
STATS_EPILOGUE_INSTRUCTIONS = 26
DZ_EPILOGUE_INSTRUCTIONS = 34
# Weight tiles per in-flight vocab position kept live in L2 (programs of one split drift apart a little).
WEIGHT_TILES_LIVE = 2


def _io_bytes(tokens: int, hidden: int, vocab: int, e: int, grads: bool, per_token_fp32: int) -> float:
    """hidden [N, H] + weight [V, H] + targets [N] int64 + per-token fp32 vectors (+ the two grads)."""
    operands = (tokens + vocab) * hidden * e
    return operands * (2 if grads else 1) + tokens * (8 + 4 * per_token_fp32)


def gemm_floor(tokens: int, hidden: int, vocab: int, gemms: int, dtype: str = "bf16", gpu: GPULike = "h100",
               assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``gemms`` GEMMs of 2·N·H·V FLOPs at the calibrated efficiency: the reference every pass is a ratio of."""
    flops = gemms * 2.0 * tokens * hidden * vocab
    return PassEstimate(f"floor-{gemms}", get_gpu(gpu), dtype, gemms, flops, (Phase("GEMMs", flops=flops),),
                        0.0, _io_bytes(tokens, hidden, vocab, ELEMENT_BYTES[dtype], gemms > 1, 0), assumptions)


# ----------------------------------------------------------------------------------------------
# the tiled Triton kernels: which programs run at once, what they share in L2
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Residency:
    """Programs of a (token blocks x vocab splits) grid resident at once, in launch order."""
    token_blocks: int
    splits: int
    resident: int            # SMs x programs per SM
    blocks_in_flight: int    # distinct token blocks among the resident programs
    splits_in_flight: int    # distinct vocab splits among them

    @property
    def tail(self) -> float:
        waves = self.token_blocks * self.splits / self.resident
        return math.ceil(waves) / waves

    @property
    def token_waves(self) -> int:
        """How many times each weight panel is fetched: once per wave of token blocks."""
        return math.ceil(self.token_blocks / self.blocks_in_flight)


def programs_per_sm(tiles, gpu: GPUSpec, e: int, registers_per_thread: int = REGISTERS_PER_THREAD) -> int:
    """Occupancy from registers (allocated per warp in units of 8 per thread) and pipelined operand tiles."""
    per_thread = -(-registers_per_thread // 8) * 8
    by_registers = gpu.registers_per_sm // (per_thread * 32 * tiles.num_warps)
    smem = (tiles.block_n + tiles.block_v) * tiles.block_h * e * max(tiles.num_stages, 1) + 1024
    by_smem = gpu.smem_per_sm_kib * 1024 // smem
    return max(1, min(by_registers, by_smem, 64 // tiles.num_warps))


def _split_width(vocab: int, splits: int) -> int:
    """Columns per split, as ``tile_config.split_size`` computes them on a GPU (``_SPLIT_ALIGN``-aligned)."""
    from erpo_kernels.ops import tile_config   # torch-only module: no Triton import
    align = tile_config._SPLIT_ALIGN
    return -(-(-(-vocab // splits)) // align) * align


def vocab_splits(token_blocks: int, vocab: int, gpu: GPUSpec) -> int:
    """The split count ``tile_config.num_splits`` and the launcher give on ``gpu`` (>= 2 programs per SM,
    at most ``max_splits``, no empty split): the same rule, evaluated for a GPU that is not here."""
    from erpo_kernels.ops import tile_config
    max_splits = inspect.signature(tile_config.num_splits).parameters["max_splits"].default
    splits = max(1, min(-(-2 * gpu.sms // max(token_blocks, 1)), max_splits, -(-vocab // tile_config._SPLIT_ALIGN)))
    return -(-vocab // _split_width(vocab, splits))


def _vocab_tiles(vocab: int, splits: int, block_v: int) -> int:
    """Vocab tiles summed over the splits (every split is ``_split_width`` columns but the last)."""
    width = _split_width(vocab, splits)
    full, last = divmod(vocab, width)
    return full * -(-width // block_v) + -(-last // block_v)


def residency(tokens: int, vocab: int, tiles, gpu: GPUSpec, e: int, splits: Optional[int] = None,
              programs: Optional[int] = None, group_n: Optional[int] = None) -> Residency:
    """Token blocks vary fastest in the launch order (grid axis 0); ``group_n`` models a grouped order
    that keeps that many token blocks in flight and fills the rest of the GPU with other splits."""
    token_blocks = -(-tokens // tiles.block_n)
    # as the launchers do: aligned split widths, then as many splits as it takes to cover the vocab
    splits = -(-vocab // _split_width(vocab, splits)) if splits else vocab_splits(token_blocks, vocab, gpu)
    resident = gpu.sms * (programs or programs_per_sm(tiles, gpu, e))
    group = resident if group_n is None else group_n
    blocks = min(token_blocks, max(group, -(-resident // splits)))
    return Residency(token_blocks, splits, resident, blocks, min(splits, -(-resident // blocks)))


def _l2_hits(gpu: GPUSpec, a: Assumptions, short_bytes: float, long_bytes: float) -> Tuple[float, float]:
    """(short, long) hit fractions: short re-use first, long re-use in the capacity left."""
    capacity = gpu.l2_bytes * a.l2_usable_fraction
    short_hit = 1.0 if short_bytes <= capacity else capacity / short_bytes
    long_hit = min(1.0, max(0.0, capacity - short_bytes) / long_bytes) if long_bytes > 0 else 1.0
    return short_hit, long_hit


def _default_tiles(kernel: str, tiles):
    """``tiles`` or tile_config's GPU default for ``kernel``, read now (it follows retuning)."""
    if tiles is not None:
        return tiles
    from erpo_kernels.ops import tile_config   # torch-only module: no Triton import
    return tile_config._GPU_DEFAULTS[kernel]


# ----------------------------------------------------------------------------------------------
# the passes
# ----------------------------------------------------------------------------------------------
def stats_pass(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
               tiles=None, splits: Optional[int] = None, programs: Optional[int] = None,
               group_n: Optional[int] = None, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_stats_fwd``: the fused kernel over (token blocks x vocab splits), then the merge of the
    fp32 partials [3, N, splits].  ``tiles``: a ``TileConfig`` (default: tile_config's, read at call time);
    ``splits``: vocab splits (default: tile_config's rule for this GPU); ``programs``: per SM (default: from
    registers and shared memory); ``group_n``: token blocks in flight under a grouped launch order."""
    gpu, e = get_gpu(gpu), ELEMENT_BYTES[dtype]
    tiles = _default_tiles("linear_stats_fwd", tiles)
    res = residency(tokens, vocab, tiles, gpu, e, splits, programs, group_n)
    bn, bv = tiles.block_n, tiles.block_v
    vocab_tiles = _vocab_tiles(vocab, res.splits, bv)
    logits = res.token_blocks * bn * vocab_tiles * bv            # computed, ragged tiles padded
    short_hit, long_hit = _l2_hits(gpu, assumptions, res.splits_in_flight * bv * hidden * e * WEIGHT_TILES_LIVE,
                                   res.blocks_in_flight * bn * hidden * e)
    # a program reads its hidden block once per vocab tile of its split: the first read from HBM
    hidden_hbm = tokens * hidden * e * (res.splits + (vocab_tiles - res.splits) * (1 - long_hit))
    # a weight panel is fetched once per wave of token blocks; the wave's other programs share it in L2
    weight_hbm = vocab * hidden * e * (res.token_waves + (res.token_blocks - res.token_waves) * (1 - short_hit))
    partials = 3 * tokens * res.splits * 4
    operands_l2 = res.token_blocks * vocab_tiles * (bn + bv) * hidden * e
    kernel = Phase("stats kernel", flops=2.0 * logits * hidden,
                   hbm_bytes=hidden_hbm + weight_hbm + partials + tokens * (8 + 4), l2_bytes=operands_l2,
                   exps=logits, instructions=logits * STATS_EPILOGUE_INSTRUCTIONS, tail=res.tail,
                   detail=(("hidden hbm", hidden_hbm), ("weight hbm", weight_hbm), ("operands l2", operands_l2)))
    merge = Phase("merge", hbm_bytes=partials + tokens * (4 + 8 + 3 * 4))
    return PassEstimate("stats", gpu, dtype, 1, 2.0 * tokens * hidden * vocab, (kernel, merge),
                        partials + tokens * 4, _io_bytes(tokens, hidden, vocab, e, False, 3), assumptions)


def design_b_backward(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                      tiles=None, splits: Optional[int] = None, programs: Optional[int] = None,
                      group_n: Optional[int] = None, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_grad_fused``, token-major with fp32 reductions into grad_weight (the default): per
    [BLOCK_N, BLOCK_V] tile a K-loop for z, then loops over H for dz @ W (fp32 grad_hidden rows: load + store
    when one split owns them, a reduction otherwise) and dz^T @ h (fp32 reduction into grad_weight).
    Fp32 [N, H] and [V, H] accumulators are zeroed first and cast once at the end.  Arguments as ``stats_pass``."""
    gpu, e = get_gpu(gpu), ELEMENT_BYTES[dtype]
    tiles = _default_tiles("linear_grad_fused", tiles)
    res = residency(tokens, vocab, tiles, gpu, e, splits, programs, group_n)
    bn, bv = tiles.block_n, tiles.block_v
    vocab_tiles = _vocab_tiles(vocab, res.splits, bv)
    steps = res.token_blocks * vocab_tiles                        # (token block, vocab tile) pairs
    row_update = 8 if res.splits == 1 else 4                      # load + store, or a reduction (4 B sent)
    grad_hidden_l2 = steps * bn * hidden * row_update
    grad_weight_l2 = steps * bv * hidden * 4
    operands_l2 = steps * 2 * (bn + bv) * hidden * e              # the K-loop, then W and h again
    short_hit, long_hit = _l2_hits(gpu, assumptions,
                                   res.splits_in_flight * bv * hidden * (e + 4) * WEIGHT_TILES_LIVE,
                                   res.blocks_in_flight * bn * hidden * (e + 4))
    hidden_hbm = tokens * hidden * e * (res.splits + (2 * vocab_tiles - res.splits) * (1 - long_hit))
    grad_hidden_hbm = tokens * hidden * 8 * (1 + (vocab_tiles - 1) * (1 - long_hit))
    weight_hbm = vocab * hidden * e * (res.token_waves + (2 * res.token_blocks - res.token_waves) * (1 - short_hit))
    grad_weight_hbm = vocab * hidden * 8 * (res.token_waves + (res.token_blocks - res.token_waves) * (1 - short_hit))
    logits = steps * bn * bv
    kernel = Phase("fused grad kernel", flops=3 * 2.0 * logits * hidden,
                   hbm_bytes=hidden_hbm + grad_hidden_hbm + weight_hbm + grad_weight_hbm + tokens * 28,
                   l2_bytes=operands_l2 + grad_hidden_l2 + grad_weight_l2, exps=logits,
                   instructions=logits * DZ_EPILOGUE_INSTRUCTIONS, tail=res.tail,
                   detail=(("grad_hidden l2", grad_hidden_l2), ("grad_weight l2", grad_weight_l2),
                           ("operands l2", operands_l2), ("hidden hbm", hidden_hbm),
                           ("grad_hidden hbm", grad_hidden_hbm), ("weight hbm", weight_hbm),
                           ("grad_weight hbm", grad_weight_hbm)))
    accumulators = (tokens + vocab) * hidden * 4
    phases = (Phase("zero fp32 grads", hbm_bytes=accumulators), kernel,
              Phase("cast grads", hbm_bytes=accumulators + (tokens + vocab) * hidden * e))
    return PassEstimate("design-b-backward", gpu, dtype, 3, 3 * 2.0 * tokens * hidden * vocab, phases,
                        accumulators, _io_bytes(tokens, hidden, vocab, e, True, 4), assumptions)


def _chunked(name: str, with_stats: bool, tokens: int, hidden: int, vocab: int, dtype: str, gpu: GPULike,
             chunk_size: Optional[int], dz_cast_in_epilogue: bool, logits_zero_filled: bool,
             assumptions: Assumptions) -> PassEstimate:
    """Design (a) (``with_stats=False``) or the 3-GEMM sweep: per chunk of n tokens, totals over chunks."""
    from erpo_kernels.backends.torch_chunked import cuda_chunk_rows
    gpu, e, a = get_gpu(gpu), ELEMENT_BYTES[dtype], assumptions
    dz_extra = e if dtype == "bf16" else 0        # bf16 dz has its own buffer; fp32 dz overwrites the logits
    io = _io_bytes(tokens, hidden, vocab, e, True, 8 if with_stats else 4)
    free = max(int(gpu.memory_gb * 1e9) - io, 0)  # the device holds the inputs and outputs, nothing else
    chunk = min(tokens, chunk_size or cuda_chunk_rows(vocab, free, dz_extra))
    chunks = -(-tokens // chunk)
    reads = a.vendor_operand_reads
    h_bytes, w_bytes, logits = tokens * hidden * e, vocab * hidden * e, tokens * vocab
    gemm = 2.0 * tokens * hidden * vocab
    # fp32 logits written once (beta=0); a zero-filled buffer is also written by the fill and read by the GEMM
    logits_out = logits * 4 * (3 if logits_zero_filled else 1)
    phases = [Phase("logits GEMM", flops=gemm, hbm_bytes=reads * (h_bytes + chunks * w_bytes) + logits_out)]
    if with_stats:
        phases += [Phase("logits stats", hbm_bytes=logits * 4 + tokens * (8 + 6 * 4), exps=logits,
                         instructions=logits * STATS_EPILOGUE_INSTRUCTIONS),
                   Phase("per-token coefficients", fixed_s=chunks * a.small_kernels_per_chunk * a.small_kernel_s)]
    # dz into a second buffer in the GEMM dtype; else (code at c81f427) fp32 in place, then a cast copy
    dz_bytes = logits * (4 + e) if dz_cast_in_epilogue else logits * (4 + 4 + 4 + e)
    accumulator = vocab * hidden * 4
    phases += [
        Phase("dz epilogue", hbm_bytes=dz_bytes + tokens * 5 * 4, exps=logits,
              instructions=logits * DZ_EPILOGUE_INSTRUCTIONS),
        Phase("grad_hidden GEMM", flops=gemm, hbm_bytes=reads * (logits * e + chunks * w_bytes) + h_bytes),
        Phase("grad_weight GEMM", flops=gemm,   # the fp32 [V, H] accumulator is read and written per chunk
              hbm_bytes=reads * (logits * e + h_bytes) + chunks * accumulator * 2,
              detail=(("accumulator hbm", chunks * accumulator * 2),)),
        # the first chunk's GEMMs write grad_hidden and the accumulator (no zero-fill); one cast at the end
        Phase("cast grad_weight", hbm_bytes=(accumulator + vocab * hidden * e) if e != 4 else 0)]
    extra = chunk * vocab * (4 + dz_extra) + (accumulator if e != 4 else 0) + (3 * chunk * 4 if with_stats else 0)
    return PassEstimate(name, gpu, dtype, 3, 3 * gemm, tuple(phases), extra, io, assumptions)


def design_a_backward(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                      chunk_size: Optional[int] = None, dz_cast_in_epilogue: bool = True,
                      logits_zero_filled: bool = False, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_grad_chunked``: per chunk the logits GEMM (fp32 out), the dz epilogue, the two grad GEMMs
    (grad_weight into an fp32 [V, H] accumulator).  ``chunk_size``: tokens per chunk (default:
    ``torch_chunked.cuda_chunk_rows`` with the GPU's memory less the inputs and outputs, read at call time)."""
    return _chunked("design-a-backward", False, tokens, hidden, vocab, dtype, gpu, chunk_size,
                    dz_cast_in_epilogue, logits_zero_filled, assumptions)


def training_sweep(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                   chunk_size: Optional[int] = None, dz_cast_in_epilogue: bool = True,
                   logits_zero_filled: bool = False, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_fused_train`` (old entropy given): design (a)'s flow plus one read of the fp32 logits buffer
    for the stats and the per-token coefficients, per chunk; 3-GEMM floor."""
    return _chunked("sweep", True, tokens, hidden, vocab, dtype, gpu, chunk_size, dz_cast_in_epilogue,
                    logits_zero_filled, assumptions)


def training_with_stats(stats: PassEstimate, backward: PassEstimate, name: str) -> PassEstimate:
    """The stats pass, then a backward design (no old entropy given): a 4-GEMM floor.  Peak extra memory is
    the larger of the two (the [N] statistics kept in between are negligible)."""
    return PassEstimate(name, stats.gpu, stats.dtype, 4, stats.floor_flops * 4, stats.phases + backward.phases,
                        max(stats.extra_bytes, backward.extra_bytes), backward.io_bytes, stats.assumptions)


def estimate_passes(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100",
                    assumptions: Assumptions = ASSUMPTIONS) -> Dict[str, PassEstimate]:
    """Every pass at one shape with default tiles, splits and chunk size: the floors (1, 3, 4 GEMMs),
    "stats", "sweep" (old entropy given), "train-a" / "train-b" (stats pass + design (a) / (b) backward)."""
    args = (tokens, hidden, vocab, dtype, gpu)
    stats = stats_pass(*args, assumptions=assumptions)
    return {
        "floor-1": gemm_floor(tokens, hidden, vocab, 1, dtype, gpu, assumptions),
        "stats": stats,
        "floor-3": gemm_floor(tokens, hidden, vocab, 3, dtype, gpu, assumptions),
        "sweep": training_sweep(*args, assumptions=assumptions),
        "floor-4": gemm_floor(tokens, hidden, vocab, 4, dtype, gpu, assumptions),
        "train-a": training_with_stats(stats, design_a_backward(*args, assumptions=assumptions), "train-a"),
        "train-b": training_with_stats(stats, design_b_backward(*args, assumptions=assumptions), "train-b"),
    }
