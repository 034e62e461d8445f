"""Data parallel: 2 gloo ranks under DistributedDataParallel, each holding part of every group, give the loss and
gradients of one process holding the whole batch.  The model is the trainer's tiny Qwen2 (tied lm_head).
Below: FSDP2 / DTensor lm_head weights, and the README's torchrun snippet run under torchrun.

The relation, the same in every check: a rank's loss is its part of the full-batch loss (its tokens' terms over
the *global* normalizer), so the full-batch loss is the sum of the ranks' losses; DDP averages gradients over
the ranks, so every rank backpropagates ``WORLD * loss`` and the synced gradients are the full-batch ones.

(a) Precomputed advantages, every group split across ranks and across 2 micro-batches per rank (``no_sync`` on
    the first, gradient accumulation): each rank computes its rows' old / reference statistics, all-gathers the
    per-token inputs of the advantages ([rows, T] each, small beside the hidden states), computes
    ``erpo_advantages`` on the whole batch (the same numbers on every rank: TRL's gather-then-slice, no
    broadcast) and keeps its rows; the normalizer is the all-reduced count of completion tokens.
(b) ``gate_scope="global"``: only the entropy gate's mean and std are all-reduced, so it equals one process's
    ``gate_scope="batch"``; the group statistics (A_seq, the (group, bucket) cells of the progress signal) are
    computed on the rank, so each rank holds whole groups.  The gate spans the tokens of one call on every
    rank: one call per rank here (with micro-batches it would be each micro-batch's tokens; use (a) for that).
"""
import copy
import gc
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from erpo_kernels import erpo_advantages, erpo_loss, token_stats
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config, triton_device

WORLD, B, G, L, PROMPT = 2, 8, 4, 13, 3        # ranks, rows, group size, ids per row, prompt ids
SPLIT = [[0, 1, 4, 5], [2, 3, 6, 7]]           # (a): both groups of 4 split across the ranks
MICRO = [[0, 2], [1, 3]]                       # (a): a rank's micro-batches (local rows), one row per group each
WHOLE = [[0, 1, 2, 3], [4, 5, 6, 7]]           # (b): one whole group per rank
BACKENDS = (("chunked", torch.float64), ("triton", torch.float32))
CONFIG = small_config(kl_beta=0.05, entropy_coef=0.01, dual_clip_c=3.0, chunk_size=7)
# Logits of order 1 (entropy ~2.4 +- 0.5 nats) and old / reference policies 0.02 away: ~25% of ratios clip.
EMBED_SCALE, DRIFT = 4.0, 0.02


class HiddenStates(nn.Module):
    """What DDP wraps: the forward returns the last hidden states, never logits; the loss takes ``lm_head``
    from the wrapped model.  DDP syncs every parameter's gradient, the lm_head's (tied to the embedding)
    included, however the loss reached it."""

    def __init__(self, causal_lm):
        super().__init__()
        self.lm = causal_lm

    def forward(self, ids):
        return self.lm.model(ids).last_hidden_state[:, :-1]


def _policies(dtype, device):
    """(policy, old, reference): the same weights in every process."""
    from erpo_kernels.trainer.models import build_preset
    policy = build_preset("tiny", seed=0)[0].to(device=device, dtype=dtype)
    with torch.no_grad():
        policy.model.embed_tokens.weight.mul_(EMBED_SCALE)
    others = []
    for seed in (1, 2):
        other, gen = copy.deepcopy(policy), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) * DRIFT)
        others.append(other)
    return policy, *others


def _data(device):
    """ids [B, L]; targets, mask [B, L-1] (completion after the prompt, ragged ends); rewards [B]."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 81, (B, L), generator=gen)
    ends = torch.randint(L - 5, L, (B, 1), generator=gen)
    t = torch.arange(L - 1)
    mask = (t >= PROMPT - 1) & (t < ends)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    return ids.to(device), ids[:, 1:].to(device), mask.to(device), rewards.to(device)


def _old_and_ref(old, ref, ids, targets):
    """The rollout-side statistics of some rows: old log-prob and entropy, reference log-prob."""
    with torch.no_grad():
        o = token_stats(HiddenStates(old)(ids), old.lm_head, targets)
        r = token_stats(HiddenStates(ref)(ids), ref.lm_head, targets)
    return o.logprobs, o.entropy, r.logprobs


def _gather_rows(x):
    """Every rank's rows in rank order (every rank holds the same number of rows of the same length)."""
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _global_count(mask):
    count = mask.sum().to(torch.float64)
    dist.all_reduce(count)
    return count


def _grads(model):
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def _device(backend):
    return "cpu" if backend == "chunked" else triton_device()


def _run_rank(rank, checks, init_file, results):
    """mp.spawn's target: gloo, ``checks(rank, results)``, then the group destroyed once nothing holds it (DDP and
    FSDP2 keep a reference; gloo threads still alive at interpreter exit can abort it: pytorch/pytorch#190489)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        checks(rank, results)
    finally:
        gc.collect()
        dist.destroy_process_group()


def _ddp_checks(rank, results):
    for backend, dtype in BACKENDS:
        device = _device(backend)
        policy, old, ref = _policies(dtype, device)
        ddp = DistributedDataParallel(HiddenStates(policy))
        ids, targets, mask, rewards = _data(device)

        # (a) precomputed advantages: gather the per-token inputs, compute A on the whole batch, keep my rows
        rows = SPLIT[rank]
        old_lp, old_h, ref_lp = _old_and_ref(old, ref, ids[rows], targets[rows])
        group_ids = torch.tensor(rows, device=device) // G
        everyone = erpo_advantages(*(_gather_rows(x) for x in (rewards[rows], mask[rows], old_h, old_lp, ref_lp)),
                                   group_ids=_gather_rows(group_ids), config=CONFIG)
        advantages = everyone.advantages[rank * len(rows):(rank + 1) * len(rows)]
        normalizer = _global_count(mask[rows])
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for i, local in enumerate(MICRO):
            mb = [rows[j] for j in local]
            with ddp.no_sync() if i < len(MICRO) - 1 else nullcontext():   # sync once, on the last
                out = erpo_loss(ddp(ids[mb]), policy.lm_head, targets[mb], mask[mb], advantages=advantages[local],
                                normalizer=normalizer, old_logprobs=old_lp[local], ref_logprobs=ref_lp[local],
                                config=CONFIG, backend=backend)
                (out.loss * WORLD).backward()
            loss += out.loss.detach()
        dist.all_reduce(loss)
        results[f"{rank}/{backend}/split/loss"] = loss.cpu()
        results[f"{rank}/{backend}/split/advantages"] = advantages.cpu()
        results[f"{rank}/{backend}/split/grads"] = _grads(policy)
        policy.zero_grad(set_to_none=True)

        # (b) gate_scope="global": whole groups per rank, one call each
        rows = WHOLE[rank]
        old_lp, old_h, ref_lp = _old_and_ref(old, ref, ids[rows], targets[rows])
        out = erpo_loss(ddp(ids[rows]), policy.lm_head, targets[rows], mask[rows], rewards[rows], group_size=G,
                        old_logprobs=old_lp, ref_logprobs=ref_lp, old_entropy=old_h,
                        normalizer=_global_count(mask[rows]), config=CONFIG.replace(gate_scope="global"),
                        backend=backend)
        (out.loss * WORLD).backward()
        loss = out.loss.detach().to(torch.float64)
        dist.all_reduce(loss)
        results[f"{rank}/{backend}/global/loss"] = loss.cpu()
        results[f"{rank}/{backend}/global/grads"] = _grads(policy)


def _one_process(backend, dtype, config, rows=slice(None)):
    """One process: loss, parameter grads, advantages and metrics of the whole batch, or of ``rows`` (whole groups)
    over the whole batch's token count."""
    policy, old, ref = _policies(dtype, _device(backend))
    ids, targets, mask, rewards = _data(_device(backend))
    normalizer = mask.sum().double()
    ids, targets, mask, rewards = ids[rows], targets[rows], mask[rows], rewards[rows]
    old_lp, old_h, ref_lp = _old_and_ref(old, ref, ids, targets)
    out = erpo_loss(HiddenStates(policy)(ids), policy.lm_head, targets, mask, rewards, group_size=G,
                    old_logprobs=old_lp, ref_logprobs=ref_lp, old_entropy=old_h, normalizer=normalizer,
                    config=config, backend=backend)
    out.loss.backward()
    return out.loss.detach().double(), _grads(policy), out.advantages, out.metrics


def test_distributed_ddp_equals_one_process(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_run_rank, args=(_ddp_checks, str(tmp_path / "init"), results), nprocs=WORLD, join=True)

    for backend, dtype in BACKENDS:
        tol = 1e-10 if dtype == torch.float64 else 1e-5   # fp32: other summation orders on other row counts
        for layout, scope in (("split", "group"), ("global", "batch")):
            loss, grads, advantages, metrics = _one_process(backend, dtype, CONFIG.replace(gate_scope=scope))
            assert metrics["clip_frac"] > 0.05, metrics          # the clipped branches are exercised
            for rank in range(WORLD):
                tag = f"{backend} {layout} rank {rank}"
                assert_close(results[f"{rank}/{backend}/{layout}/loss"], loss, rtol=tol, atol=tol, name=f"{tag} loss")
                if layout == "split":
                    assert_close(results[f"{rank}/{backend}/split/advantages"], advantages[SPLIT[rank]].cpu(),
                                 rtol=tol, atol=tol, name=f"{tag} advantages")
                got = results[f"{rank}/{backend}/{layout}/grads"]
                assert got.keys() == grads.keys()
                for name, expected in grads.items():
                    assert expected.abs().max() > 0, name
                    assert_close(got[name], expected, rtol=tol, atol=tol, scaled=True, name=f"{tag} {name}")
        if backend == "chunked":   # the checks can tell rank-local statistics from the whole batch's:
            policy, old, ref = _policies(dtype, "cpu")     # (a) advantages of a rank's halves of the groups
            ids, targets, mask, rewards = _data("cpu")
            rows = SPLIT[0]
            old_lp, old_h, ref_lp = _old_and_ref(old, ref, ids[rows], targets[rows])
            local = erpo_advantages(rewards[rows], mask[rows], old_h, old_lp, ref_lp, group_size=2, config=CONFIG)
            assert (local.advantages - results["0/chunked/split/advantages"]).abs().max() > 1e-3
            # (b) each rank gating on its own batch
            batch_scope = CONFIG.replace(gate_scope="batch")
            local_gate = sum(_one_process(backend, dtype, batch_scope, rows)[0] for rows in WHOLE)
            assert (local_gate - results["0/chunked/global/loss"]).abs() > 1e-4 * local_gate.abs()


# --- FSDP2 / DTensor lm_head weights ------------------------------------------------------------------------------
# A DTensor weight (or bias) is gathered whole with full_tensor; its gradient goes back to the shards averaged over
# the mesh, as FSDP2 averages the other parameters' gradients.  A DTensor hidden is refused (which tokens?).

FSDP_B, FSDP_T, DIM, VOCAB = 8, 6, 16, 37     # V = 37: uneven shards of 19 and 18 rows


def _fsdp_cases():
    """(lm_head's FSDP2 unit, backend, dtype).  FSDP2 runs on a CPU mesh here (gloo), and the Triton backend takes
    CPU tensors only under the interpreter."""
    triton = (("own", "triton", torch.float32),) if triton_device() == "cpu" else ()
    return (("own", "chunked", torch.float64),) + triton + (("root", "chunked", torch.float64),)


class LinearPolicy(nn.Module):
    """A backbone and an lm_head (with bias): small enough for FSDP2 on the CPU without transformers."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.backbone, self.lm_head = nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)
        self.to(dtype)

    def forward(self, features):
        return torch.tanh(self.backbone(features) * 3)


def _fsdp_batch(dtype=torch.float64):
    batch = make_batch(B=FSDP_B, T=FSDP_T, H=DIM, V=VOCAB, G=G, seed=11, dtype=torch.float64, drift=WIDE_DRIFT)
    batch["advantages"] = erpo_advantages(batch["rewards"], batch["mask"], batch["old_entropy"], batch["old_logprobs"],
                                          batch["ref_logprobs"], group_size=G, config=CONFIG).advantages
    return {k: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for k, x in batch.items()}


def _fsdp_loss(policy, batch, rows, normalizer, backend):
    """The data-parallel step of (a): this rank's rows, precomputed advantages, the global normalizer."""
    out = erpo_loss(policy(batch["hidden"][rows]), policy.lm_head, batch["targets"][rows], batch["mask"][rows],
                    advantages=batch["advantages"][rows], normalizer=normalizer,
                    old_logprobs=batch["old_logprobs"][rows], ref_logprobs=batch["ref_logprobs"][rows],
                    config=CONFIG, backend=backend)
    return out.loss


def _fsdp_checks(rank, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    rows = SPLIT[rank]
    # the lm_head its own FSDP2 unit (never called: its weight stays a sharded DTensor), or in the root's
    # unit (unsharded by the root's forward, a plain tensor when the loss sees it)
    for unit, backend, dtype in _fsdp_cases():
        batch, policy = _fsdp_batch(dtype), LinearPolicy(dtype)
        normalizer = float(batch["mask"].sum())
        if unit == "own":
            fully_shard(policy.lm_head, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        loss = _fsdp_loss(policy, batch, rows, normalizer, backend)
        results[f"{rank}/{unit}/{backend}/dtensor"] = isinstance(policy.lm_head.weight, DTensor)
        (loss * WORLD).backward()
        dist.all_reduce(loss := loss.detach())
        results[f"{rank}/{unit}/{backend}/loss"] = loss
        results[f"{rank}/{unit}/{backend}/grads"] = {name: p.grad.full_tensor().clone()
                                                     for name, p in policy.named_parameters()}
        results[f"{rank}/{unit}/{backend}/grad_rows"] = policy.lm_head.weight.grad.to_local().shape[0]
        if unit == "own":      # the stats pass (old / reference policy) from the sharded weight, no grad
            with torch.no_grad():
                stats = token_stats(batch["hidden"][rows], policy.lm_head, batch["targets"][rows])
            results[f"{rank}/{unit}/{backend}/entropy"] = stats.entropy

    # tensor-parallel style: a Shard(0) DTensor weight and bias, the same tokens on every rank
    batch, reference = _fsdp_batch(), LinearPolicy()
    weight = nn.Parameter(distribute_tensor(reference.lm_head.weight.detach().clone(), mesh, [Shard(0)]))
    bias = nn.Parameter(distribute_tensor(reference.lm_head.bias.detach().clone(), mesh, [Shard(0)]))
    hidden = batch["hidden"].clone().requires_grad_()
    args = (batch["targets"], batch["mask"], batch["rewards"])
    out = erpo_loss(hidden, weight, *args, group_size=G, bias=bias, old_logprobs=batch["old_logprobs"],
                    ref_logprobs=batch["ref_logprobs"], old_entropy=batch["old_entropy"], config=CONFIG)
    out.loss.backward()
    results[f"{rank}/tp"] = dict(loss=out.loss.detach(), hidden=hidden.grad, weight=weight.grad.full_tensor(),
                                 bias=bias.grad.full_tensor(), local_rows=weight.grad.to_local().shape[0])

    errors = []
    for call in (lambda: erpo_loss(distribute_tensor(batch["hidden"], mesh, [Replicate()]), weight, *args,
                                   group_size=G),
                 lambda: token_stats(batch["hidden"], weight, batch["targets"], vocab_group=dist.group.WORLD)):
        try:
            call()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    results[f"{rank}/errors"] = errors


def test_distributed_fsdp2_and_dtensor_lm_head(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_run_rank, args=(_fsdp_checks, str(tmp_path / "init"), results), nprocs=WORLD, join=True)

    one_process = {}
    for unit, backend, dtype in _fsdp_cases():
        policy = LinearPolicy(dtype)
        loss = _fsdp_loss(policy, _fsdp_batch(dtype), list(range(FSDP_B)), None, backend)
        loss.backward()
        one_process[unit, backend] = loss, {name: p.grad for name, p in policy.named_parameters()}
    batch, policy = _fsdp_batch(), LinearPolicy()
    for rank in range(WORLD):
        for unit, backend, dtype in _fsdp_cases():
            loss, grads = one_process[unit, backend]
            tag, tol = f"{unit} unit {backend} rank {rank}", 1e-10 if dtype == torch.float64 else 1e-5
            assert results[f"{rank}/{unit}/{backend}/dtensor"] == (unit == "own")
            assert results[f"{rank}/{unit}/{backend}/grad_rows"] == (19, 18)[rank]     # the grad stays sharded
            assert_close(results[f"{rank}/{unit}/{backend}/loss"], loss, rtol=tol, atol=tol, name=f"{tag} loss")
            for name, expected in grads.items():
                assert_close(results[f"{rank}/{unit}/{backend}/grads"][name], expected, rtol=tol, atol=tol,
                             scaled=True, name=f"{tag} {name}")
        with torch.no_grad():
            expected = token_stats(batch["hidden"][SPLIT[rank]], policy.lm_head, batch["targets"][SPLIT[rank]])
        for backend in {backend for unit, backend, _ in _fsdp_cases() if unit == "own"}:
            tol = 1e-12 if backend == "chunked" else 1e-5
            assert_close(results[f"{rank}/own/{backend}/entropy"].double(), expected.entropy, rtol=tol, atol=tol,
                         name=f"rank {rank} entropy from the sharded lm_head")

        hidden = batch["hidden"].clone().requires_grad_()
        weight = policy.lm_head.weight.detach().clone().requires_grad_()
        bias = policy.lm_head.bias.detach().clone().requires_grad_()
        out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=G, bias=bias,
                        old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"], config=CONFIG)
        out.loss.backward()
        tp = results[f"{rank}/tp"]
        assert tp["local_rows"] == (19, 18)[rank]
        assert_close(tp["loss"], out.loss, rtol=1e-12, atol=1e-12, name="tp loss")
        for name, expected in (("hidden", hidden.grad), ("weight", weight.grad), ("bias", bias.grad)):
            assert_close(tp[name], expected, rtol=1e-10, atol=1e-10, scaled=True, name=f"tp rank {rank} grad {name}")

        hidden_error, vocab_group_error = results[f"{rank}/errors"]
        assert re.match(r"hidden: got a DTensor .*expected a plain tensor of this rank's tokens: pass "
                        r"hidden.to_local\(\)", hidden_error), hidden_error
        assert re.match(r"lm_head: got a DTensor weight or bias with vocab_group, expected this rank's block",
                        vocab_group_error), vocab_group_error


def test_distributed_readme_torchrun_snippet(tmp_path):
    """The README's torchrun snippet runs under torchrun on 2 gloo ranks, with DDP and with FSDP2 (the lm_head a
    sharded DTensor), and both print the same losses: the same full-batch step either way."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### torchrun / DDP / FSDP2"):]
    script = tmp_path / "erpo_ddp.py"
    script.write_text(section[section.index("```python\n") + 10:section.index("\n```\n")])
    losses = {}
    for fsdp in ("0", "1"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "FSDP": fsdp, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        losses[fsdp] = [float(x) for x in re.findall(r"^step \d: loss (\S+)$", run.stdout, re.M)]
    assert len(losses["0"]) == 2 and losses["0"][0] > 0, losses
    # step 0 is the same loss; step 1 follows one AdamW update, whose first step divides by |grad|, so the fp32
    # rounding of DDP's all-reduce and FSDP2's reduce-scatter shows on the tiniest gradients (SGD: 9 digits equal)
    assert losses["1"][0] == pytest.approx(losses["0"][0], rel=1e-6), losses
    assert losses["1"][1] == pytest.approx(losses["0"][1], rel=1e-3), losses
