"""What one ``erpo_loss`` call costs on the GPU path, counted on the CPU: dispatched aten ops, Triton launches and
device->host reads (syncs on a GPU), forward and backward, on the "triton" backend with 19 token chunks.

Counted with a ``TorchDispatchMode`` (every aten op that reaches the dispatcher, views included); ops that the
Triton interpreter itself dispatches while it runs a kernel are not counted (a GPU launch dispatches none).
A sync is an op that must read a device value on the host: ``.item()`` / ``float()`` / ``bool()`` of a
tensor (``_local_scalar_dense``, ``is_nonzero``), ``torch.unique``, ``nonzero``, boolean-mask indexing,
``torch.equal``, and ``Tensor.tolist`` (patched: it reads CPU memory without an aten op).  Budgets (issue 9): at most 450 ops for both training paths; at most one device
read (the value checks of the inputs and the live-token count, all at once), none with
``check_values=False, skip_dead_tokens=False``.
"""
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from erpo_kernels import erpo_loss
from tests.helpers import make_batch, small_config

OP_BUDGET = 450
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
CHUNKS = 19
SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten._unique2", "aten.unique_dim",
            "aten.unique_consecutive", "aten.masked_select", "aten.equal", "aten.bincount",
            "aten.repeat_interleave.Tensor"}


class CallCost(TorchDispatchMode):
    """Counts aten ops and syncs dispatched outside Triton launches."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.launches, self.inside_launch = [], [], 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_launch:
            name = func.name().replace("::", ".")
            self.ops.append(name)
            overload = f"{name.split('.')[0]}.{name.split('.')[1]}" if name.count(".") else name
            boolean_index = name.startswith("aten.index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
                for i in a)
            if overload in SYNC_OPS or name in SYNC_OPS or boolean_index:
                self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def counting():
    """A CallCost active for the block, with every Triton (interpreter) launch counted and its own aten ops
    (the interpreter copying arguments to numpy) left out."""
    from triton.runtime import interpreter

    cost = CallCost()
    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        cost.launches += 1
        cost.inside_launch = True
        try:
            return original(self, *args, **kwargs)
        finally:
            cost.inside_launch = False

    tolist = torch.Tensor.tolist

    def read_back(self):   # tolist reads CPU memory directly, without an aten op; on a GPU it is a sync
        if not cost.inside_launch:
            cost.syncs.append("Tensor.tolist")
        return tolist(self)

    interpreter.GridExecutor.__call__ = launch
    torch.Tensor.tolist = read_back
    try:
        with cost:
            yield cost
    finally:
        interpreter.GridExecutor.__call__ = original
        torch.Tensor.tolist = tolist


def _call_cost(old_entropy: bool, check_values: bool = True, dtype=torch.float32, mode="erpo",
               skip_dead_tokens: bool = True):
    # 152 completion tokens, groups of 2: with kl_beta > 0 every one of them is live, so the token skipping
    # (on by default) still runs 19 chunks and its gather/scatter ops are counted
    batch = make_batch(B=CHUNKS * 2, T=4, H=32, V=64, G=2, seed=3, mask_frac=0.0)
    config = small_config(mode=mode, kl_beta=0.05, entropy_coef=0.01, chunk_size=8, check_values=check_values,
                          skip_dead_tokens=skip_dead_tokens)
    hidden = batch["hidden"].to(dtype).requires_grad_()
    weight = batch["weight"].to(dtype).requires_grad_()
    with counting() as cost:
        out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=2,
                        old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"] if old_entropy else None, config=config, backend="triton")
        out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert batch["targets"].numel() // config.chunk_size == CHUNKS
    return cost


@pytest.mark.parametrize("old_entropy", [True, False], ids=["one_sweep", "two_pass"])
def test_ops_launches_and_syncs_within_budget(old_entropy):
    """fp32: the ops the CUDA path dispatches for every dtype.  (bf16 on the CPU takes the GEMMs' upcast
    fallback, ~5 more ops per chunk, that CUDA's fp32-output GEMMs do not need: ops/chunk_gemms.py.)"""
    cost = _call_cost(old_entropy)
    summary = f"{len(cost.ops)} aten ops, {cost.launches} Triton launches, syncs {cost.syncs}"
    print(summary)
    assert len(cost.ops) <= OP_BUDGET, summary
    assert len(cost.syncs) <= 1, summary
    assert cost.launches <= 3 * CHUNKS + 12, summary


@pytest.mark.parametrize("old_entropy", [True, False], ids=["one_sweep", "two_pass"])
def test_device_reads_without_value_checks(old_entropy):
    """No read at all without value checks and token skipping; token skipping alone reads its live count."""
    assert _call_cost(old_entropy, check_values=False, skip_dead_tokens=False).syncs == []
    assert len(_call_cost(old_entropy, check_values=False).syncs) == 1


def test_the_counter_sees_syncs():
    """The probe is not blind: .item(), boolean indexing, torch.unique and tolist are counted."""
    x = torch.arange(6.0)
    with counting() as cost:
        x.sum().item()
        _ = x[x > 2]
        torch.unique(x)
        x.tolist()
    assert len(cost.syncs) >= 4, cost.syncs


def test_metrics_read_the_device_once_and_only_when_read():
    batch = make_batch(seed=1)
    config = small_config(check_values=False, skip_dead_tokens=False)
    with counting() as cost:
        out = erpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["mask"], batch["rewards"],
                        group_size=4, old_entropy=batch["old_entropy"], config=config, backend="triton")
        assert cost.syncs == []
        values = dict(out.metrics)
        assert len(cost.syncs) == 1 and len(values) > 10
        assert out.metrics["entropy"] == values["entropy"] and len(cost.syncs) == 1
