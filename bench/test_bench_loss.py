"""Forward+backward of each loss (and the stats pass alone), side by side, under pytest-benchmark.

    pytest bench/ --benchmark-only                        # cpu-small preset on a CPU
    pytest bench/ --benchmark-only --bench-preset gpu     # on CUDA (the default preset there)
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each case is checked against ``erpo_kernels.reference`` at a small shape first (a wrong kernel
fails instead of being timed); timings are grouped per (pass, dtype, shape) so the contenders of one
shape sit in one table.  ``extra_info`` carries the check verdict and the peak extra memory.
``erpo-bench`` (``erpo_kernels.benchmark.cli``) gives the same cases with ratios to the GEMM floor,
JSON and a plot.
"""
from __future__ import annotations

import pytest

from erpo_kernels.benchmark import common, make_inputs
from erpo_kernels.benchmark.check import check_contender
from erpo_kernels.benchmark.runner import classify_error, predicted_oom

_CHECKS = {}


def _checked(contender, pass_name, dtype, device) -> str:
    key = (contender.name, pass_name, dtype, str(device))
    if key not in _CHECKS:
        _CHECKS[key] = str(check_contender(contender, pass_name, dtype, device))
    return _CHECKS[key]


def test_loss(benchmark, bench_case, request):
    contender, pass_name, dtype, shape, device = bench_case
    verdict = _checked(contender, pass_name, dtype, device)
    assert not verdict.startswith("FAIL"), f"{contender.name} {pass_name} {dtype}: {verdict}"
    predicted = predicted_oom(contender, shape, device)
    if predicted:
        pytest.skip(predicted)   # a runtime limit of this machine, not an unsupported combination
    benchmark.group = f"{pass_name} {dtype} {shape.label}"
    benchmark.extra_info.update(contender=contender.name, check=verdict, tokens=shape.tokens,
                                gemm_flops=common.gemm_flops(shape, pass_name), device=str(device))
    try:
        inputs = make_inputs(shape, common.DTYPES[dtype], device)
        fn = contender.builder(pass_name)(inputs)
        benchmark.pedantic(fn, rounds=request.config.getoption("--bench-rounds"), warmup_rounds=1, iterations=1)
        inputs.zero_grads()
        benchmark.extra_info["peak_extra_mib"] = common.peak_extra_bytes(fn, device) / common.MIB
    except Exception as error:
        if classify_error(error) == "oom":
            pytest.skip(f"oom: {error}")
        raise
    finally:
        common.release_memory(device)
