"""Triton kernels.  One module per kernel family (kernels plus a launcher that checks inputs, allocates,
computes the grid and launches); shared ``@triton.jit`` helpers live in ``_jit_helpers`` and tile sizes in
``tile_config``.  Importing ``erpo_kernels`` never imports this package: the ``"triton"`` backend
(:mod:`erpo_kernels.backends.triton`) and the Triton dispatch paths import it lazily, when first used.
"""
