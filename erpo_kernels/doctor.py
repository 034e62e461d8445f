"""``erpo-doctor``: are the kernels right, and how fast, on this machine?  About a minute on a GPU.

    erpo-doctor                                   # full size on CUDA, tiny on the CPU
    erpo-doctor --size small --backends triton,chunked --dtypes bf16 --json doctor.json
    TRITON_INTERPRET=1 erpo-doctor --size tiny    # the CPU, Triton kernels under the interpreter (CI)

1. The environment: device, driver, torch / CUDA / Triton versions.
2. Correctness: every backend that runs here ("torch", "chunked", "triton", "native"; one that cannot
   says why) in fp32 and bf16 against the fp64 oracle (``reference.py``) fed the same rounded inputs:
   ``token_stats`` (logprobs, entropy, lse) and ``erpo_loss`` (loss, grad of hidden and weight) on the
   one-sweep path (old entropy given) and the two-pass path (no old entropy).  The inputs have odd
   sizes, masked tokens, ignore_index targets, a zero-variance group and old/ref drift that clips.
3. Speed: the default backend at one realistic shape, training pass and stats pass, median time
   against the GEMM floor (3 GEMMs / 1 GEMM of 2·N·H·V) timed the same way.  Informational only.

Exit status: 0 when every check passes; 1 on any mismatch or backend error; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from erpo_kernels import ERPOConfig, __version__, erpo_loss, reference, token_stats
from erpo_kernels.backends import get_backend, resolve_backend_name
from erpo_kernels.benchmark import common
from erpo_kernels.benchmark.common import BenchShape
from erpo_kernels.benchmark.contenders import all_contenders, make_inputs
from erpo_kernels.benchmark.runner import classify_error
from erpo_kernels.ops.tile_config import interpreter_enabled

Tensor = torch.Tensor
BACKENDS = ("torch", "chunked", "triton", "native")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = {"stats": ("logprobs", "entropy", "lse"),
            "one-sweep": ("loss", "grad_hidden", "grad_weight"),   # old_entropy given
            "two-pass": ("loss", "grad_hidden", "grad_weight")}    # old_entropy None
FP32_TOLERANCE = 1e-5
# bf16 (flash-attention's rule): error <= 2 x plain torch's bf16 error + this, both against fp64
BF16_ATOL = 1e-3
GOAL_RATIO = 1.10
GROUP_SIZE = 4


@dataclass(frozen=True)
class Size:
    """Check shape (B, T, H, V) and token chunk (a ragged last chunk), and the timing shapes."""
    check: Tuple[int, int, int, int]
    chunk: int
    timing_cuda: BenchShape
    timing_cpu: BenchShape


SIZES: Dict[str, Size] = {
    # N = 84, H = 40, V = 203: no tile multiple anywhere; seconds under the Triton interpreter
    "tiny": Size((12, 7, 40, 203), 32, BenchShape(8, 32, 64, 2048), BenchShape(8, 32, 64, 2048)),
    "small": Size((16, 19, 96, 1003), 128, BenchShape(8, 512, 2048, 32000), BenchShape(8, 128, 128, 8192)),
    # full: a Qwen-sized lm_head on CUDA; on the CPU what 2 cores time in a minute
    "full": Size((16, 19, 96, 1003), 128, BenchShape(8, 1024, 4096, 151936), BenchShape(8, 256, 256, 32000)),
}


@dataclass
class CheckInputs:
    """hidden [B, T, H] / weight [V, H] in the checked dtype (every path reads these rounded values);
    targets / mask [B, T]; rewards [B] and old/ref log-probs and old entropy [B, T] in fp32, as trainers pass them."""
    hidden: Tensor
    weight: Tensor
    targets: Tensor
    mask: Tensor
    rewards: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    old_entropy: Tensor
    config: ERPOConfig

    @property
    def group_ids(self) -> Tensor:
        return torch.arange(self.rewards.numel(), device=self.rewards.device) // GROUP_SIZE


def make_check_inputs(size: Size, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CheckInputs:
    B, T, H, V = size.check
    config = ERPOConfig(mode="erpo", num_buckets=3, kl_beta=0.02, entropy_coef=0.01, chunk_size=size.chunk)
    gen = torch.Generator().manual_seed(seed)   # drawn on the CPU: the same inputs on every device
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * (2.0 / H ** 0.5)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets.view(-1)[::9] = config.ignore_index
    prompt = torch.randint(0, 3, (B, 1), generator=gen)
    length = torch.randint(max(1, T // 2), T + 1, (B, 1), generator=gen)
    position = torch.arange(T)
    mask = (position >= prompt) & (position < prompt + length)
    rewards = torch.randint(0, 2, (B,), generator=gen).float()
    rewards[:GROUP_SIZE] = 1.0                                  # group 0: zero variance, A_seq = 0
    rewards[GROUP_SIZE], rewards[GROUP_SIZE + 1] = 1.0, 0.0     # group 1: surely not
    with torch.no_grad():
        logprobs, entropy, _ = reference.token_stats(hidden.double(), weight.double(), None, targets)
    # log-ratios lp - lp_old at least 0.14 from the clip edges log(0.8), log(1.28): half the tokens are
    # clipped, and no rounding error of a correct bf16 kernel moves a token across an edge
    drift = torch.tensor([-0.6, -0.08, 0.08, 0.6], dtype=torch.float64)[torch.randint(0, 4, (B, T), generator=gen)]
    old = torch.where(logprobs - drift > 0, logprobs - drift.abs(), logprobs - drift)   # log-probs stay <= 0
    ref = old - 0.5 * torch.rand(B, T, generator=gen, dtype=torch.float64)   # progress term and KL live
    old_entropy = entropy * torch.exp(0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64))
    side = lambda x: x.to(device=device, dtype=torch.float32)  # noqa: E731
    return CheckInputs(hidden.to(device), weight.to(device), targets.to(device), mask.to(device), side(rewards),
                       side(old), side(ref), side(old_entropy), config)


# ----------------------------------------------------------------------------------------------
# three ways to compute every checked quantity: a backend, the fp64 oracle, plain torch in the dtype
# ----------------------------------------------------------------------------------------------
def _run_section(section: str, inp: CheckInputs, leaf_dtype: torch.dtype, stats_fn, loss_fn) -> Dict[str, Tensor]:
    hidden = inp.hidden.detach().to(leaf_dtype).requires_grad_()
    weight = inp.weight.detach().to(leaf_dtype).requires_grad_()
    if section == "stats":
        with torch.no_grad():
            return dict(zip(SECTIONS["stats"], stats_fn(hidden, weight)))
    loss = loss_fn(hidden, weight, inp.old_entropy if section == "one-sweep" else None)
    loss.backward()
    return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def backend_section(backend: str, section: str, inp: CheckInputs) -> Dict[str, Tensor]:
    """The library's public API on ``backend``."""
    def stats_fn(h, w):
        return tuple(token_stats(h, w, inp.targets, backend=backend, chunk_size=inp.config.chunk_size))

    def loss_fn(h, w, old_entropy):
        return erpo_loss(h, w, inp.targets, inp.mask, inp.rewards, group_size=GROUP_SIZE,
                         old_logprobs=inp.old_logprobs, ref_logprobs=inp.ref_logprobs, old_entropy=old_entropy,
                         config=inp.config, backend=backend).loss
    return _run_section(section, inp, inp.hidden.dtype, stats_fn, loss_fn)


def _reference_section(section: str, inp: CheckInputs, leaf_dtype: torch.dtype, operands) -> Dict[str, Tensor]:
    """reference.token_stats / reference.erpo_loss on ``operands(h, w)``: (hidden, weight)-like."""
    def stats_fn(h, w):
        return reference.token_stats(*operands(h, w), None, inp.targets)

    def loss_fn(h, w, old_entropy):
        return reference.erpo_loss(*operands(h, w), inp.targets, inp.mask, inp.rewards, inp.group_ids,
                                   inp.old_logprobs, inp.ref_logprobs, old_entropy, inp.config)[0]
    return _run_section(section, inp, leaf_dtype, stats_fn, loss_fn)


def oracle_section(section: str, inp: CheckInputs) -> Dict[str, Tensor]:
    """fp64 through full logits, from the rounded inputs."""
    return _reference_section(section, inp, torch.float64, lambda h, w: (h, w))


def plain_torch_section(section: str, inp: CheckInputs) -> Dict[str, Tensor]:
    """What a trainer computes: logits from a matmul in the inputs' dtype, upcast to fp32, then
    log-softmax / entropy / loss in fp32 (the reference's code, given those logits as hidden states and
    an identity weight: exact, each output is one logit times 1); grads back through that matmul."""
    eye = torch.eye(inp.weight.shape[0], dtype=torch.float32, device=inp.weight.device)
    return _reference_section(section, inp, inp.hidden.dtype, lambda h, w: ((h @ w.t()).float(), eye))


def max_error(got: Optional[Tensor], want: Tensor, quantity: str) -> float:
    """max |got - want| / max |want|; the loss (a mean of signed terms, possibly ~0) / max(|want|, 1)."""
    if got is None or got.shape != want.shape:
        return math.inf
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    scale = float(want.abs().max()) if want.numel() else 1.0
    scale = max(scale, 1.0) if quantity == "loss" else max(scale, 1e-30)
    return float((got - want).abs().max()) / scale


@dataclass
class CheckLine:
    backend: str
    dtype: str
    quantity: str               # "<section>.<name>", or "<section>" for an ERROR
    error: float = math.nan
    tolerance: float = math.nan
    status: str = "PASS"        # PASS | FAIL | ERROR
    detail: str = ""

    def to_dict(self) -> Dict[str, object]:
        """For JSON: NaN / inf (an ERROR has no error value) as null, which strict readers accept."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        head = f"  {self.backend:8s} {self.dtype:5s} {self.quantity:22s}"
        if self.status == "ERROR":
            return f"{head} ERROR  {self.detail}"
        return f"{head} max err {self.error:9.2e}  tol {self.tolerance:9.2e}  {self.status}"


def check_backend(backend: str, dtype_name: str, inp: CheckInputs, expected, baseline, progress) -> List[CheckLine]:
    """One line per (section, quantity); a section that raises is one ERROR line."""
    lines = []
    for section, quantities in SECTIONS.items():
        progress.step(f"{backend} {dtype_name} {section}")
        try:
            got = backend_section(backend, section, inp)
        except Exception as error:  # a backend that errors is a failure, reported, never a crash
            lines.append(CheckLine(backend, dtype_name, section, status="ERROR", detail=classify_error(error)))
            progress.write(str(lines[-1]))
            continue
        for name in quantities:
            error = max_error(got[name], expected[section][name], name)
            if baseline is None:
                tolerance = FP32_TOLERANCE
            else:
                tolerance = 2.0 * max_error(baseline[section][name], expected[section][name], name) + BF16_ATOL
            status = "PASS" if error <= tolerance else "FAIL"
            lines.append(CheckLine(backend, dtype_name, f"{section}.{name}", error, tolerance, status))
            progress.write(str(lines[-1]))
    return lines


# ----------------------------------------------------------------------------------------------
# environment, timing, progress
# ----------------------------------------------------------------------------------------------
def driver_version(device: torch.device) -> str:
    """The NVIDIA driver from nvidia-smi (torch does not expose it), the HIP version on ROCm."""
    if device.type != "cuda":
        return "n/a (no CUDA device in use)"
    if torch.version.hip:
        return f"ROCm / HIP {torch.version.hip}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            out = subprocess.run([smi, "-i", str(index), "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (nvidia-smi not found or failed)"


def describe_environment(device: torch.device) -> Dict[str, object]:
    env = common.environment(device)
    env["driver"] = driver_version(device)
    env["triton_interpreter"] = interpreter_enabled()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, " \
                        f"{props.total_memory / 2 ** 30:.1f} GiB)"
    return env


def timing_backend(chosen: Sequence[str], available: Sequence[str], device: torch.device) -> Optional[str]:
    """What erpo_loss(backend="auto") runs here if it was checked, else the first checked one."""
    auto = resolve_backend_name("auto", device)
    if auto in available:
        return auto
    return next((name for name in chosen if name in available), None)


def run_timing(backend: str, shape: BenchShape, dtype_name: str, device: torch.device, seed: int,
               progress) -> List[Dict[str, object]]:
    """Median ms of ``backend`` and of the floor, train and stats pass, with ``time_callable``."""
    warmup, repeats = (3, 10) if device.type == "cuda" else (2, 5)
    inputs = make_inputs(shape, DTYPES[dtype_name], device, seed=seed)
    registry = {c.name: c for c in all_contenders()}
    ours, floor = registry[f"erpo-{backend}"], registry["floor"]
    progress.write(f"timing {backend} {dtype_name} at {shape.label}, median of {repeats} after {warmup} warm-up")
    rows = []
    for pass_name in common.PASSES:
        times = {}
        for who, contender in (("ours", ours), ("floor", floor)):
            progress.step(f"time {pass_name} {contender.name}")
            times[who] = common.median(common.time_callable(contender.builder(pass_name)(inputs), device,
                                                            warmup, repeats))
        gemms = 3 if pass_name == "train" else 1
        ratio = times["ours"] / times["floor"]
        tflops = common.gemm_flops(shape, pass_name) / (times["floor"] * 1e-3) / 1e12
        rows.append(dict(backend=backend, pass_name=pass_name, dtype=dtype_name, shape=shape.label,
                         ms=times["ours"], floor_ms=times["floor"], ratio=ratio, floor_tflops=tflops))
        progress.write(f"  {pass_name:5s} {times['ours']:10.2f} ms   floor ({gemms} GEMM{'s' * (gemms > 1)}) "
                       f"{times['floor']:10.2f} ms, {tflops:7.2f} TFLOP/s   ratio {ratio:5.2f}x "
                       f"(goal <= {GOAL_RATIO:.2f}x)")
    return rows


class Progress:
    """A tqdm bar on stderr (none without tqdm, an optional dependency, or with --no-progress); report
    lines go to stdout above it."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.started = None, False
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, desc="erpo-doctor", unit="step", leave=False) \
                if enabled else None
        except ImportError:
            pass

    def step(self, description: str) -> None:
        """Start step ``description``, counting the previous one as done."""
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description_str(description)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erpo-doctor", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="check and timing shapes (default: full on CUDA, tiny on the CPU)")
    parser.add_argument("--backends", type=_csv, default=list(BACKENDS),
                        help=f"comma-separated, from {','.join(BACKENDS)} (default: all)")
    parser.add_argument("--dtypes", type=_csv, default=list(DTYPES), help="comma-separated: fp32,bf16")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--no-timing", action="store_true", help="checks only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser


def _parse(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, given, known in (("--backends", args.backends, BACKENDS), ("--dtypes", args.dtypes, DTYPES)):
        if not given or any(name not in known for name in given):
            parser.error(f"{option}: got {given}, expected a comma-separated subset of {list(known)}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device: got {args.device!r}, expected cpu or an available cuda device")
    args.size = args.size or ("full" if device.type == "cuda" else "tiny")
    return args, device


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``erpo-doctor``; returns the exit status (argparse exits with 2 on bad arguments)."""
    args, device = _parse(argv)
    with warnings.catch_warnings():
        # the Triton interpreter evaluates both sides of every tl.where in numpy: log(0) in the branch
        # thrown away warns without being an error, and would bury the report
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        return _doctor(args, device, SIZES[args.size])


def probe_backends(names: Sequence[str], device: torch.device) -> Dict[str, str]:
    """name -> "available" or "unavailable: <why>" (get_backend's ValueError: an optional piece is
    missing, not a failure).  Any other exception propagates: a backend that breaks on import is a bug."""
    status = {}
    for name in names:
        try:
            module = get_backend(name, device)
        except ValueError as error:
            status[name] = f"unavailable: {error}"
            continue
        status[name] = "available" if hasattr(module, "linear_fused_train") else \
            "available (no one-sweep kernel: with old_entropy it runs the stats pass and its backward)"
    return status


def _doctor(args: argparse.Namespace, device: torch.device, size: Size) -> int:
    env = describe_environment(device)
    print(f"erpo-doctor {__version__}  (--size {args.size})")
    for key in ("device", "driver", "torch", "cuda", "triton", "triton_interpreter", "python", "date_utc"):
        print(f"  {key:19s} {env[key]}")
    backends = probe_backends(args.backends, device)
    available = [name for name in args.backends if backends[name].startswith("available")]
    for name in args.backends:
        print(f"backend {name:8s} {backends[name]}")

    timed = None if args.no_timing else timing_backend(args.backends, available, device)
    timing_dtype = "bf16" if "bf16" in args.dtypes else args.dtypes[0]
    progress = Progress(len(available) * len(args.dtypes) * len(SECTIONS) + 4 * (timed is not None),
                        not args.no_progress)
    lines: List[CheckLine] = []
    timing: List[Dict[str, object]] = []
    B, T, H, V = size.check
    try:
        progress.write(f"checks at N={B * T} ({B}x{T}) H={H} V={V}, chunk {size.chunk}, against the fp64 oracle "
                       f"(fp32: tol {FP32_TOLERANCE:.0e}; bf16: 2 x plain torch's bf16 error + {BF16_ATOL:.0e})")
        for dtype_name in args.dtypes:
            inp = make_check_inputs(size, DTYPES[dtype_name], device, seed=args.seed)
            expected = {section: oracle_section(section, inp) for section in SECTIONS}
            baseline = None if dtype_name == "fp32" else {s: plain_torch_section(s, inp) for s in SECTIONS}
            for name in available:
                lines += check_backend(name, dtype_name, inp, expected, baseline, progress)
        if timed is not None and any(line.backend == timed and line.status != "PASS" for line in lines):
            progress.write(f"timing skipped: {timed} failed its checks")
        elif timed is not None:
            shape = size.timing_cuda if device.type == "cuda" else size.timing_cpu
            try:
                timing = run_timing(timed, shape, timing_dtype, device, args.seed, progress)
            except Exception as error:
                status = classify_error(error)
                progress.write(f"timing {timed}: {status}" + (" (try --size small)" if status == "oom" else ""))
                if status != "oom":   # a crash at a realistic shape is a bug; running out of memory is not
                    lines.append(CheckLine(timed, timing_dtype, "timing", status="ERROR", detail=status))
    finally:
        progress.close()
    if timing and device.type != "cuda":
        print("(CPU timings are indicative only: the goal is for the GPU kernels)")
    return _report(args, env, backends, lines, timing)


def _report(args, env, backends: Dict[str, str], lines: List[CheckLine], timing) -> int:
    failed = [line for line in lines if line.status != "PASS"]
    mismatches = sum(line.status == "FAIL" for line in failed)
    verdict = "FAILED" if failed else "OK"
    unavailable = sum(not status.startswith("available") for status in backends.values())
    print(f"result: {verdict}: {len(lines) - len(failed)} checks passed, {mismatches} mismatched, "
          f"{len(failed) - mismatches} errors; {unavailable} backend(s) unavailable")
    for line in failed:
        print(f"  {line.status}: {line.backend} {line.dtype} {line.quantity} {line.detail}".rstrip())
    if args.json is not None:
        report = dict(environment=env, size=args.size, backends=backends, checks=[l.to_dict() for l in lines],
                      timing=timing, goal_ratio=GOAL_RATIO, result=verdict)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
