"""Fixtures for the Triton kernel tests.

``tests/conftest.py`` turns on the Triton interpreter (``TRITON_INTERPRET=1``, CPU) when no CUDA device is
present; with CUDA the kernels run natively.  ``gpu``-marked tests (realistic shapes) also need native
kernels, so they are skipped under the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device():
    """Where the kernels run: CUDA natively when the interpreter is off, else the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device")
    return torch.device("cuda")


def _make_linear_inputs(n_tokens, dim, vocab, dtype=torch.float32, with_bias=True, seed=0, device="cpu",
                       ignore_index=-100, ignore_every=5, bias_shift=0.0):
    """Fresh random (hidden [N, H], weight [V, H], bias [V] or None, targets [N]) in ``dtype``: logits of
    order 1-3, every ``ignore_every``-th target set to ``ignore_index``, bias shifted by ``bias_shift``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (2.0 / dim ** 0.5)
    bias = torch.randn(vocab, generator=gen) * 0.5 + bias_shift if with_bias else None
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = ignore_index
    cast = [x.to(device=device, dtype=dtype) if x is not None else None for x in (hidden, weight, bias)]
    return (*cast, targets.to(device))


@pytest.fixture
def make_linear_inputs(device):
    return lambda *args, **kwargs: _make_linear_inputs(*args, device=device, **kwargs)


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
