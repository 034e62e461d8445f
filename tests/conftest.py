"""Test-suite setup.

Triton kernels run on the CPU through Triton's interpreter when no CUDA device is present; the
flag must be set before any kernel module is imported (Triton reads it when a kernel is defined).
Tests marked ``gpu`` are skipped without CUDA; they run on a GPU machine with ``pytest -m gpu``.
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
