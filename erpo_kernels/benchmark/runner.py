"""Run the cases: per (dtype, shape, contender, pass), check, warm up, time, measure memory; never raise.

Every failure becomes a row: "oom" (a CUDA or host allocation failed), "oom (predicted ...)" (on the
CPU, a full-logits contender whose [N, V] buffers would not fit in the available memory is not
started, since the kernel's OOM killer would end the whole run instead of raising), or
"error: <type>: <message>".  Checks run once per (contender, pass, dtype), before the first timing.
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from erpo_kernels.benchmark import common, traffic
from erpo_kernels.benchmark.check import CheckResult, check_contender
from erpo_kernels.benchmark.common import BenchShape, Row
from erpo_kernels.benchmark.contenders import BenchInputs, Contender, make_inputs

HOST_MEMORY_FRACTION = 0.8   # CPU guard: start a full-logits case only below this share of MemAvailable
# (contender, pass) -> the traffic-model pass that is its data flow (the harness gives the old entropy, so the
# Triton train pass is the 3-GEMM sweep); other contenders get the modeled floor only
MODELED_PASSES = {("erpo-triton", "train"): "sweep", ("erpo-triton", "stats"): "stats",
                  ("floor", "train"): "floor-3", ("floor", "stats"): "floor-1"}


@dataclass
class RunSettings:
    shapes: List[BenchShape]
    dtypes: List[str]
    passes: List[str]
    contenders: List[Contender]
    device: torch.device
    repeats: int = 5
    warmup: int = 2
    check: bool = True
    progress: bool = True
    verbose: bool = False
    padding: Optional[float] = None      # an RL batch: share of padding slots (make_inputs)
    zero_var: Optional[float] = None     # ... and of zero-variance groups


@dataclass
class RunResult:
    rows: List[Row] = field(default_factory=list)
    unavailable: Dict[str, str] = field(default_factory=dict)      # contender -> why it was left out
    checks: Dict[str, str] = field(default_factory=dict)           # "name/pass/dtype" -> verdict


def classify_error(error: BaseException) -> str:
    """Row status for an exception: "oom" for any out-of-memory, else "error: Type: first line"."""
    text = str(error)
    lowered = text.lower()
    if isinstance(error, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) or \
            "out of memory" in lowered or "can't allocate memory" in lowered or "failed to allocate" in lowered:
        return "oom"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"error: {type(error).__name__}: {first_line[:120]}".rstrip(": ")


def _cases(settings: RunSettings, runnable: List[Contender]) -> List[Tuple[str, BenchShape, Contender, str]]:
    return [(dtype, shape, contender, pass_name)
            for dtype in settings.dtypes for shape in settings.shapes
            for contender in runnable for pass_name in settings.passes
            if contender.builder(pass_name) is not None]


def predicted_oom(contender: Contender, shape: BenchShape, device: torch.device) -> Optional[str]:
    """On the CPU, a status when the contender's [N, V] buffers would not fit in the free RAM, else None."""
    if device.type == "cuda":
        return None   # a CUDA OOM raises and is recorded; the host's OOM killer does not raise
    need, available = contender.memory_estimate(shape), common.available_host_bytes()
    if need and available and need > HOST_MEMORY_FRACTION * available:
        return f"oom (predicted: ~{need / 2**30:.1f} GiB of logits > {available / 2**30:.1f} GiB free)"
    return None


def _run_check(settings: RunSettings, result: RunResult, contender: Contender, pass_name: str,
               dtype: str) -> str:
    key = f"{contender.name}/{pass_name}/{dtype}"
    if key not in result.checks:
        if not settings.check:
            result.checks[key] = "skipped"
        else:
            try:
                verdict: object = check_contender(contender, pass_name, dtype, settings.device)
            except Exception as error:  # a crashing contender is a result, not the end of the run
                verdict = CheckResult(False, float("inf"), classify_error(error))
                _log(settings, error)
            result.checks[key] = str(verdict)
            common.release_memory(settings.device)
    return result.checks[key]


def _log(settings: RunSettings, error: BaseException) -> None:
    if settings.verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def run_case(settings: RunSettings, inputs: BenchInputs, shape: BenchShape, contender: Contender,
             pass_name: str, dtype: str, check: str) -> Row:
    """Time one case; any failure is recorded in the row's status."""
    row = Row.for_case(contender.name, pass_name, dtype, shape, check=check)
    predicted = predicted_oom(contender, shape, settings.device)
    if predicted:
        row.status = predicted
        return row
    fn = None
    try:
        fn = contender.builder(pass_name)(inputs)
        row.times_ms = common.time_callable(fn, settings.device, settings.warmup, settings.repeats)
        row.median_ms, row.min_ms = common.median(row.times_ms), min(row.times_ms)
        inputs.zero_grads()
        row.peak_mib = common.peak_extra_bytes(fn, settings.device) / common.MIB
    except Exception as error:  # OOM and errors become rows; the run goes on
        row.status = classify_error(error)
        row.times_ms = []
        _log(settings, error)
    finally:
        del fn
        inputs.zero_grads()
        common.release_memory(settings.device)
    return row


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the [bench] extra; without it, no bar
        return None
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="case", dynamic_ncols=True)


def run_benchmark(settings: RunSettings) -> RunResult:
    """All cases of ``settings``; rows carry ratios to the floor measured in the same run."""
    result = RunResult()
    runnable = []
    for contender in settings.contenders:
        reason = contender.unavailable(settings.device)
        if reason:
            result.unavailable[contender.name] = reason
        else:
            runnable.append(contender)
    cases = _cases(settings, runnable)
    bar = _progress(len(cases), settings.progress)
    inputs_key, inputs, inputs_error = None, None, None
    for dtype, shape, contender, pass_name in cases:
        if bar is not None:
            bar.set_description(f"{contender.name} {pass_name} {dtype} N={shape.tokens} V={shape.vocab}")
        check = _run_check(settings, result, contender, pass_name, dtype)
        if inputs_key != (dtype, shape):
            inputs = None
            common.release_memory(settings.device)
            inputs_key, inputs_error = (dtype, shape), None
            try:
                inputs = make_inputs(shape, common.DTYPES[dtype], settings.device, padding=settings.padding,
                                     zero_var=settings.zero_var)
            except Exception as error:
                inputs_error = classify_error(error)
                _log(settings, error)
        if inputs_error:
            row = Row.for_case(contender.name, pass_name, dtype, shape, check=check,
                               status=f"{inputs_error} (building the inputs)")
        else:
            row = run_case(settings, inputs, shape, contender, pass_name, dtype, check)
        result.rows.append(row)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    common.add_floor_ratios(result.rows)
    return result


def add_estimates(rows: List[Row], gpu: str) -> None:
    """Fill the ``est_*`` fields of every row from the traffic model for ``gpu`` (a key of ``roofline.GPUS``)."""
    cache: Dict[Tuple[BenchShape, str], Dict[str, traffic.PassEstimate]] = {}
    for row in rows:
        key = (row.shape, row.dtype)
        if key not in cache:
            cache[key] = traffic.estimate_passes(row.tokens, row.hidden, row.vocab, row.dtype, gpu)
        passes = cache[key]
        floor = passes["floor-3" if row.pass_name == "train" else "floor-1"]
        row.est_gpu, row.est_floor_ms = gpu, floor.ms
        modeled = MODELED_PASSES.get((row.contender, row.pass_name))
        if modeled:
            row.est_ms = passes[modeled].ms
            row.est_ratio_to_floor = passes[modeled].seconds / floor.seconds


def select(contenders: Iterable[Contender], names: Optional[List[str]]) -> List[Contender]:
    """The contenders named (all when ``names`` is None), in table order; unknown names raise ValueError."""
    contenders = list(contenders)
    if names is None:
        return contenders
    known = {c.name for c in contenders}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; known: {sorted(known)}")
    return [c for c in contenders if c.name in names]
