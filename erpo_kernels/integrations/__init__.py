"""Thin adapters that put ERPO inside real trainers (TRL, verl).  Each lives in its own module and imports its
trainer only when that module is imported, so ``import erpo_kernels`` never needs them."""
