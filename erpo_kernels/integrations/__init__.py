"""Adapters for RL trainers, imported lazily: importing ``erpo_kernels`` (or this package) never imports them.

    from erpo_kernels.integrations import ERPOGRPOConfig, ERPOGRPOTrainer   # pip install "erpo-kernels[trl]"
    import erpo_kernels.integrations.verl        # registers ERPO in verl (or verl's plugin entry point does)

A name is looked up in its adapter module only on first access, so a missing trainer package is an
ImportError at that point, naming the extra to install, and nothing else pays for it.
"""
from __future__ import annotations

import importlib

# public name -> (module under erpo_kernels.integrations, pip extra that provides its trainer)
_LAZY = {
    "ERPOGRPOConfig": ("trl", "trl"),
    "ERPOGRPOTrainer": ("trl", "trl"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, extra = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        raise ImportError(f"erpo_kernels.integrations.{name} needs the {extra!r} extra: "
                          f'pip install "erpo-kernels[{extra}]" ({error})') from error
    return getattr(module, name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
