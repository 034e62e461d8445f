"""pytest-benchmark suite options.  Run: ``pytest bench/ --benchmark-only`` (add ``--bench-preset gpu`` on CUDA).

Cases are generated at collection (never at import) from ``erpo_kernels.benchmark``: every contender
that can run on the chosen device x the preset's shapes x dtypes x passes; contenders that cannot run
here (not installed, no CUDA) are left out of the parametrization, not skipped.
"""
from __future__ import annotations

import torch

from erpo_kernels.benchmark import PRESETS, all_contenders
from erpo_kernels.benchmark.common import DTYPES, PASSES


def pytest_addoption(parser):
    group = parser.getgroup("erpo-bench")
    group.addoption("--bench-preset", default=None, choices=sorted(PRESETS),
                    help="shape preset (default: gpu on CUDA, cpu-small otherwise)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-dtypes", default="bf16,fp32", help="comma-separated: bf16,fp32")
    group.addoption("--bench-contenders", default=None, help="comma-separated contender names (default: all)")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per case (after 1 warm-up)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads (1 gives steadier figures on a shared machine)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    preset = config.getoption("--bench-preset") or ("gpu" if device.type == "cuda" else "cpu-small")
    dtypes = [d for d in config.getoption("--bench-dtypes").split(",") if d in DTYPES]
    names = config.getoption("--bench-contenders")
    chosen = [c for c in all_contenders() if (names is None or c.name in names.split(","))
              and c.unavailable(device) is None]
    cases, ids = [], []
    for dtype in dtypes:
        for shape in PRESETS[preset]:
            for contender in chosen:
                for pass_name in PASSES:
                    if contender.builder(pass_name) is not None:
                        cases.append((contender, pass_name, dtype, shape, device))
                        ids.append(f"{contender.name}-{pass_name}-{dtype}-N{shape.tokens}-H{shape.hidden}"
                                   f"-V{shape.vocab}")
    metafunc.parametrize("bench_case", cases, ids=ids)
