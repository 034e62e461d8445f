"""Test-suite setup, the one place that decides where Triton kernels run.

Without a CUDA device, Triton kernels run on the CPU through Triton's interpreter: ``pytest_configure`` sets
``TRITON_INTERPRET=1`` before any test module (and so any kernel module) is imported, since Triton reads it
when a kernel is defined, and restores the environment afterwards.  With a CUDA device nothing is set and the
kernels compile natively, so ``pytest -m gpu`` on a GPU machine tests real GPU kernels.  An explicit
``TRITON_INTERPRET`` in the environment is always left alone.  No test module may change the environment at
import (tests/test_hygiene.py checks it).  Tests marked ``gpu`` are skipped without CUDA.
"""
import os

import pytest
import torch

_SET_BY_US = False


def pytest_configure(config):
    global _SET_BY_US
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        _SET_BY_US = True


def pytest_unconfigure(config):
    if _SET_BY_US:
        os.environ.pop("TRITON_INTERPRET", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
