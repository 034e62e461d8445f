"""Benchmark harness: erpo-kernels against the alternatives, in time and memory, as ratios to the GEMM floor.

    erpo-bench --preset cpu-small --out bench-out            # laptop CPU, a minute or two
    erpo-bench --preset gpu --dtypes bf16 --out bench-out    # the published table (CUDA)
    python -m erpo_kernels.benchmark.cli --help
    pytest bench/ --benchmark-only                            # the same contenders under pytest-benchmark

Modules (imports flow one way): ``common`` (shapes, timing, peak memory, FLOP formula, rows) ->
``contenders`` (one builder per contender: erpo-kernels backends, plain PyTorch, Liger, Cut
Cross-Entropy, the floor) -> ``check`` (loss and grads against ``erpo_kernels.reference`` at a
small shape, before anything is timed) -> ``runner`` (one case: check, warm-up, time, memory,
errors recorded as rows; the model's estimate beside each) -> ``report`` (markdown, JSON, CSV, PNG)
-> ``cli``.  The traffic model stands apart: ``roofline`` (GPUs, calibration, time of a phase) ->
``traffic`` (FLOPs, bytes and extra memory of each pass) -> ``traffic_table`` (goals, README tables).
"""
from erpo_kernels.benchmark.common import PRESETS, BenchShape, Row
from erpo_kernels.benchmark.contenders import Contender, all_contenders, make_inputs

__all__ = ["PRESETS", "BenchShape", "Row", "Contender", "all_contenders", "make_inputs"]
