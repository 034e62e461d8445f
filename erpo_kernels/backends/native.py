"""The optional native (csrc/) backend.  The only module that imports the compiled extension."""
from __future__ import annotations

try:  # built only with ERPO_BUILD_NATIVE=1 (see setup.py and csrc/README.md)
    from erpo_kernels import _native  # type: ignore[attr-defined]  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the build
    raise ValueError("backend='native': the compiled extension erpo_kernels._native is not built "
                     "(pip install with ERPO_BUILD_NATIVE=1); use backend='chunked' or 'triton'") from error
