"""The issue-9 goals judged by the traffic model, and the estimate tables of bench/README.md.

    python -m erpo_kernels.benchmark.traffic_table            # N in {8192, 32768, 131072}, H=4096, V=151936, bf16
    python -m erpo_kernels.benchmark.traffic_table --gpus h100 --tokens 32768 --dtype fp32

Goals (until a GPU measures them): the stats pass within 1.10x one GEMM; the training sweep with old entropy
given within 1.10x its 3-GEMM floor; at most 2 GiB of extra memory at N=32768; N=131072 fits in the GPU's
memory.  Every figure printed is an estimate.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from erpo_kernels.benchmark.roofline import GPUS, PassEstimate
from erpo_kernels.benchmark.traffic import GIB, estimate_passes

GOAL_RATIO = 1.10
GOAL_EXTRA_BYTES = 2 * GIB
GOAL_EXTRA_TOKENS = 32768
GOAL_FIT_TOKENS = 131072
TRAINING_PASSES = ("sweep", "train-a", "train-b")
PASS_LABELS = {
    "floor-1": "1 GEMM (floor of stats)",
    "stats": "stats pass (fused Triton kernel + merge)",
    "floor-3": "3 GEMMs (floor of the sweep)",
    "sweep": "training sweep, old entropy given (design (a) flow + stats read)",
    "floor-4": "4 GEMMs (floor with a stats pass first)",
    "train-a": "stats pass + design (a) backward (chunked, vendor GEMMs)",
    "train-b": "stats pass + design (b) backward (fused Triton tiles)",
}


@dataclass(frozen=True)
class Verdict:
    goal: str
    value: str
    met: bool


def goal_verdicts(passes: Dict[str, PassEstimate], tokens: int) -> List[Verdict]:
    """The goals that apply at ``tokens``, each with the estimate it is judged by."""
    verdicts = []
    for name, floor in (("stats", "1 GEMM"), ("sweep", "3 GEMMs")):
        ratio = passes[name].ratio_to_floor
        verdicts.append(Verdict(f"{name} <= {GOAL_RATIO:.2f}x {floor}", f"{ratio:.3f}x", ratio <= GOAL_RATIO))
    if tokens == GOAL_EXTRA_TOKENS:
        for name in ("stats",) + TRAINING_PASSES:
            extra = passes[name].extra_bytes
            verdicts.append(Verdict(f"{name}: extra <= 2 GiB at N={tokens}", f"{extra / GIB:.2f} GiB",
                                    extra <= GOAL_EXTRA_BYTES))
    if tokens == GOAL_FIT_TOKENS:
        for name in TRAINING_PASSES:
            p = passes[name]
            need = (p.io_bytes + p.extra_bytes) / 1e9
            verdicts.append(Verdict(f"{name}: fits at N={tokens}", f"{need:.1f} of {p.gpu.memory_gb:g} GB", p.fits))
    return verdicts


def estimate_table(gpu: str, token_counts: Sequence[int], hidden: int, vocab: int, dtype: str) -> str:
    """Markdown: one line per pass, est. ms (x its floor) per N, the bound and the extra memory."""
    runs = {n: estimate_passes(n, hidden, vocab, dtype, gpu) for n in token_counts}
    middle = token_counts[len(token_counts) // 2]
    head = ["pass"] + [f"N={n}: est. ms (x floor)" for n in token_counts] + [f"bound (N={middle})",
                                                                          "extra GiB (per N)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(token_counts) + "---|---:|"]
    for name, label in PASS_LABELS.items():
        cells = [f"{runs[n][name].ms:,.1f} ({runs[n][name].ratio_to_floor:.2f}x)" for n in token_counts]
        extras = " / ".join(f"{runs[n][name].extra_bytes / GIB:.2f}" for n in token_counts)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {runs[middle][name].bound} | {extras} |")
    return "\n".join(lines) + "\n"


def goals_table(gpus: Sequence[str], token_counts: Sequence[int], hidden: int, vocab: int, dtype: str) -> str:
    """Markdown: every goal that applies, per GPU: the estimate and whether it meets the goal."""
    rows: Dict[str, Dict[str, Verdict]] = {}
    for gpu in gpus:
        for n in token_counts:
            for verdict in goal_verdicts(estimate_passes(n, hidden, vocab, dtype, gpu), n):
                key = verdict.goal if "N=" in verdict.goal else f"{verdict.goal} (N={n})"
                rows.setdefault(key, {})[gpu] = verdict
    lines = ["| goal (estimates) | " + " | ".join(GPUS[g].name for g in gpus) + " |",
             "|---|" + "---|" * len(gpus)]
    kinds = ("stats <=", "sweep <=", "extra", "fits")   # time goals first, then memory
    for goal, by_gpu in sorted(rows.items(), key=lambda item: next(i for i, k in enumerate(kinds) if k in item[0])):
        cells = [f"{v.value} {'met' if v.met else '**not met**'}" for v in (by_gpu[g] for g in gpus)]
        lines.append(f"| {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="h100,h200,a100", help="comma-separated keys of roofline.GPUS")
    parser.add_argument("--tokens", default="8192,32768,131072", help="comma-separated N")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    token_counts = [int(n) for n in args.tokens.split(",") if n.strip()]
    unknown = [g for g in gpus if g not in GPUS]
    if unknown:
        parser.error(f"unknown GPU(s) {unknown}; known: {sorted(GPUS)}")
    out = [f"Estimates (traffic model), H={args.hidden}, V={args.vocab}, {args.dtype}.\n"]
    for gpu in gpus:
        out += [f"\n{GPUS[gpu].name}:\n\n", estimate_table(gpu, token_counts, args.hidden, args.vocab, args.dtype)]
    out += ["\nGoals:\n\n", goals_table(gpus, token_counts, args.hidden, args.vocab, args.dtype)]
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
