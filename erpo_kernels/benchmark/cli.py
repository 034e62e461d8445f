"""``erpo-bench``: time and memory of every installed contender, as ratios to the GEMM floor.

    erpo-bench                                      # preset "gpu" on CUDA, "cpu-small" otherwise
    erpo-bench --preset cpu-small --out bench-out   # laptop CPU, a minute or two
    erpo-bench --preset gpu --dtypes bf16 --contenders erpo-triton,erpo-chunked,pytorch,liger,cce,floor
    python -m erpo_kernels.benchmark.cli --preset tiny --repeats 2   # the CI smoke run, seconds
    erpo-bench --preset rl-batch --padding 0.4 --zero-var 0.4        # a real RL batch vs its dense floor
    erpo-bench --preset qwen2.5-0.5b --threads 2 --repeats 3           # a real lm_head: N=1024, H=896, V=151936
    erpo-bench --shape 4096,896,151936 --contenders erpo-native,pytorch,floor   # any N,H,V (or BxT,H,V)

Writes the markdown table to stdout and, under ``--out``: results.md, results.json, results.csv and
bench.png (time and memory vs N).  A progress bar goes to stderr.  Failures (OOM, errors, failed
checks) are rows, never an exit: the exit status is 0 unless the arguments are wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from erpo_kernels.benchmark import common, report, roofline
from erpo_kernels.benchmark.contenders import Contender, all_contenders
from erpo_kernels.benchmark.runner import RunSettings, add_estimates, run_benchmark, select


def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erpo-bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default=None,
                        help="shape preset, or a model's lm_head at N=1024: " + ", ".join(common.MODELS) +
                             " (default: gpu on CUDA, cpu-small otherwise)")
    parser.add_argument("--shape", action="append", default=None, metavar="N,H,V",
                        help="a shape to run instead of the preset's: N,H,V or BxT,H,V (repeatable)")
    parser.add_argument("--contenders", type=_csv, default=None,
                        help="comma-separated names (default: every one installed; see --list)")
    parser.add_argument("--dtypes", type=_csv, default=["bf16", "fp32"], help="comma-separated: bf16,fp32")
    parser.add_argument("--pass", dest="pass_name", choices=["train", "stats", "both"], default="both",
                        help="train: forward+backward of the loss; stats: the no-grad per-token pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gpu-model", choices=sorted(roofline.GPUS), default="h100",
                        help="GPU of the traffic-model estimate when the device is not one it knows (default h100)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for md/json/csv/png")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check (not advised)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed cases to stderr")
    parser.add_argument("--padding", type=float, default=None,
                        help="RL batch: share of padding slots (default 0.4 with --preset rl-batch)")
    parser.add_argument("--zero-var", dest="zero_var", type=float, default=None,
                        help="RL batch: share of zero-variance groups (default 0.4 with --preset rl-batch)")
    parser.add_argument("--list", action="store_true", help="list contenders and whether they run here, then exit")
    return parser


def main(argv: Optional[Sequence[str]] = None, contenders: Optional[List[Contender]] = None) -> int:
    """Entry point; ``contenders`` replaces the built-in registry (tests inject their own)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(parser, args, argv, contenders)
    finally:
        torch.set_num_threads(threads)   # a caller's process (a test session) keeps its own setting


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Optional[Sequence[str]],
         contenders: Optional[List[Contender]]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    registry = contenders if contenders is not None else all_contenders()
    if args.list:
        for c in registry:
            print(f"{c.name:14s} {c.unavailable(device) or 'available':60s} {c.note}")
        return 0
    try:
        chosen = select(registry, args.contenders)
    except ValueError as error:
        parser.error(str(error))
    bad_dtypes = [d for d in args.dtypes if d not in common.DTYPES]
    if bad_dtypes:
        parser.error(f"--dtypes: unknown {bad_dtypes}; choose from {sorted(common.DTYPES)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu-small")
    try:
        shapes = [common.parse_shape(text) for text in args.shape] if args.shape else common.PRESETS[preset]
    except ValueError as error:
        parser.error(str(error))
    if args.shape and not args.preset:
        preset = "custom"
    passes = list(common.PASSES) if args.pass_name == "both" else [args.pass_name]
    padding, zero_var = common.RL_BATCH_DEFAULTS.get(preset, (None, None))
    padding = args.padding if args.padding is not None else padding
    zero_var = args.zero_var if args.zero_var is not None else zero_var
    if (padding is None) != (zero_var is None):
        padding, zero_var = padding or 0.0, zero_var or 0.0
    settings = RunSettings(shapes, args.dtypes, passes, chosen, device, args.repeats, args.warmup,
                           check=not args.no_check, progress=not args.no_progress, verbose=args.verbose,
                           padding=padding, zero_var=zero_var)
    result = run_benchmark(settings)
    device_gpu = roofline.known_gpu(common.device_name(device)) if device.type == "cuda" else None
    estimate_gpu = device_gpu or args.gpu_model
    add_estimates(result.rows, estimate_gpu)

    meta = dict(common.environment(device), preset=preset, repeats=args.repeats, warmup=args.warmup,
                shapes=[shape.label for shape in shapes],
                padding=padding, zero_var=zero_var,
                check_shape=common.CHECK_SHAPE.label, argv=list(argv) if argv is not None else sys.argv[1:],
                estimate_gpu=roofline.GPUS[estimate_gpu].name,
                estimate_basis="this device" if device_gpu else "--gpu-model: not this device")
    table = report.markdown_table(result.rows, meta, result.unavailable)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    report.write_json(args.out / "results.json", report.to_json(result.rows, meta, result.unavailable,
                                                                result.checks))
    report.write_csv(args.out / "results.csv", result.rows)
    report.plot(result.rows, args.out / "bench.png", title=f"erpo-bench {preset}: {meta['device']}")
    sys.stdout.write(table)
    sys.stderr.write(f"wrote {args.out}/results.md, results.json, results.csv, bench.png\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
