"""Triton kernels for the [tokens]-sized advantage synthesis (ERPO_SPEC.md (i)-(iii)).

``token_advantages_triton`` has the arguments and results of
:func:`erpo_kernels.advantages.token_advantages`.  Five launches at most, each one program per
row (sequence) or per statistics cell, looping over its tokens in ``BLOCK_T`` chunks. No atomics,
so results are deterministic:

1. ``_buckets_index_kernel``     grid (B,): n_i and sum(H * mask) (a running cumsum carried across
   blocks), then the bucket b[i, t] of every position (reference.bucket_index, integer formula).
2. ``_buckets_rewards_kernel``   grid (G,): per group reward mean, population std, max == min
   (zero variance), two passes; writes A_seq, the polarity d and zero_var per row.
3. ``_buckets_stats_kernel``     grid (cells,): mean, population std and count of a token value over
   the masked tokens of each cell (rows ``row_order[cell_start[c]:cell_start[c + 1]]``), split into
   ``num_sub`` sub-cells by an optional index (the bucket); two passes. Launched for the sigmoid gate
   (entropy, cells = the gate scope) and for the progress signal (lambda * (lp_old - lp_ref), cells
   = groups, sub-cells = buckets).
4. ``_buckets_synthesis_kernel`` grid (B,): W, s_tilde and A.

Statistics run in fp32 (fp64 for fp64 inputs); outputs have ``old_entropy``'s dtype. The hard
``gate="topk"`` falls back to the torch implementation (:func:`erpo_kernels.advantages.entropy_gate`,
a segmented sort), and its W then enters the synthesis kernel like caller-given gates; so does
``gate_scope="global"`` (its statistics need a torch.distributed all-reduce). The batch
gate scope is one cell, so one program reads every token (twice): fine at [tokens] size.
The row order of each cell is [B]-sized torch glue: none for consecutive groups (``group_size``), else a
stable argsort and per-cell counts by index_add; nothing reads back from the device when ``group_size`` is
given (arbitrary group ids cost the one torch.unique of their resolution).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from erpo_kernels.advantages import Advantages, entropy_gate
from erpo_kernels.validation import as_groups
from erpo_kernels.config import ERPOConfig
from erpo_kernels.ops.tile_config import interpreter_enabled

Tensor = torch.Tensor

# Tile configs, in one place: tokens per block of a row loop, the largest [BLOCK_T, SUB] one-hot tile,
# rows per block of the reward loop.  Under TRITON_INTERPRET=1 every block is 16, so small test shapes
# cross block boundaries (the running cumsum carry, the two-pass loops).
MAX_BLOCK_T = 1024
MAX_SUB_TILE = 8192
BLOCK_ROWS = 128
INTERPRETER_BLOCK = 16
_GATE_NONE, _GATE_SIGMOID, _GATE_GIVEN = 0, 1, 2
_SCOPES = {"group": 0, "batch": 1, "sequence": 2, "global": 1}  # global: gate computed in torch


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_t(T: int, limit: int = MAX_BLOCK_T) -> int:
    if interpreter_enabled():
        return INTERPRETER_BLOCK
    return max(16, min(limit, triton.next_power_of_2(T)))


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 1. bucket index
# ----------------------------------------------------------------------------------------------
@triton.jit
def _buckets_index_kernel(mask_ptr, entropy_ptr, bucket_ptr,
                          T, num_buckets, eps,
                          CUM_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * T
    cols = tl.arange(0, BLOCK_T)
    total = tl.zeros((), tl.int64)
    total_h = tl.zeros((), ACC)
    # pass 0: n_i and sum(H * mask); pass 1: b = ceil(tau * K) - 1, clamped (position tau in exact integer
    # arithmetic).  Both carry the running sums the same way, so the last cumsum equals the total exactly.
    for pass_ in tl.static_range(2):
        n_carry = tl.zeros((), tl.int64)
        h_carry = tl.zeros((), ACC)
        for t0 in range(0, T, BLOCK_T):
            inb = t0 + cols < T
            m = tl.load(mask_ptr + row_start + t0 + cols, mask=inb, other=0) != 0
            count = n_carry + tl.cumsum(m.to(tl.int64), 0)
            n_carry += tl.sum(m.to(tl.int64), 0)
            if CUM_ENTROPY:
                h = tl.load(entropy_ptr + row_start + t0 + cols, mask=inb, other=0.0).to(ACC)
                cum = tl.cumsum(tl.where(m, h, 0.0) + tl.where(cols == 0, h_carry, 0.0), 0)  # carry in the scan
                h_carry = tl.sum(tl.where(cols == BLOCK_T - 1, cum, 0.0), 0)
            if pass_ == 1:
                bucket = (count * num_buckets + total - 1) // total - 1
                if CUM_ENTROPY:
                    entropy_bucket = tl.ceil(cum * num_buckets / tl.maximum(total_h, eps)).to(tl.int64) - 1
                    bucket = tl.where(total_h > eps, entropy_bucket, bucket)
                bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets - 1)
                tl.store(bucket_ptr + row_start + t0 + cols, bucket, mask=inb)
        if pass_ == 0:
            total = tl.maximum(n_carry, 1)
            total_h = h_carry


def buckets_index(mask: Tensor, entropy: Tensor, config: ERPOConfig) -> Tensor:
    """b [B, T] int64 == reference.bucket_index(mask, entropy, config); mask bool, entropy [B, T] contiguous."""
    B, T = mask.shape
    bucket = torch.empty(B, T, dtype=torch.long, device=mask.device)
    _buckets_index_kernel[(B,)](mask, entropy, bucket, T, config.num_buckets, config.eps,
                                CUM_ENTROPY=config.progress == "cum_entropy", BLOCK_T=_block_t(T),
                                ACC=_acc_dtype(entropy.dtype))
    return bucket


# ----------------------------------------------------------------------------------------------
# 2. outcome advantage per group
# ----------------------------------------------------------------------------------------------
@triton.jit
def _buckets_rewards_kernel(rewards_ptr, row_order_ptr, cell_start_ptr,
                            seq_adv_ptr, direction_ptr, zero_var_ptr,
                            eps, reward_threshold,
                            STD_NORMALIZE: tl.constexpr, UNBIASED: tl.constexpr, EP_GRPO: tl.constexpr,
                            BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    cell = tl.program_id(0)
    start = tl.load(cell_start_ptr + cell)
    end = tl.load(cell_start_ptr + cell + 1)
    offs = tl.arange(0, BLOCK_B)
    total = tl.zeros((BLOCK_B,), ACC)
    high = tl.full((BLOCK_B,), float("-inf"), ACC)
    low = tl.full((BLOCK_B,), float("inf"), ACC)
    for base in range(start, end, BLOCK_B):
        valid = base + offs < end
        row = tl.load(row_order_ptr + base + offs, mask=valid, other=0)
        r = tl.load(rewards_ptr + row, mask=valid, other=0.0).to(ACC)
        total += tl.where(valid, r, 0.0)
        high = tl.maximum(high, tl.where(valid, r, float("-inf")))
        low = tl.minimum(low, tl.where(valid, r, float("inf")))
    count = (end - start).to(ACC)
    mean = tl.sum(total, 0) / count
    squares = tl.zeros((BLOCK_B,), ACC)
    for base in range(start, end, BLOCK_B):
        valid = base + offs < end
        row = tl.load(row_order_ptr + base + offs, mask=valid, other=0)
        r = tl.load(rewards_ptr + row, mask=valid, other=0.0).to(ACC)
        deviation = tl.where(valid, r - mean, 0.0)
        squares += deviation * deviation
    if UNBIASED:   # Bessel's correction (TRL, verl); a one-row group has zero variance anyway
        std = tl.sqrt(tl.sum(squares, 0) / tl.maximum(count - 1.0, 1.0))
    else:
        std = tl.sqrt(tl.sum(squares, 0) / count)
    zero_var = tl.max(high, 0) == tl.min(low, 0)
    for base in range(start, end, BLOCK_B):
        valid = base + offs < end
        row = tl.load(row_order_ptr + base + offs, mask=valid, other=0)
        r = tl.load(rewards_ptr + row, mask=valid, other=0.0).to(ACC)
        adv = r - mean
        if STD_NORMALIZE:
            adv = adv / (std + eps)
        adv = tl.where(zero_var, 0.0, adv)
        direction = _sign(adv)
        if EP_GRPO:
            direction = tl.where(zero_var, _sign(r - reward_threshold), direction)
        tl.store(seq_adv_ptr + row, adv.to(seq_adv_ptr.dtype.element_ty), mask=valid)
        tl.store(direction_ptr + row, direction.to(direction_ptr.dtype.element_ty), mask=valid)
        tl.store(zero_var_ptr + row, (tl.zeros((BLOCK_B,), tl.int32) + zero_var.to(tl.int32)) != 0, mask=valid)


def buckets_rewards(rewards: Tensor, row_order: Tensor, cell_start: Tensor, config: ERPOConfig,
                    dtype: torch.dtype):
    """A_seq [B], polarity d [B] (``dtype``) and zero_var [B] (bool); rows of group g are
    ``row_order[cell_start[g]:cell_start[g + 1]]``."""
    B, G = rewards.shape[0], cell_start.shape[0] - 1
    seq_adv = torch.empty(B, dtype=dtype, device=rewards.device)
    direction = torch.empty_like(seq_adv)
    zero_var = torch.empty(B, dtype=torch.bool, device=rewards.device)
    _buckets_rewards_kernel[(G,)](rewards, row_order, cell_start, seq_adv, direction, zero_var,
                                  config.reward_eps, config.reward_threshold,
                                  STD_NORMALIZE=config.std_normalize, UNBIASED=config.reward_std == "unbiased",
                                  EP_GRPO=config.polarity == "ep_grpo",
                                  BLOCK_B=INTERPRETER_BLOCK if interpreter_enabled() else BLOCK_ROWS,
                                  ACC=_acc_dtype(dtype))
    return seq_adv, direction, zero_var


# ----------------------------------------------------------------------------------------------
# 3. segmented mean / std / count over the masked tokens of each (cell, sub-cell)
# ----------------------------------------------------------------------------------------------
@triton.heuristics({"HAS_Y": lambda args: args["y_ptr"] is not None,
                    "HAS_SUB": lambda args: args["sub_ptr"] is not None})
@triton.jit
def _buckets_stats_kernel(x_ptr, y_ptr, mask_ptr, sub_ptr, row_order_ptr, cell_start_ptr,
                          mean_ptr, std_ptr, count_ptr,
                          T, num_sub, scale,
                          HAS_Y: tl.constexpr, HAS_SUB: tl.constexpr, SUB_PAD: tl.constexpr,
                          BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    cell = tl.program_id(0)
    start = tl.load(cell_start_ptr + cell)
    end = tl.load(cell_start_ptr + cell + 1)
    cols = tl.arange(0, BLOCK_T)
    subs = tl.arange(0, SUB_PAD)
    sums = tl.zeros((SUB_PAD,), ACC)
    counts = tl.zeros((SUB_PAD,), ACC)
    for pass_ in tl.static_range(2):            # 0: sums and counts; 1: squared deviations
        if pass_ == 1:
            mean = sums / tl.maximum(counts, 1.0)
            sums = tl.zeros((SUB_PAD,), ACC)
        for r in range(start, end):
            row_start = tl.load(row_order_ptr + r).to(tl.int64) * T
            for t0 in range(0, T, BLOCK_T):
                inb = t0 + cols < T
                ptrs = row_start + t0 + cols
                valid = inb & (tl.load(mask_ptr + ptrs, mask=inb, other=0) != 0)
                value = tl.load(x_ptr + ptrs, mask=valid, other=0.0).to(ACC)
                if HAS_Y:
                    value = value - tl.load(y_ptr + ptrs, mask=valid, other=0.0).to(ACC)
                value = scale * value
                if HAS_SUB:
                    sub = tl.load(sub_ptr + ptrs, mask=valid, other=0)
                else:
                    sub = tl.zeros((BLOCK_T,), tl.int64)
                hit = valid[:, None] & (sub[:, None] == subs[None, :])   # one-hot [BLOCK_T, SUB_PAD]
                if pass_ == 0:
                    sums += tl.sum(tl.where(hit, value[:, None], 0.0), 0)
                    counts += tl.sum(hit.to(ACC), 0)
                else:
                    deviation = value[:, None] - mean[None, :]
                    sums += tl.sum(tl.where(hit, deviation * deviation, 0.0), 0)
    out = cell.to(tl.int64) * num_sub + subs
    keep = subs < num_sub
    tl.store(mean_ptr + out, mean, mask=keep)
    tl.store(std_ptr + out, tl.sqrt(sums / tl.maximum(counts, 1.0)), mask=keep)
    tl.store(count_ptr + out, counts, mask=keep)


def buckets_stats(x: Tensor, y: Optional[Tensor], mask: Tensor, sub: Optional[Tensor], row_order: Tensor,
                  cell_start: Tensor, num_sub: int, scale: float, acc_dtype: torch.dtype):
    """mean, std, count [cells * num_sub] of ``scale * (x - y)`` (``scale * x`` without y) over the
    masked tokens of each (cell, sub-cell); sub [B, T] int64 in [0, num_sub) or None (num_sub = 1)."""
    T = mask.shape[1]
    num_cells = cell_start.shape[0] - 1
    mean = torch.empty(num_cells * num_sub, dtype=acc_dtype, device=mask.device)
    std, count = torch.empty_like(mean), torch.empty_like(mean)
    sub_pad = triton.next_power_of_2(num_sub)
    block_t = _block_t(T, max(16, MAX_SUB_TILE // sub_pad))
    _buckets_stats_kernel[(num_cells,)](x, y, mask, sub, row_order, cell_start, mean, std, count,
                                        T, num_sub, scale, SUB_PAD=sub_pad, BLOCK_T=block_t,
                                        ACC=_acc_dtype(acc_dtype))
    return mean, std, count


# ----------------------------------------------------------------------------------------------
# 4. synthesis: W, s_tilde, A
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid_gate(h, m, mu, sigma, eps, gamma):
    z = tl.where(sigma > eps, (h - mu) / (sigma + eps), 0.0)
    return tl.sigmoid(gamma * z) * m


@triton.heuristics({"HAS_GATES": lambda args: args["gates_ptr"] is not None,
                    "HAS_WEIGHTS": lambda args: args["weights_ptr"] is not None,
                    "HAS_PROGRESS": lambda args: args["old_ptr"] is not None,
                    "BUCKET_NORMALIZE": lambda args: args["sig_mean_ptr"] is not None,
                    "HAS_CAP": lambda args: args["kappa"] is not None})
@triton.jit
def _buckets_synthesis_kernel(mask_ptr, entropy_ptr, gates_ptr, weights_ptr, old_ptr, ref_ptr, bucket_ptr,
                              group_ptr, seq_adv_ptr, direction_ptr, gate_mean_ptr, gate_std_ptr,
                              sig_mean_ptr, sig_std_ptr, sig_count_ptr,
                              adv_ptr, gate_out_ptr, signal_ptr,
                              T, num_buckets,
                              eps, gamma, lam, eta, kappa,
                              GATE: tl.constexpr, SCOPE: tl.constexpr, GATE_NORMALIZE: tl.constexpr,
                              HAS_GATES: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_PROGRESS: tl.constexpr,
                              BUCKET_NORMALIZE: tl.constexpr, HAS_CAP: tl.constexpr,
                              BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * T
    cols = tl.arange(0, BLOCK_T)
    group = tl.load(group_ptr + row)
    seq_adv = tl.load(seq_adv_ptr + row).to(ACC)
    direction = tl.load(direction_ptr + row).to(ACC)
    mu = 0.0
    sigma = 0.0
    if GATE == 1:
        gate_cell = row                         # SCOPE 2: one cell per sequence
        if SCOPE == 0:
            gate_cell = group
        elif SCOPE == 1:
            gate_cell = 0
        mu = tl.load(gate_mean_ptr + gate_cell).to(ACC)
        sigma = tl.load(gate_std_ptr + gate_cell).to(ACC)
    seq_mean = 1.0
    if GATE == 1 and GATE_NORMALIZE:            # W / mean over the row's masked tokens
        gate_sum = tl.zeros((BLOCK_T,), ACC)
        n = tl.zeros((BLOCK_T,), ACC)
        for t0 in range(0, T, BLOCK_T):
            inb = t0 + cols < T
            m = (tl.load(mask_ptr + row_start + t0 + cols, mask=inb, other=0) != 0).to(ACC)
            h = tl.load(entropy_ptr + row_start + t0 + cols, mask=inb, other=0.0).to(ACC)
            gate_sum += _sigmoid_gate(h, m, mu, sigma, eps, gamma)
            n += m
        seq_mean = tl.sum(gate_sum, 0) / tl.maximum(tl.sum(n, 0), 1.0)
    for t0 in range(0, T, BLOCK_T):
        inb = t0 + cols < T
        ptrs = row_start + t0 + cols
        valid = inb & (tl.load(mask_ptr + ptrs, mask=inb, other=0) != 0)
        m = valid.to(ACC)
        if GATE == 1:
            h = tl.load(entropy_ptr + ptrs, mask=inb, other=0.0).to(ACC)
            gate = _sigmoid_gate(h, m, mu, sigma, eps, gamma)
            if GATE_NORMALIZE:
                gate = tl.where(seq_mean > eps, gate / tl.maximum(seq_mean, eps), gate)
        elif GATE == 2:
            gate = tl.load(gates_ptr + ptrs, mask=inb, other=0.0).to(ACC) * m
        else:
            gate = m
        adv = gate * seq_adv
        signal = tl.zeros((BLOCK_T,), ACC)
        if HAS_PROGRESS:
            old = tl.load(old_ptr + ptrs, mask=inb, other=0.0).to(ACC)
            raw = lam * (old - tl.load(ref_ptr + ptrs, mask=inb, other=0.0).to(ACC))
            if BUCKET_NORMALIZE:
                bucket_cell = group * num_buckets + tl.load(bucket_ptr + ptrs, mask=inb, other=0)
                s_mu = tl.load(sig_mean_ptr + bucket_cell, mask=inb, other=0.0)
                s_sigma = tl.load(sig_std_ptr + bucket_cell, mask=inb, other=0.0)
                count = tl.load(sig_count_ptr + bucket_cell, mask=inb, other=0.0)
                usable = valid & (count >= 2) & (s_sigma > eps)
                signal = tl.where(usable, (raw - s_mu) / (s_sigma + eps), 0.0)
            else:
                signal = raw * m
            progress = eta * gate * direction * signal
            if HAS_CAP:  # only where an outcome sign exists (not EP-GRPO's zero-variance fallback)
                cap = tl.abs(adv) / kappa
                progress = tl.where(seq_adv != 0, tl.maximum(tl.minimum(progress, cap), -cap), progress)
            adv = adv + progress
        adv = adv * m
        if HAS_WEIGHTS:
            adv = adv * tl.load(weights_ptr + ptrs, mask=inb, other=0.0).to(ACC)
        tl.store(adv_ptr + ptrs, adv.to(adv_ptr.dtype.element_ty), mask=inb)
        tl.store(gate_out_ptr + ptrs, gate.to(gate_out_ptr.dtype.element_ty), mask=inb)
        tl.store(signal_ptr + ptrs, signal.to(signal_ptr.dtype.element_ty), mask=inb)


def buckets_synthesis(mask, entropy, gates, token_weights, old, ref, bucket, group_index, seq_adv, direction,
                      gate_stats, signal_stats, gate_mode: int, config: ERPOConfig):
    """A, W, s_tilde [B, T] in ``entropy``'s dtype.  gate_stats: (mean, std) per gate cell (sigmoid gate) or
    Nones; signal_stats: (mean, std, count) per (group, bucket) or Nones (no bucket normalization);
    old / ref None switch the progress term off; gates [B, T] is used when gate_mode is _GATE_GIVEN."""
    B, T = mask.shape
    adv, gate, signal = (torch.empty(B, T, dtype=entropy.dtype, device=mask.device) for _ in range(3))
    _buckets_synthesis_kernel[(B,)](
        mask, entropy, gates, token_weights, old, ref, bucket, group_index,
        seq_adv, direction, *gate_stats, *signal_stats, adv, gate, signal,
        T, config.num_buckets,
        config.eps, config.gate_gamma, config.progress_lambda, config.progress_eta, config.progress_cap_kappa,
        GATE=gate_mode, SCOPE=_SCOPES[config.gate_scope], GATE_NORMALIZE=config.gate_normalize,
        BLOCK_T=_block_t(T), ACC=_acc_dtype(entropy.dtype))
    return adv, gate, signal


def _cell_rows(cell_of_row: Tensor, num_cells: int, rows_per_cell: Optional[int] = None):
    """(row_order, cell_start): the rows of cell c are row_order[cell_start[c]:cell_start[c + 1]].

    Consecutive cells of ``rows_per_cell`` rows need no sort; otherwise a stable argsort and per-cell counts
    by index_add (torch.bincount would read its maximum back from the device)."""
    device = cell_of_row.device
    if rows_per_cell is not None:
        return (torch.arange(cell_of_row.numel(), device=device),
                torch.arange(num_cells + 1, device=device) * rows_per_cell)
    row_order = torch.argsort(cell_of_row, stable=True)
    counts = torch.zeros(num_cells, dtype=torch.long, device=device).index_add_(
        0, cell_of_row, torch.ones_like(cell_of_row))
    return row_order, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def token_advantages_triton(rewards: Tensor, mask: Tensor, group_ids: Tensor, old_entropy: Tensor,
                            old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor], config: ERPOConfig,
                            token_weights: Optional[Tensor] = None, gates: Optional[Tensor] = None) -> Advantages:
    """Triton twin of :func:`erpo_kernels.advantages.token_advantages` (same arguments and results).

    rewards [B], mask [B, T], group_ids [B] (or resolved :class:`~erpo_kernels.validation.Groups`: with
    consecutive groups nothing here reads from the device), old_entropy / old_logprobs / ref_logprobs /
    token_weights / gates [B, T]. ``gate="topk"`` uses the torch gate (see the module docstring).
    """
    if old_entropy.dim() != 2 or tuple(mask.shape) != tuple(old_entropy.shape):
        raise ValueError(f"token_advantages_triton: mask {tuple(mask.shape)} and old_entropy "
                         f"{tuple(old_entropy.shape)} must both be [B, T]")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("token_weights", token_weights), ("gates", gates)):
        if x is not None and tuple(x.shape) != tuple(old_entropy.shape):
            raise ValueError(f"token_advantages_triton: {name} {tuple(x.shape)} != {tuple(old_entropy.shape)}")
    B, dtype = old_entropy.shape[0], old_entropy.dtype
    mask, entropy = mask.bool().contiguous(), old_entropy.contiguous()
    group_index, num_groups, group_size = as_groups(group_ids)
    group_rows, group_start = _cell_rows(group_index, num_groups, group_size)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    bucket = buckets_index(mask, entropy, config)
    seq_adv, direction, zero_var = buckets_rewards(rewards.contiguous(), group_rows, group_start, config, dtype)
    gate_mode, gate_stats = _GATE_NONE, (None, None)
    if gates is not None:
        gate_mode = _GATE_GIVEN
    elif config.gate == "topk" or config.gate_scope == "global":  # the torch gate (global: all-reduced stats)
        gate_mode, gates = _GATE_GIVEN, entropy_gate(entropy, mask, group_index, num_groups, config)
    elif config.gate == "sigmoid":
        gate_mode = _GATE_SIGMOID
        if config.gate_scope == "group":
            rows, start = group_rows, group_start
        else:                                   # one cell of every row, or a cell per row
            cells = 1 if config.gate_scope == "batch" else B
            rows, start = _cell_rows(torch.zeros_like(group_index), cells, B // cells)
        gate_stats = buckets_stats(entropy, None, mask, None, rows, start, 1, 1.0, acc)[:2]
    progress = config.progress_term and old_logprobs is not None and ref_logprobs is not None
    old, ref = (_contiguous(old_logprobs), _contiguous(ref_logprobs)) if progress else (None, None)
    signal_stats = (None, None, None)
    if progress and config.bucket_normalize:
        signal_stats = buckets_stats(old, ref, mask, bucket, group_rows, group_start, config.num_buckets,
                                     config.progress_lambda, acc)
    adv, gate, signal = buckets_synthesis(mask, entropy, _contiguous(gates), _contiguous(token_weights), old, ref,
                                          bucket, group_index, seq_adv, direction, gate_stats, signal_stats,
                                          gate_mode, config)
    return Advantages(adv, gate, seq_adv, bucket, signal, zero_var)
