"""Backend resolution, in one place.

A backend is a module exposing ``linear_stats`` and ``linear_stats_backward`` with the signatures
of :mod:`erpo_kernels.backends.torch_chunked`, and optionally ``linear_fused_train`` (the one-sweep
training pass), ``token_advantages`` and ``per_token_loss``; where one is missing the library's
torch implementation of that step runs.  Names:

- ``"torch"``: the reference path, full [N, V] logits (for tests and tiny shapes only)
- ``"chunked"``: pure torch, [chunk, V] logits at a time; the CPU default
- ``"triton"``: Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``)
- ``"native"``: the compiled CPU kernels of ``csrc/`` in the chunked loop (built by ``pip install`` where a C++
  compiler is found; optional)
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton imports; on the CPU ``"native"`` when the extension is
  built, else ``"chunked"``

Importing this package never imports Triton or the extension; a backend is imported the first time it is asked
for.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from erpo_kernels.ops.tile_config import interpreter_enabled  # torch-only module: no Triton import

BACKENDS = ("auto", "torch", "chunked", "triton", "native")
_MODULES = {
    "torch": "erpo_kernels.backends.torch_full",
    "chunked": "erpo_kernels.backends.torch_chunked",
    "triton": "erpo_kernels.backends.triton",
    "native": "erpo_kernels.backends.native",
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install: either way, not usable
        return False
    return True


@functools.lru_cache(maxsize=None)
def native_unavailable() -> Optional[str]:
    """None when the native extension loads here, else the reason it does not (the ValueError's text)."""
    try:
        importlib.import_module(_MODULES["native"])
    except ValueError as error:
        return str(error)
    return None


def resolve_backend_name(name: str, device: torch.device) -> str:
    """Map ``name`` (possibly "auto") to a concrete backend for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"backend: got {name!r}, expected one of {BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "chunked"
        return "native" if device.type == "cpu" and native_unavailable() is None else "chunked"
    if name == "native":
        reason = native_unavailable()
        if reason is not None:
            raise ValueError(reason)
        if device.type != "cpu":
            raise ValueError(f"backend='native': tensors are on {device}, expected CPU tensors (the native "
                             "kernels are CPU code; use backend='triton' or 'auto' on CUDA)")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend='triton': Triton is not importable here; install triton or use "
                             "backend='chunked'")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(f"backend='triton': tensors are on {device}, expected CUDA tensors "
                             "(or set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    return name


def get_backend(name: str, device: torch.device):
    """The backend module for ``name`` on ``device`` (resolving "auto")."""
    return importlib.import_module(_MODULES[resolve_backend_name(name, device)])
