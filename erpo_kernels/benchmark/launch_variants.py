"""Every Triton kernel launch the library makes, as data, for the offline compile gate (``offline.py``).

A :class:`Variant` is one launch: the kernel, the arguments its launcher passes (a tensor is given by its
dtype, an absent optional tensor by None, sizes and strides by their values, so Triton specializes them as
a real launch would: 1 -> constant, multiples of 16 -> aligned), the meta-parameters, and the launch options.
Block sizes, splits and launch groups come from the same ``ops.tile_config`` functions the launchers call,
with a stub :class:`~erpo_kernels.ops.tile_config.DeviceSpec` (H100, A100) in place of the GPU.

Shape: the stats/grad problem of bench/RESULTS.md, N=32768 tokens, H=4096, V=151936 (Qwen vocabulary), no
lm_head bias (Llama / Qwen have none; one bias variant per kernel shows its cost), and the ERPO default
config for the [tokens]-sized kernels (B=16 sequences of T=2048, groups of 8).  The [tokens]-sized
kernels run on fp32 statistics (what the stats pass returns), so they are compiled for fp32 only.

To add a kernel: write a builder ``(spec, dtype, precision) -> [Variant]`` and append it to ``BUILDERS``.
``uncovered_kernels()`` names every ``_..._kernel`` in ``erpo_kernels.ops`` that no builder launches; the
offline test fails on any.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from erpo_kernels.ops import tile_config
from erpo_kernels.ops.tile_config import A100, H100, DeviceSpec, TileConfig

N_TOKENS, HIDDEN, VOCAB = 32768, 4096, 151936
BATCH, SEQ_LEN, GROUP = 16, 2048, 8
DEVICES: Dict[str, DeviceSpec] = {"H100": H100, "A100": A100}
# dtype name -> (operand dtype, dot precision): fp32 twice, as torch's TF32 switch decides at run time
DTYPES: Dict[str, Tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
    "fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"),
}
F32, I64 = torch.float32, torch.int64


@dataclass(frozen=True)
class Variant:
    label: str                     # kernel family and role, e.g. "linear_stats_fwd"
    kernel: str                    # "module:attribute" of the (possibly heuristics-wrapped) kernel
    what: str                      # the launch's flags in words, e.g. "no bias"
    device: str                    # a DEVICES key
    dtype: str                     # a DTYPES key, or "fp32" for fp32-only kernels
    args: Mapping[str, Any]        # runtime arguments by name (torch.dtype for a tensor)
    meta: Mapping[str, Any]        # meta-parameters the launcher passes (heuristics add theirs)
    num_warps: int = 4             # Triton's launch defaults where the launcher passes none
    num_stages: int = 3
    default: bool = True           # the launcher's fixed default config (ERPO_AUTOTUNE candidates: False)
    gates: Tuple[str, ...] = field(default=())   # extra assertions: "wgmma" (a warp-group MMA expected)

    @property
    def config(self) -> str:
        blocks = "x".join(str(self.meta[b]) for b in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_S", "BLOCK_T",
                                                       "BLOCK_B", "BLOCK") if b in self.meta)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


def _meta(cfg: TileConfig, blocks: Sequence[str]) -> Tuple[dict, dict]:
    meta = cfg.meta(blocks)
    return {k: v for k, v in meta.items() if k.startswith("BLOCK")}, dict(num_warps=meta["num_warps"],
                                                                         num_stages=meta["num_stages"])


def linear_stats(spec: DeviceSpec, dev: str, name: str) -> List[Variant]:
    dtype, precision = DTYPES[name]
    cfg, plan = tile_config.launch_plan("linear_stats_fwd", dtype, precision, spec, N_TOKENS, VOCAB, HIDDEN)
    blocks, launch = _meta(cfg, ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    out = []
    for bias in (None, dtype):
        args = dict(hidden_ptr=dtype, weight_ptr=dtype, bias_ptr=bias, targets_ptr=I64, part_max_ptr=F32,
                    part_sumexp_ptr=F32, part_sumzexp_ptr=F32, target_logit_ptr=F32,
                    N=N_TOKENS, V=VOCAB, H=HIDDEN, split_cols=plan.split_len, num_splits=plan.splits,
                    group_size=plan.group_size, stride_hn=HIDDEN, stride_hh=1, stride_wv=HIDDEN, stride_wh=1,
                    temperature=1.0, ignore_index=-100)
        out.append(Variant("linear_stats_fwd", "erpo_kernels.ops.linear_stats:_linear_stats_fwd_kernel",
                           f"{'bias' if bias else 'no bias'}; {plan.splits} splits, groups of {plan.group_size}",
                           dev, name, args, dict(blocks, DOT_PRECISION=precision, DOT_UPCAST=False), **launch,
                           gates=("wgmma",) if spec.arch == "sm90" and name == "bf16" and bias is None else ()))
    if name == "bf16":  # the merge of the stats partials (and of logits_stats' single split)
        merge = tile_config.default_config("linear_stats_merge", spec=spec)
        for splits in (plan.splits, 1):
            args = dict(part_max_ptr=F32, part_sumexp_ptr=F32, part_sumzexp_ptr=F32, target_logit_ptr=F32,
                        targets_ptr=I64, logprobs_ptr=F32, entropy_ptr=F32, lse_ptr=F32,
                        N=N_TOKENS, num_splits=splits, ignore_index=-100)
            meta = dict(BLOCK_N=tile_config.merge_block_n(splits, spec), BLOCK_S=max(tile_config.next_pow2(splits), 2))
            out.append(Variant("linear_stats_merge", "erpo_kernels.ops.linear_stats:_linear_stats_merge_kernel",
                               f"{splits} split(s)", dev, "fp32", args, meta, num_warps=merge.num_warps))
    return out


def linear_grad_fused(spec: DeviceSpec, dev: str, name: str) -> List[Variant]:
    """Token-major with atomics (the fused default), and the two passes of ``deterministic=True``."""
    dtype, precision = DTYPES[name]
    out = []
    for role, vocab_major, grads, splits in (("token-major, atomics", False, "hwb", None),
                                             ("deterministic: grad_hidden pass", False, "h", 1),
                                             ("deterministic: grad_weight pass (vocab-major)", True, "w", 1)):
        outer, inner = (VOCAB, N_TOKENS) if vocab_major else (N_TOKENS, VOCAB)
        cfg, plan = tile_config.launch_plan("linear_grad_fused", dtype, precision, spec, outer, inner, HIDDEN,
                                            vocab_major, splits)
        blocks, launch = _meta(cfg, ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
        args = dict(hidden_ptr=dtype, weight_ptr=dtype, bias_ptr=None, targets_ptr=I64, lse_ptr=F32,
                    entropy_ptr=F32, grad_logprobs_ptr=F32, grad_entropy_ptr=F32,
                    grad_hidden_ptr=F32 if "h" in grads else None, grad_weight_ptr=F32 if "w" in grads else None,
                    grad_bias_ptr=None, N=N_TOKENS, V=VOCAB, H=HIDDEN, split_len=plan.split_len,
                    num_splits=plan.splits, group_size=plan.group_size,
                    stride_hn=HIDDEN, stride_hh=1, stride_wv=HIDDEN, stride_wh=1, temperature=1.0, ignore_index=-100)
        meta = dict(blocks, VOCAB_MAJOR=vocab_major, HIDDEN_ATOMIC=vocab_major or plan.splits > 1,
                    WEIGHT_ATOMIC=not vocab_major or plan.splits > 1, DOT_PRECISION=precision, DOT_UPCAST=False)
        out.append(Variant("linear_grad_fused", "erpo_kernels.ops.linear_grad:_linear_grad_fused_kernel",
                           f"{role}; {plan.splits} split(s), groups of {plan.group_size}", dev, name, args, meta,
                           **launch, gates=("wgmma",) if spec.arch == "sm90" and name == "bf16" else ()))
    return out


def chunk_buffers(spec: DeviceSpec, dev: str, name: str) -> List[Variant]:
    """Design (a)'s kernels over an fp32 [chunk, V] logits buffer (the chunk of ``resolve_chunk_size`` on an
    80 GB device): the stats of the block, and the dz epilogue writing dz in the GEMM dtype (bf16: its own
    buffer; fp32, and fp16 whose dz stays fp32: over the logits), with and without the fused bias grad."""
    if name not in ("bf16", "fp32"):
        return []
    from erpo_kernels.ops.chunk_gemms import dz_dtype

    out = []
    chunk = 4096
    dz = dz_dtype(DTYPES[name][0])
    for bias in (None, DTYPES[name][0]):
        what = f"bias ({name})" if bias else "no bias"
        cfg = tile_config.default_config("logits_stats", spec=spec)
        blocks, launch = _meta(cfg, ("BLOCK_N", "BLOCK_V"))
        args = dict(logits_ptr=F32, bias_ptr=bias, targets_ptr=I64, logprobs_ptr=F32, entropy_ptr=F32,
                    lse_ptr=F32, n_rows=chunk, V=VOCAB, row0=chunk, stride_ln=VOCAB, temperature=1.0,
                    ignore_index=-100)
        if bias is not None or name == "bf16":   # without a bias the kernel is the same for every dtype
            out.append(Variant("logits_stats", "erpo_kernels.ops.linear_grad_chunked:_chunk_stats_kernel", what,
                               dev, name, args, blocks, **launch))
        cfg = tile_config.default_config("dz_epilogue", spec=spec)
        blocks, launch = _meta(cfg, ("BLOCK_N", "BLOCK_V"))
        for grads in (("lp", "H"), ("lp",)):
            args = dict(logits_ptr=F32, dz_ptr=dz, bias_ptr=bias, targets_ptr=I64, lse_ptr=F32, entropy_ptr=F32,
                        grad_logprobs_ptr=F32, grad_entropy_ptr=F32 if "H" in grads else None,
                        bias_partial_ptr=F32 if bias else None, n_rows=chunk, V=VOCAB, row0=chunk,
                        stride_ln=VOCAB, stride_dn=VOCAB, temperature=1.0, ignore_index=-100)
            out.append(Variant("dz_epilogue", "erpo_kernels.ops.linear_grad_chunked:_dz_epilogue_kernel",
                               f"{what}; dz {str(dz).split('.')[-1]}; grads of {' and '.join(grads)}", dev, name,
                               args, blocks, **launch))
    return out


def advantages(spec: DeviceSpec, dev: str, name: str) -> List[Variant]:
    """The [tokens]-sized kernels (buckets.py, surrogate.py) for the default ERPO / EP-GRPO configs."""
    if name != "fp32":
        return []
    from erpo_kernels.ops import buckets, surrogate
    import triton.language as tl

    acc = dict(ACC=tl.float32)
    mod = "erpo_kernels.ops.buckets:"
    out = []
    for cum in (False, True):
        args = dict(mask_ptr=torch.bool, entropy_ptr=F32, bucket_ptr=I64, T=SEQ_LEN, num_buckets=10, eps=1e-6)
        out.append(Variant("buckets_index", mod + "_buckets_index_kernel",
                           "cumulative-entropy progress" if cum else "position progress", dev, "fp32", args,
                           dict(CUM_ENTROPY=cum, BLOCK_T=buckets._block_t(SEQ_LEN), **acc)))
    args = dict(rewards_ptr=F32, row_order_ptr=I64, cell_start_ptr=I64, seq_adv_ptr=F32, direction_ptr=F32,
                zero_var_ptr=torch.bool, eps=1e-6, reward_threshold=0.5)
    out.append(Variant("buckets_rewards", mod + "_buckets_rewards_kernel", "std-normalized", dev, "fp32", args,
                       dict(STD_NORMALIZE=True, UNBIASED=False, EP_GRPO=False, BLOCK_B=buckets.BLOCK_ROWS, **acc)))
    for what, has_y, num_sub in (("gate statistics (entropy)", False, 1),
                                 ("progress statistics per (group, bucket)", True, 10)):
        sub_pad = tile_config.next_pow2(num_sub)
        args = dict(x_ptr=F32, y_ptr=F32 if has_y else None, mask_ptr=torch.bool, sub_ptr=I64 if has_y else None,
                    row_order_ptr=I64, cell_start_ptr=I64, mean_ptr=F32, std_ptr=F32, count_ptr=F32,
                    T=SEQ_LEN, num_sub=num_sub, scale=0.1 if has_y else 1.0)
        out.append(Variant("buckets_stats", mod + "_buckets_stats_kernel", what, dev, "fp32", args,
                           dict(SUB_PAD=sub_pad, BLOCK_T=buckets._block_t(SEQ_LEN, max(16, buckets.MAX_SUB_TILE
                                                                                      // sub_pad)), **acc)))
    args = dict(mask_ptr=torch.bool, entropy_ptr=F32, gates_ptr=None, weights_ptr=None, old_ptr=F32, ref_ptr=F32,
                bucket_ptr=I64, group_ptr=I64, seq_adv_ptr=F32, direction_ptr=F32, gate_mean_ptr=F32,
                gate_std_ptr=F32, sig_mean_ptr=F32, sig_std_ptr=F32, sig_count_ptr=F32, adv_ptr=F32,
                gate_out_ptr=F32, signal_ptr=F32, T=SEQ_LEN, num_buckets=10, eps=1e-6, gamma=5.0, lam=0.1,
                eta=0.2, kappa=None)
    out.append(Variant("buckets_synthesis", mod + "_buckets_synthesis_kernel", "sigmoid gate, progress term", dev,
                       "fp32", args, dict(GATE=1, SCOPE=0, GATE_NORMALIZE=False, BLOCK_T=buckets._block_t(SEQ_LEN),
                                          **acc)))
    mod = "erpo_kernels.ops.surrogate:"
    for what, ref, dual, kl, ent in (("ERPO defaults", None, None, 0.0, 0.0),
                                     ("dual clip, KL, entropy bonus", F32, 3.0, 0.04, 0.01)):
        for sweep in (False, True):   # the two-pass surrogate, and the one-sweep's per-chunk coefficients
            args = dict(lp_ptr=F32, entropy_ptr=F32, adv_ptr=F32, old_ptr=F32, ref_ptr=ref,
                        valid_ptr=torch.bool if sweep else None, weights_ptr=F32 if sweep else None, loss_ptr=F32,
                        coef_ptr=F32, grad_entropy_ptr=F32 if sweep and ent else None, ratio_ptr=F32,
                        clip_low_ptr=torch.bool, clip_high_ptr=torch.bool, dual_ptr=torch.bool,
                        N=4096 if sweep else N_TOKENS, row0=4096 if sweep else 0, ratio_low=0.8, ratio_high=1.28,
                        dual_clip_c=dual, kl_beta=kl, entropy_coef=ent)
            out.append(Variant("surrogate_forward", mod + "_surrogate_forward_kernel",
                               what + ("; sweep coefficients" if sweep else ""), dev, "fp32", args,
                               dict(BLOCK=surrogate.GPU_BLOCK, **acc)))
        args = dict(grad_loss_ptr=F32, coef_ptr=F32, grad_lp_ptr=F32, grad_entropy_ptr=F32 if ent else None,
                    N=N_TOKENS, entropy_coef=ent)
        out.append(Variant("surrogate_backward", mod + "_surrogate_backward_kernel", what, dev, "fp32", args,
                           dict(BLOCK=surrogate.GPU_BLOCK)))
    return out


BUILDERS: List[Callable[[DeviceSpec, str, str], List[Variant]]] = [
    linear_stats, linear_grad_fused, chunk_buffers, advantages]


def candidates(spec: DeviceSpec, dev: str, name: str) -> List[Variant]:
    """The ERPO_AUTOTUNE=1 candidates of the two GEMM-like kernels that fit the device (not the default)."""
    dtype, precision = DTYPES[name]
    cls = tile_config.operand_class(dtype, precision)
    out = []
    for base in linear_stats(spec, dev, name)[:1] + linear_grad_fused(spec, dev, name)[:1]:
        kernel = base.label
        for cfg in tile_config._CANDIDATES[kernel][spec.arch][cls]:
            if cfg == tile_config.default_config(kernel, dtype, precision, spec) \
                    or cfg.smem_bytes(dtype.itemsize) > spec.smem_per_block:
                continue
            blocks, launch = _meta(cfg, ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
            out.append(Variant(base.label, base.kernel, base.what.split(";")[0] + "; autotune candidate", dev, name,
                               base.args, {**base.meta, **blocks}, **launch, default=False))
    return out


def all_variants(devices: Sequence[str] = tuple(DEVICES), dtypes: Sequence[str] = tuple(DTYPES),
                 with_candidates: bool = False) -> List[Variant]:
    out = []
    for dev in devices:
        for name in dtypes:
            for build in BUILDERS + ([candidates] if with_candidates else []):
                out.extend(build(DEVICES[dev], dev, name))
    return out


def library_kernels() -> List[str]:
    """``module:attribute`` of every ``_..._kernel`` defined in ``erpo_kernels.ops``."""
    import erpo_kernels.ops as ops

    found = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"erpo_kernels.ops.{info.name}")
        for attr, obj in vars(module).items():
            inner = obj
            while hasattr(inner, "fn"):
                inner = inner.fn
            defined_here = getattr(inner, "__module__", "") == module.__name__
            if attr.startswith("_") and attr.endswith("_kernel") and defined_here:
                found.append(f"{module.__name__}:{attr}")
    return sorted(found)


def uncovered_kernels(variants: Sequence[Variant]) -> List[str]:
    launched = {v.kernel for v in variants}
    return [k for k in library_kernels() if k not in launched]
