"""Traffic model: FLOPs, HBM and L2 bytes, epilogue work and extra memory of each pass, from the shapes, tiles,
splits, launch groups and chunk size, turned into a roofline estimate for a named GPU by :mod:`roofline`.
Estimates, not measurements: a GPU run confirms or corrects them (bench/README.md, "Traffic model").

Passes (hidden [N, H], weight [V, H], e bytes per element of the GEMM dtype; a GEMM is 2·N·H·V FLOPs):
- ``stats_pass``: ``_linear_stats_fwd_kernel`` over token blocks x vocab splits, then the merge.
- ``design_b_backward``: ``_linear_grad_fused_kernel``: per [BLOCK_N, BLOCK_V] tile, recompute z, form dz,
  then dz @ W as fp32 reductions into grad_hidden rows and dz^T @ h as fp32 reductions into grad_weight.
- ``design_a_backward`` / ``training_sweep``: per token chunk, vendor GEMMs around Triton epilogues with an
  fp32 [chunk, V] logits buffer (the sweep also reads that buffer once for the stats).
- ``training_with_stats``: the stats pass, then a backward design (no old entropy given: 4 GEMMs).
Defaults are read at call time: tiles, splits and launch groups from ``tile_config.launch_plan`` for the
stub DeviceSpec of the GPU (:func:`device_spec`), the chunk size from ``torch_chunked.cuda_chunk_rows``, the
dz dtype from ``chunk_gemms.dz_dtype``; so the estimates follow retuning.  No Triton import.

Launch order of the tiled kernels (``_grouped_program``): groups of ``group_size`` token blocks x all
splits, token block fastest.  The model walks that order in waves of the resident programs (SMs x programs
per SM, taken to start and end together: every program has the same work but the last split's) and counts
per wave, for each operand re-read by the tile loop:
- token side (hidden; design (b)'s fp32 grad_hidden rows): each token block of the wave comes from HBM
  once, shared by its splits; its re-reads (one per vocab tile) hit L2 in the capacity that the short
  re-use below leaves ("long" re-use: a cache keeping a random part of a cyclic working set).
- vocab side (weight; fp32 grad_weight): each split of the wave comes from HBM once, shared by the wave's
  programs that walk it in step (a group's token blocks: once per group when a group fits in a wave); their
  reads hit while ``WEIGHT_TILES_LIVE`` tiles per split fit in L2 ("short" re-use).
Programs per SM: ``tile_config._resident_programs``, the rule the split plan itself uses (256 registers
per thread, shared memory of the pipelined operand tiles).  bench/OFFLINE.md's compiled defaults use 172-255
registers, which give the same count: one program per SM with 8 warps, two with 4 warps.
Vendor GEMMs read each operand ``vendor_operand_reads`` times (good rasterization); their L2 traffic is
inside the calibration.  Not modeled: launch latency beyond a fixed cost per tiny kernel, atomic-unit
throughput, the per-step address arithmetic of the fused grad kernel's H-loops (design (b) is optimistic),
bias terms, clocks below boost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from erpo_kernels.benchmark.roofline import (ASSUMPTIONS, Assumptions, GPULike, GPUSpec, PassEstimate, Phase,
                                             get_gpu)

GIB = 1 << 30
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Issued instructions per logit outside the GEMM loops, per kernel and device class: the static SASS of the
# bf16 default config (nvdisasm of the offline compile, Triton 3.9, sm_90a / sm_80), instructions of the tile
# loop outside its K-loop (the per-tile prologue and the epilogue: online softmax or dz, 1 ex2 per logit)
# divided by the logits per thread of one tile (fp32 operands reuse these counts).  The fused grad kernel's
# H-loops (~380 instructions per H-step on sm_90a, address arithmetic and fp32 reductions) are not counted:
# see "Not modeled".
EPILOGUE_INSTRUCTIONS = {
    "linear_stats_fwd": {"sm90": 12, "sm80": 15},    # 128x256x64 w8: 1500 / 128; 128x128x32 w8: 981 / 64
    "linear_grad_fused": {"sm90": 27, "sm80": 26},   # 128x128x64 w8: 1752 / 64; 128x128x32 w8: 1689 / 64
    "logits_stats": {"sm90": 36, "sm80": 38},        # design (a) stats of the fp32 block, 8x1024 w8
    "dz_epilogue": {"sm90": 33, "sm80": 32},         # design (a) dz, 32x256 w4
}


def epilogue_instructions(kernel: str, gpu: GPULike) -> int:
    return EPILOGUE_INSTRUCTIONS[kernel][device_spec(gpu).arch]


# Vocab tiles per split kept live in L2 while the programs walking that split drift apart (a guess: the tile
# being read and the one before it).
WEIGHT_TILES_LIVE = 2


def _io_bytes(tokens: int, hidden: int, vocab: int, e: int, grads: bool, per_token_fp32: int) -> float:
    """hidden [N, H] + weight [V, H] + targets [N] int64 + per-token fp32 vectors (+ the two grads)."""
    operands = (tokens + vocab) * hidden * e
    return operands * (2 if grads else 1) + tokens * (8 + 4 * per_token_fp32)


def _torch_dtype(dtype: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def gemm_floor(tokens: int, hidden: int, vocab: int, gemms: int, dtype: str = "bf16", gpu: GPULike = "h100",
               assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``gemms`` GEMMs of 2·N·H·V FLOPs at the calibrated efficiency: the reference every pass is a ratio of."""
    flops = gemms * 2.0 * tokens * hidden * vocab
    return PassEstimate(f"floor-{gemms}", get_gpu(gpu), dtype, gemms, flops, (Phase("GEMMs", flops=flops),),
                        0.0, _io_bytes(tokens, hidden, vocab, ELEMENT_BYTES[dtype], gemms > 1, 0), assumptions)


# ----------------------------------------------------------------------------------------------
# what the launchers run on a GPU that is not here, and which programs run together
# ----------------------------------------------------------------------------------------------
def device_spec(gpu: GPULike):
    """The ``tile_config.DeviceSpec`` the launch heuristics would read on ``gpu``: ``tile_config.H100``
    (capability >= 90) or ``tile_config.A100`` with the GPU's SMs, L2 and shared memory per block (the SM's
    less the 1 KiB reserved): h100 and a100 give the stubs themselves, h200 the H100 stub with its own L2."""
    from erpo_kernels.ops import tile_config   # torch-only module: no Triton import
    gpu = get_gpu(gpu)
    stub = tile_config.H100 if gpu.capability >= 90 else tile_config.A100
    spec = dataclasses.replace(stub, sm_count=gpu.sms, l2_bytes=int(gpu.l2_bytes),
                               smem_per_block=gpu.smem_per_sm_kib * 1024 - 1024)
    return stub if spec == stub else dataclasses.replace(spec, name=gpu.name)


def programs_per_sm(tiles, gpu: GPULike, e: int) -> int:
    """Programs of ``tiles`` resident per SM: tile_config's estimate (registers, shared memory)."""
    from erpo_kernels.ops import tile_config
    return tile_config._resident_programs(tiles, e, device_spec(gpu)) // get_gpu(gpu).sms


@dataclass(frozen=True)
class LaunchOrder:
    """A token-major launch of a tiled kernel: tiles, vocab splits of ``split_len`` columns, launch groups of
    ``group_size`` token blocks, and the programs resident at once."""
    tiles: object            # tile_config.TileConfig
    tokens: int
    vocab: int
    splits: int
    split_len: int
    group_size: int
    resident: int            # SMs x programs per SM

    @property
    def token_blocks(self) -> int:
        return -(-self.tokens // self.tiles.block_n)

    @property
    def groups(self) -> int:
        return -(-self.token_blocks // self.group_size)

    @property
    def tail(self) -> float:
        waves = self.token_blocks * self.splits / self.resident
        return -(-self.token_blocks * self.splits // self.resident) / waves

    def split_cols(self, split: int) -> int:
        return min(self.split_len, self.vocab - split * self.split_len)

    def split_tiles(self, split: int) -> int:
        return -(-self.split_cols(split) // self.tiles.block_v)

    @property
    def vocab_tiles(self) -> int:
        """Vocab tiles summed over the splits (what one token block walks)."""
        return sum(self.split_tiles(s) for s in range(self.splits))

    def block_rows(self, first: int, count: int) -> int:
        """Rows of token blocks first .. first + count - 1 (the last block of all may be short)."""
        last = min(first + count, self.token_blocks)
        return max(0, min(last * self.tiles.block_n, self.tokens) - first * self.tiles.block_n)


def launch_order(kernel: str, tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100",
                 tiles=None, splits: Optional[int] = None, group_size: Optional[int] = None,
                 programs: Optional[int] = None) -> LaunchOrder:
    """What the launcher of ``kernel`` ("linear_stats_fwd", or "linear_grad_fused" token-major) runs on
    ``gpu``: ``tile_config.launch_plan`` for :func:`device_spec` (fp32: "ieee" precision, torch's default).
    ``tiles``: other tiles, planned by the same ``split_plan``; ``splits`` / ``group_size``: explicit, as the
    launchers take them; ``programs``: programs per SM of the model's waves only (the plan keeps its own)."""
    from erpo_kernels.ops import tile_config
    e, spec = ELEMENT_BYTES[dtype], device_spec(gpu)
    if tiles is None:
        tiles, plan = tile_config.launch_plan(kernel, _torch_dtype(dtype), "ieee", spec, tokens, vocab, hidden,
                                              splits=splits, group_size=group_size)
    else:   # launch_plan's outer block: the rows a program re-reads per vocab tile (+ fp32 grad rows)
        block_bytes = tiles.block_n * hidden * (e + tile_config._RMW_ROW_BYTES[kernel])
        plan = tile_config.split_plan(-(-tokens // tiles.block_n), vocab, block_bytes, tiles, e, spec, splits,
                                      group_size)
    resident = get_gpu(gpu).sms * (programs or programs_per_sm(tiles, gpu, e))
    return LaunchOrder(tiles, tokens, vocab, plan.splits, plan.split_len, plan.group_size, resident)


@dataclass(frozen=True)
class Wave:
    """``resident`` consecutive programs of the launch order, and what they touch."""
    programs: int
    rows: int            # rows of the distinct token blocks
    splits: int          # distinct vocab splits
    cols: int            # their columns
    row_tiles: int       # sum over programs of block rows x vocab tiles of its split (token-side reads, in rows)
    program_cols: int    # sum over programs of the columns of its split (vocab-side reads, in columns)


def waves(order: LaunchOrder) -> List[Wave]:
    """The launch in waves of ``order.resident`` programs, in ``_grouped_program``'s order: program ``pid``
    is in group ``pid // (group_size x splits)``; inside it, token block fastest, then split."""
    per_group, total = order.group_size * order.splits, order.token_blocks * order.splits
    out = []
    for start in range(0, total, order.resident):
        stop = min(start + order.resident, total)
        blocks, splits = set(), set()
        rows = row_tiles = program_cols = 0
        for group in range(start // per_group, (stop - 1) // per_group + 1):
            first, base = group * order.group_size, group * per_group
            group_rows = min(order.token_blocks - first, order.group_size)
            lo, hi = max(start, base) - base, min(stop, base + group_rows * order.splits) - base
            for split in range(lo // group_rows, (hi - 1) // group_rows + 1):
                b0 = max(lo, split * group_rows) - split * group_rows
                b1 = min(hi, (split + 1) * group_rows) - split * group_rows
                span = order.block_rows(first + b0, b1 - b0)
                row_tiles += span * order.split_tiles(split)
                program_cols += (b1 - b0) * order.split_cols(split)
                splits.add(split)
                new = [b for b in range(first + b0, first + b1) if b not in blocks]
                blocks.update(new)
                rows += sum(order.block_rows(b, 1) for b in new)
        cols = sum(order.split_cols(s) for s in splits)
        out.append(Wave(stop - start, rows, len(splits), cols, row_tiles, program_cols))
    return out


def _l2_hits(gpu: GPUSpec, a: Assumptions, short_bytes: float, long_bytes: float) -> Tuple[float, float]:
    """(short, long) hit fractions: short re-use first, long re-use in the capacity left."""
    capacity = gpu.l2_bytes * a.l2_usable_fraction
    short_hit = 1.0 if short_bytes <= capacity else capacity / short_bytes
    long_hit = min(1.0, max(0.0, capacity - short_bytes) / long_bytes) if long_bytes > 0 else 1.0
    return short_hit, long_hit


def _wave_hbm(order: LaunchOrder, gpu: GPUSpec, a: Assumptions, hidden: int, token_bytes: int,
              vocab_bytes: int, reads_per_tile: int) -> Tuple[float, float]:
    """(token-side, vocab-side) HBM elements x H, summed over waves: per wave each token block and each split
    once, the other reads (``reads_per_tile`` per tile) missed in proportion to the L2 hit fractions.
    ``token_bytes`` / ``vocab_bytes``: bytes per element kept in L2 on each side (operand + fp32 grad)."""
    token = vocab = 0.0
    for w in waves(order):
        live_vocab = w.splits * WEIGHT_TILES_LIVE * order.tiles.block_v * hidden * vocab_bytes
        short_hit, long_hit = _l2_hits(gpu, a, live_vocab, w.rows * hidden * token_bytes)
        token += w.rows + (reads_per_tile * w.row_tiles - w.rows) * (1 - long_hit)
        vocab += w.cols + (reads_per_tile * w.program_cols - w.cols) * (1 - short_hit)
    return token * hidden, vocab * hidden


# ----------------------------------------------------------------------------------------------
# the passes
# ----------------------------------------------------------------------------------------------
def stats_pass(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
               tiles=None, splits: Optional[int] = None, group_size: Optional[int] = None,
               programs: Optional[int] = None, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_stats_fwd``: the fused kernel over (token blocks x vocab splits) in launch groups, then the
    merge of the fp32 partials [3, N, splits].  ``tiles`` (a ``TileConfig``), ``splits``, ``group_size``,
    ``programs`` (per SM): as :func:`launch_order` (default: what the launcher picks on ``gpu``)."""
    gpu, e = get_gpu(gpu), ELEMENT_BYTES[dtype]
    order = launch_order("linear_stats_fwd", tokens, hidden, vocab, dtype, gpu, tiles, splits, group_size, programs)
    bn, bv = order.tiles.block_n, order.tiles.block_v
    logits = order.token_blocks * bn * order.vocab_tiles * bv            # computed, ragged tiles padded
    hidden_hbm, weight_hbm = (x * e for x in _wave_hbm(order, gpu, assumptions, hidden, e, e, 1))
    partials = 3 * tokens * order.splits * 4
    operands_l2 = order.token_blocks * order.vocab_tiles * (bn + bv) * hidden * e
    target_rows = tokens * hidden * e       # split 0 gathers weight[y_n] for the target logit (hidden: in L2)
    kernel = Phase("stats kernel", flops=2.0 * logits * hidden,
                   hbm_bytes=hidden_hbm + weight_hbm + target_rows + partials + tokens * (8 + 4),
                   l2_bytes=operands_l2, exps=logits,
                   instructions=logits * epilogue_instructions("linear_stats_fwd", gpu), tail=order.tail,
                   detail=(("hidden hbm", hidden_hbm), ("weight hbm", weight_hbm), ("target rows hbm", target_rows),
                           ("operands l2", operands_l2)))
    merge = Phase("merge", hbm_bytes=partials + tokens * (4 + 8 + 3 * 4))
    return PassEstimate("stats", gpu, dtype, 1, 2.0 * tokens * hidden * vocab, (kernel, merge),
                        partials + tokens * 4, _io_bytes(tokens, hidden, vocab, e, False, 3), assumptions)


def design_b_backward(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                      tiles=None, splits: Optional[int] = None, group_size: Optional[int] = None,
                      programs: Optional[int] = None, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_grad_fused``, token-major with fp32 reductions into grad_weight (the default): per
    [BLOCK_N, BLOCK_V] tile a K-loop for z, then loops over H for dz @ W (fp32 grad_hidden rows: load + store
    when one split owns them, a reduction otherwise) and dz^T @ h (fp32 reduction into grad_weight).
    Fp32 [N, H] and [V, H] accumulators are zeroed first and cast once at the end.  Arguments as ``stats_pass``."""
    gpu, e = get_gpu(gpu), ELEMENT_BYTES[dtype]
    order = launch_order("linear_grad_fused", tokens, hidden, vocab, dtype, gpu, tiles, splits, group_size, programs)
    bn, bv = order.tiles.block_n, order.tiles.block_v
    steps = order.token_blocks * order.vocab_tiles                 # (token block, vocab tile) pairs
    row_update = 8 if order.splits == 1 else 4                     # load + store, or a reduction (4 B sent)
    grad_hidden_l2 = steps * bn * hidden * row_update
    grad_weight_l2 = steps * bv * hidden * 4
    operands_l2 = steps * 2 * (bn + bv) * hidden * e               # the K-loop, then W and h again
    # operands are read twice per tile, the fp32 grads once (fetched, then written back: 8 bytes)
    hidden_hbm, weight_hbm = (x * e for x in _wave_hbm(order, gpu, assumptions, hidden, e + 4, e + 4, 2))
    grad_hidden_hbm, grad_weight_hbm = (x * 8 for x in _wave_hbm(order, gpu, assumptions, hidden, e + 4, e + 4, 1))
    logits = steps * bn * bv
    kernel = Phase("fused grad kernel", flops=3 * 2.0 * logits * hidden,
                   hbm_bytes=hidden_hbm + grad_hidden_hbm + weight_hbm + grad_weight_hbm + tokens * 28,
                   l2_bytes=operands_l2 + grad_hidden_l2 + grad_weight_l2, exps=logits,
                   instructions=logits * epilogue_instructions("linear_grad_fused", gpu), tail=order.tail,
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
    from erpo_kernels.ops.chunk_gemms import dz_dtype
    gpu, e, a = get_gpu(gpu), ELEMENT_BYTES[dtype], assumptions
    torch_dtype = _torch_dtype(dtype)
    dz_elem = dz_dtype(torch_dtype).itemsize
    dz_extra = dz_elem if dz_elem < 4 else 0      # bf16 dz: its own buffer; fp32 dz: over the logits
    fp32_grads = e < 4 and dz_elem == 4           # fp16: fp32 dz, so fp32 grad GEMMs on an fp32 weight copy
    io = _io_bytes(tokens, hidden, vocab, e, True, 8 if with_stats else 4)
    free = max(int(gpu.memory_gb * 1e9) - io, 0)  # the device holds the inputs and outputs, nothing else
    chunk = min(tokens, chunk_size or cuda_chunk_rows(vocab, free, dz_extra))
    chunks = -(-tokens // chunk)
    reads = a.vendor_operand_reads
    h_bytes, w_bytes, logits = tokens * hidden * e, vocab * hidden * e, tokens * vocab
    grad_e = 4 if fp32_grads else e               # operand bytes of the grad GEMMs
    gemm = 2.0 * tokens * hidden * vocab
    # fp32 logits written once (beta=0); a zero-filled buffer is also written by the fill and read by the GEMM
    logits_out = logits * 4 * (3 if logits_zero_filled else 1)
    phases = [Phase("logits GEMM", flops=gemm, hbm_bytes=reads * (h_bytes + chunks * w_bytes) + logits_out)]
    if fp32_grads:
        phases.insert(0, Phase("upcast weight", hbm_bytes=vocab * hidden * (e + 4)))
    if with_stats:
        phases += [Phase("logits stats", hbm_bytes=logits * 4 + tokens * (8 + 3 * 4), exps=logits,
                         instructions=logits * epilogue_instructions("logits_stats", gpu)),
                   Phase("per-token coefficients", fixed_s=chunks * a.small_kernels_per_chunk * a.small_kernel_s)]
    # the epilogue reads the fp32 logits and writes dz; the legacy flow (code at c81f427) wrote fp32 dz in
    # place, then cast it into a bf16 copy
    dz_bytes = logits * (4 + dz_elem) if dz_cast_in_epilogue else logits * (4 + 4 + 4 + e)
    accumulator = vocab * hidden * 4
    # fp16: grad_hidden via an fp32 [n, H] result copied into fp16; h upcast per chunk for grad_weight
    hidden_out = tokens * hidden * (4 + 4 + e) if fp32_grads else h_bytes
    h_upcast = tokens * hidden * (e + 4) if fp32_grads else 0
    mma = "fp32" if fp32_grads else ""
    phases += [
        Phase("dz epilogue", hbm_bytes=dz_bytes + tokens * 5 * 4, exps=logits,
              instructions=logits * epilogue_instructions("dz_epilogue", gpu)),
        Phase("grad_hidden GEMM", flops=gemm, mma_dtype=mma,
              hbm_bytes=reads * (logits * dz_elem + chunks * vocab * hidden * grad_e) + hidden_out),
        # the first chunk writes the fp32 [V, H] accumulator (beta=0), every later one reads and writes it
        Phase("grad_weight GEMM", flops=gemm, mma_dtype=mma,
              hbm_bytes=reads * (logits * dz_elem + tokens * hidden * grad_e) + h_upcast
              + (2 * chunks - 1) * accumulator, detail=(("accumulator hbm", (2 * chunks - 1) * accumulator),))]
    if e != 4:   # fp32 inputs: the accumulator is grad_weight itself
        phases.append(Phase("cast grad_weight", hbm_bytes=accumulator + w_bytes))
    extra = chunk * vocab * (4 + dz_extra) + (accumulator if e != 4 else 0) + (accumulator if fp32_grads else 0)
    return PassEstimate(name, gpu, dtype, 3, 3 * gemm, tuple(phases), extra, io, assumptions)


def design_a_backward(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                      chunk_size: Optional[int] = None, dz_cast_in_epilogue: bool = True,
                      logits_zero_filled: bool = False, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_grad_chunked``: per chunk the logits GEMM (fp32 out), the dz epilogue (dz in bf16 for bf16
    inputs, fp32 over the logits otherwise), the two grad GEMMs (grad_weight into an fp32 [V, H]
    accumulator).  ``chunk_size``: tokens per chunk (default: ``torch_chunked.cuda_chunk_rows`` with the
    GPU's memory less the inputs and outputs, read at call time)."""
    return _chunked("design-a-backward", False, tokens, hidden, vocab, dtype, gpu, chunk_size,
                    dz_cast_in_epilogue, logits_zero_filled, assumptions)


def training_sweep(tokens: int, hidden: int, vocab: int, dtype: str = "bf16", gpu: GPULike = "h100", *,
                   chunk_size: Optional[int] = None, dz_cast_in_epilogue: bool = True,
                   logits_zero_filled: bool = False, assumptions: Assumptions = ASSUMPTIONS) -> PassEstimate:
    """``linear_fused_train`` (old entropy given): design (a)'s flow plus, per chunk, one read of the fp32
    logits buffer for the stats and one per-token coefficient kernel; 3-GEMM floor."""
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
