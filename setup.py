"""setup.py builds the optional native CPU extension ``erpo_kernels._native`` (csrc/); metadata is in pyproject.toml.

The README's install command (``pip install torch==... && pip install -e ".[test]"``) builds it with torch's
cpp_extension against the torch already installed, with no extra step.  pip builds in an isolated environment
that holds only the build requirements (torch is deliberately not one: pip would fetch another torch build into
it), but it runs the build with the target environment's interpreter; so when ``import torch`` fails here, a
child process of the same interpreter without pip's PYTHONPATH finds the installed torch, and its
site-packages directory is appended to sys.path (after the isolated one, so the build requirements win).

The extension is optional: without torch, without a C++ compiler, or when the compile fails, the package
installs without it, a warning says why, and ``backend="native"`` raises a ValueError that explains.
``ERPO_BUILD_NATIVE=0`` skips the build; ``ERPO_BUILD_NATIVE=1`` makes any failure fatal.

Instruction sets: the row kernels (csrc/row_kernels_impl.h) are compiled three times on x86-64, for the
baseline, AVX2 and AVX-512 (per-file flags below), and the extension picks at run time the one torch itself
uses on that CPU, so an install built on one machine runs on another.
"""
import os
import platform
import subprocess
import sys

from setuptools import setup

NATIVE = os.environ.get("ERPO_BUILD_NATIVE", "auto")   # "0" never, "1" always (failures fatal), else when possible
ISA_FLAGS = {   # per-file flags: the file name's suffix selects them
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _warn(message: str) -> None:
    sys.stderr.write(f"erpo-kernels: {message}\n")


def _import_installed_torch() -> bool:
    """Make the target environment's torch importable here (see the module docstring); False if it has none."""
    try:
        import torch  # noqa: F401  (no build isolation: it is simply there)
        return True
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    if found.returncode != 0 or not found.stdout.strip():
        return False
    sys.path.append(found.stdout.strip().splitlines()[-1])
    try:
        import torch  # noqa: F401,F811
    except ImportError:
        return False
    return True


def _sources():
    names = sorted(f for f in os.listdir("csrc") if f.endswith(".cpp"))
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # the dispatching file first: where two files emit the same inline function, the linker keeps the first
    # copy, which must be the one compiled without AVX flags
    names.sort(key=lambda name: (name != "erpo_native.cpp", name))
    return [os.path.join("csrc", n) for n in names if x86 or not any(n.endswith(s) for s in ISA_FLAGS)], x86


def _native_extension():
    """(ext_modules, cmdclass) for the native extension, or empty ones when it cannot be built here."""
    if NATIVE == "0":
        return [], {}
    if not _import_installed_torch():
        message = "torch is not installed in the target environment, so the native extension is not built " \
                  "(install torch first, then this package)"
        if NATIVE == "1":
            raise RuntimeError(message)
        _warn(message)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildNative(BuildExtension):
        """torch's BuildExtension, plus per-file instruction-set flags, and a failure that is a warning.  Without
        ninja: its build file takes one flag list for every source, and the files are few."""

        def __init__(self, *args, **kwargs):
            kwargs["use_ninja"] = False
            super().__init__(*args, **kwargs)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # no compiler, a compile error: the package still installs
                if NATIVE == "1":
                    raise
                _warn(f"the native extension was not built ({type(error).__name__}: {error}); backend='native' "
                      "will be unavailable, every other backend works")

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def compile_with_isa_flags(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
                extra = [flag for suffix, flags in ISA_FLAGS.items() if src.endswith(suffix) for flag in flags]
                return compile_one(obj, src, ext_name, cc_args, list(extra_postargs) + extra, pp_opts)

            self.compiler._compile = compile_with_isa_flags
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

    sources, x86 = _sources()
    defines = [("ERPO_HAVE_AVX2", None), ("ERPO_HAVE_AVX512", None)] if x86 else []
    headers = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".h")]
    extension = CppExtension("erpo_kernels._native", sources, depends=headers, define_macros=defines,
                             optional=NATIVE != "1",
                             extra_compile_args=["-O3", "-fopenmp", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
                             extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
