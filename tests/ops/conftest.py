"""Fixtures for the Triton kernel tests.

``tests/conftest.py`` turns on the Triton interpreter (``TRITON_INTERPRET=1``, CPU) when no CUDA device is
present; with CUDA the kernels run natively.  ``gpu``-marked tests (realistic shapes) also need native
kernels, so they are skipped under the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests import helpers


@pytest.fixture
def device():
    """Where the kernels run: CUDA natively when the interpreter is off, else the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def make_linear_inputs(device):
    return lambda *args, **kwargs: helpers.make_linear_inputs(*args, device=device, **kwargs)


def pytest_collection_modifyitems(config, items):
    # The interpreter evaluates both sides of every tl.where in numpy: log(0) and 0 * inf in the branch
    # that is thrown away warn without being errors.
    interpreter_noise = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
    for item in items:
        if "tests/ops/" in item.nodeid.replace("\\", "/"):
            item.add_marker(interpreter_noise)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("realistic shapes need native kernels: run on CUDA without TRITON_INTERPRET=1")
