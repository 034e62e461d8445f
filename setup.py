"""setup.py exists for the optional native extension (csrc/).

The package installs and works without a compiler: the extension is built only when
ERPO_BUILD_NATIVE=1 and torch's cpp_extension is importable.  Metadata lives in pyproject.toml.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ERPO_BUILD_NATIVE") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".cpp")]
    if sources:
        ext_modules = [CppExtension("erpo_kernels._native", sources, extra_compile_args=["-O3"])]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
