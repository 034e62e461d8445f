"""Shared benchmark plumbing: shape registry, timing, peak memory, the GEMM-floor FLOP formula, result rows.

Timing: the median over ``repeats`` calls after ``warmup`` calls; on CUDA each call is bracketed by
CUDA events (device time, after a synchronize), on the CPU by ``time.perf_counter``.

Peak extra memory: what a call adds above the inputs that already exist (outputs such as the
gradients count, since every contender must produce them).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocated bytes before the call.
- CPU (Linux): the kernel's own resident-set high-water mark.  Before the call, freed heap pages
  are handed back (``malloc_trim(0)``), then the high-water mark is reset to the current RSS by
  writing ``5`` to ``/proc/self/clear_refs``; after the call ``VmHWM`` minus the RSS before the call
  is the peak.  Nothing is sampled, so short-lived buffers are not missed.  (``tracemalloc`` does
  not see torch's allocations, and ``ru_maxrss`` cannot be reset inside one process.)  Where
  ``clear_refs`` is not writable, a 1 kHz RSS sampler thread stands in (a lower bound), and
  ``memory_method()`` says so.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import torch

from erpo_kernels.backends import torch_chunked

MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchShape:
    """One problem size: ``batch`` sequences of ``length`` tokens, hidden size, vocabulary size."""
    batch: int
    length: int
    hidden: int
    vocab: int

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def label(self) -> str:
        return f"N={self.tokens} ({self.batch}x{self.length}) H={self.hidden} V={self.vocab}"


def _grid(pairs, hiddens, vocabs) -> List[BenchShape]:
    return [BenchShape(b, t, h, v) for h in hiddens for v in vocabs for (b, t) in pairs]


PRESETS: Dict[str, List[BenchShape]] = {
    # CI smoke test: the whole harness in seconds.
    "tiny": _grid([(8, 16), (8, 64)], [64], [512]),
    # a laptop CPU: a minute or two for every contender, both passes, bf16 and fp32.
    "cpu-small": _grid([(8, 32), (8, 128), (8, 256)], [128], [8192]),
    # a GPU: N in {8192, 32768, 131072} tokens, H in {2048, 4096}, V in {32000, 128256, 151936}.
    "gpu": _grid([(8, 1024), (16, 2048), (32, 4096)], [2048, 4096], [32000, 128256, 151936]),
    # a real RL batch (run with --padding / --zero-var, default 0.4 / 0.4 for these presets): the CPU shape
    # of issue 13 (80 rows in groups of 8, T=128, H=256, V=32000), and a GPU one; ratios are to the dense
    # floor of the padded shape
    "rl-batch": [BenchShape(80, 128, 256, 32000)],
    "rl-batch-gpu": [BenchShape(64, 512, 4096, 151936)],
}
# Real lm_heads (hidden size, vocabulary), as presets of N = 1024 tokens (8 x 128), the shape issue 11 measures
# on a CPU; --shape N,H,V (or BxT,H,V) gives any other token count.
MODELS: Dict[str, Tuple[int, int]] = {
    "qwen2.5-0.5b": (896, 151936),
    "llama-3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
}
PRESETS.update({name: [BenchShape(8, 128, hidden, vocab)] for name, (hidden, vocab) in MODELS.items()})
# --padding / --zero-var defaults per preset (None: the legacy mask, a random prompt prefix and end padding)
RL_BATCH_DEFAULTS = {"rl-batch": (0.4, 0.4), "rl-batch-gpu": (0.4, 0.4)}

def parse_shape(text: str) -> BenchShape:
    """``"N,H,V"`` (N tokens as 8 sequences of N / 8 when 8 divides N, else one sequence) or ``"BxT,H,V"``;
    ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        hidden, vocab = int(parts[1]), int(parts[2])
        if "x" in parts[0].lower():
            batch, length = (int(x) for x in parts[0].lower().split("x"))
        else:
            tokens = int(parts[0])
            batch = 8 if tokens % 8 == 0 else 1
            batch, length = batch, tokens // batch
    except ValueError:
        raise ValueError(f"--shape: got {text!r}, expected N,H,V or BxT,H,V (integers, e.g. 1024,896,151936)") \
            from None
    if min(batch, length, hidden, vocab) < 1:
        raise ValueError(f"--shape: got {text!r}, expected every size >= 1")
    return BenchShape(batch, length, hidden, vocab)


# The small shape every contender's loss and grads are checked at before it is timed.
CHECK_SHAPE = BenchShape(8, 24, 64, 1000)

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("train", "stats")


def gemm_flops(shape: BenchShape, pass_name: str) -> float:
    """FLOPs of the floor: 3 GEMMs of 2·N·H·V for fwd+bwd (logits, grad_hidden, grad_W), 1 for the stats pass."""
    gemms = 3 if pass_name == "train" else 1
    return gemms * 2.0 * shape.tokens * shape.hidden * shape.vocab


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the call"
    if _proc_status_kib("VmHWM") is not None and _reset_rss_peak():
        return "RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call"
    return "RSS sampled at 1 kHz minus RSS before the call (a lower bound)"


class _RSSSampler(threading.Thread):
    """Fallback where the high-water mark cannot be reset: poll the RSS until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._stop_event = _current_rss(), threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _current_rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _current_rss())


def _current_rss() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of ``fn`` needs above what is allocated before it (see the module docstring)."""
    release_memory(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    base = _current_rss()
    if _proc_status_kib("VmHWM") is not None and _reset_rss_peak():
        fn()
        return max(0, (_proc_status_kib("VmHWM") or 0) * 1024 - base)
    sampler = _RSSSampler()
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    return max(0, peak - base)


# MemAvailable (None where unknown): the CPU guard against the OOM killer
available_host_bytes = torch_chunked.available_host_bytes


# ----------------------------------------------------------------------------------------------
# rows and the environment
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured (or failed) case; ``status`` is "ok", "oom", "oom (predicted ...)" or "error: ..."."""
    contender: str
    pass_name: str
    dtype: str
    batch: int
    length: int
    tokens: int
    hidden: int
    vocab: int
    status: str = "ok"
    check: str = "n/a"
    median_ms: float = math.nan
    min_ms: float = math.nan
    times_ms: List[float] = field(default_factory=list)
    peak_mib: float = math.nan
    ratio_to_floor: float = math.nan
    gemm_tflops: float = math.nan     # floor FLOPs / median time: how close to the GEMM roofline
    est_gpu: str = ""                 # the traffic model's estimate (an estimate, not a measurement) for this GPU:
    est_ms: float = math.nan          # this contender's pass, where the model has its data flow
    est_ratio_to_floor: float = math.nan   # est_ms / the modeled floor of the pass (3 GEMMs train, 1 stats)
    est_floor_ms: float = math.nan    # the modeled floor itself

    @classmethod
    def for_case(cls, contender: str, pass_name: str, dtype: str, shape: BenchShape, **kwargs) -> "Row":
        return cls(contender, pass_name, dtype, shape.batch, shape.length, shape.tokens, shape.hidden,
                   shape.vocab, **kwargs)

    @property
    def shape(self) -> BenchShape:
        return BenchShape(self.batch, self.length, self.hidden, self.vocab)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def add_floor_ratios(rows: List[Row]) -> None:
    """Fill ``ratio_to_floor`` and ``gemm_tflops`` from the floor row of the same pass, shape and dtype."""
    floors = {(r.pass_name, r.shape, r.dtype): r.median_ms for r in rows if r.contender == "floor"
              and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        row.gemm_tflops = gemm_flops(row.shape, row.pass_name) / (row.median_ms * 1e-3) / 1e12
        floor = floors.get((row.pass_name, row.shape, row.dtype))
        if floor:
            row.ratio_to_floor = row.median_ms / floor


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # not installed (or no metadata): reported as None
        return None


def environment(device: torch.device) -> dict:
    """Device, library versions and date: every published figure carries them."""
    from erpo_kernels import __version__
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "erpo_kernels": __version__,
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "memory_method": memory_method(device),
    }
