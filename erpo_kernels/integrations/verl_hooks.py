"""Importing this module installs :func:`erpo_kernels.integrations.verl.install_trainer_hooks` in the process.

verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` in every process on ``import verl``, the
trainer's TaskRunner actor included, which is where the advantages are computed::

    VERL_USE_EXTERNAL_MODULES=erpo_kernels.integrations.verl_hooks python -m verl.trainer.main_ppo ...
"""
from erpo_kernels.integrations.verl import install_trainer_hooks

install_trainer_hooks()
