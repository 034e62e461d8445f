"""The contenders: one builder per library, each turning benchmark inputs into a callable to time.

A :class:`Contender` builds, for the same :class:`BenchInputs`, a ``train`` callable (forward and
backward of its loss; returns the detached loss, leaves grads in ``hidden.grad`` / ``weight.grad``)
and optionally a ``stats`` callable (the no-grad per-token pass; returns ``(logprobs, entropy or
None)``).  ``loss`` names what it computes, so :mod:`check` knows which formula to check it against:

- ``"erpo"``: the ERPO loss (erpo-kernels backends; plain PyTorch with full logits)
- ``"dapo"``: token-mean clipped GRPO with sequence advantages (Liger's ``LigerFusedLinearGRPOLoss``)
- ``"weighted_ce"``: cross-entropy weighted per token by the ERPO token advantages (Cut Cross-Entropy)
- ``"gemms"``: nothing but the bf16/fp32 GEMMs (the floor)

Optional libraries are imported only inside their builders; a contender that is not installed or
cannot run on the device says why through ``unavailable(device)`` and is left out of the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from erpo_kernels import ERPOConfig, erpo_advantages, erpo_loss, reference, token_stats
from erpo_kernels.backends import triton_available
from erpo_kernels.benchmark.common import BenchShape

Tensor = torch.Tensor
GROUP_SIZE = 8


@dataclass
class BenchInputs:
    """Fresh random inputs for one (shape, dtype); the [B, T] side inputs are fp32 and detached."""
    hidden: Tensor            # [B, T, H] dtype, requires grad (randn)
    weight: Tensor            # [V, H] dtype, requires grad (randn * 2 / sqrt(H): logits of std ~2)
    targets: Tensor           # [B, T] int64, sampled from the policy itself
    mask: Tensor              # [B, T] bool completion mask (a prompt prefix and end padding are off)
    rewards: Tensor           # [B] random 0/1
    group_size: int
    old_logprobs: Tensor      # current log-probs + noise (ratios != 1, some clipped)
    ref_logprobs: Tensor      # current log-probs + more noise (the progress term is live)
    old_entropy: Tensor       # current entropy (exact on the first update of an on-policy batch)
    seq_advantages: Tensor    # [B] A_seq (GRPO/DAPO), for Liger
    token_advantages: Tensor  # [B, T] ERPO token advantages, the per-token CE weights for CCE
    config: ERPOConfig

    @property
    def group_ids(self) -> Tensor:
        return torch.arange(self.rewards.numel(), device=self.rewards.device) // self.group_size

    def zero_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def _sample_targets(hidden: Tensor, weight: Tensor, generator: torch.Generator) -> Tensor:
    """One token per position sampled from softmax(h W^T), [chunk, V] logits at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = max(1, min(flat.shape[0], (1 << 26) // weight.shape[0]))
    out = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, flat.shape[0], chunk):
        probs = torch.softmax((flat[start:start + chunk] @ weight.t()).float(), dim=-1)
        out[start:start + chunk] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return out.view(hidden.shape[:-1])


def rl_batch_mask_and_rewards(batch: int, length: int, group_size: int, padding: float, zero_var: float,
                              gen: torch.Generator, device: torch.device):
    """A completion mask whose rows are right-padded to about ``padding`` of the slots (lengths uniform around
    the mean (1 - padding) * T), and 0/1 rewards where ``zero_var`` of the groups are all equal (alternately
    all right and all wrong) and every other group has both outcomes."""
    if not (0.0 <= padding < 1.0 and 0.0 <= zero_var <= 1.0):
        raise ValueError(f"padding / zero_var: got {padding} / {zero_var}, expected 0 <= padding < 1, 0 <= zero_var <= 1")
    mean = (1.0 - padding) * length
    spread = min(mean - 1.0, length - mean)
    lengths = (mean + spread * (2 * torch.rand(batch, generator=gen, device=device) - 1)).round().clamp(1, length)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    groups = batch // group_size
    rewards = torch.randint(0, 2, (groups, group_size), generator=gen, device=device).float()
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0
    dead = round(zero_var * groups)
    rewards[:dead] = (torch.arange(dead, device=device) % 2).float()[:, None]
    return mask, rewards.reshape(-1)


@torch.no_grad()
def make_inputs(shape: BenchShape, dtype: torch.dtype, device: torch.device, seed: int = 0,
                logprob_noise: float = 0.1, config: Optional[ERPOConfig] = None,
                padding: Optional[float] = None, zero_var: Optional[float] = None) -> BenchInputs:
    """Random inputs (never zeros) for ``shape``; old/ref log-probs and old entropy computed once, here.
    ``padding`` / ``zero_var`` (both or neither): an RL batch of right-padded completions with that share of
    padding slots and of zero-variance groups (:func:`rl_batch_mask_and_rewards`)."""
    B, T, H, V = shape.batch, shape.length, shape.hidden, shape.vocab
    group_size = min(GROUP_SIZE, B)
    if B % group_size:
        raise ValueError(f"batch {B} must be a multiple of the group size {group_size}")
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    hidden = rand(B, T, H).to(dtype)
    weight = (rand(V, H) * (2.0 / H ** 0.5)).to(dtype)
    targets = _sample_targets(hidden, weight, gen)
    if padding is None:
        prompt = torch.randint(0, T // 8 + 1, (B, 1), generator=gen, device=device)
        length = torch.randint(max(1, T // 2), T + 1, (B, 1), generator=gen, device=device)
        position = torch.arange(T, device=device)
        mask = (position >= prompt) & (position < prompt + length)
        rewards = torch.randint(0, 2, (B,), generator=gen, device=device).float()
    else:
        mask, rewards = rl_batch_mask_and_rewards(B, T, group_size, padding, zero_var, gen, device)
    stats = token_stats(hidden, weight, targets, backend="chunked")
    old_logprobs = (stats.logprobs + logprob_noise * rand(B, T)).clamp(max=0.0)
    ref_logprobs = (stats.logprobs + 2 * logprob_noise * rand(B, T)).clamp(max=0.0)
    config = config or ERPOConfig(mode="erpo")
    group_ids = torch.arange(B, device=device) // group_size
    seq_adv = reference.outcome_advantage(rewards, group_ids, ERPOConfig(mode="dapo"))
    token_adv = erpo_advantages(rewards, mask, stats.entropy, old_logprobs, ref_logprobs, group_size=group_size,
                                config=config, backend="chunked").advantages
    return BenchInputs(hidden.requires_grad_(), weight.requires_grad_(), targets, mask, rewards, group_size,
                       old_logprobs, ref_logprobs, stats.entropy, seq_adv, token_adv, config)


# ----------------------------------------------------------------------------------------------
# the contender record
# ----------------------------------------------------------------------------------------------
Builder = Callable[[BenchInputs], Callable[[], object]]


def _always(device: torch.device) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Contender:
    """A named loss implementation: builders for its timed passes and the reason it cannot run, if any."""
    name: str
    loss: str                              # "erpo" | "dapo" | "weighted_ce" | "gemms" (see the module docstring)
    train: Builder
    stats: Optional[Builder] = None        # None: no stats pass of its own (left out of "stats" runs)
    unavailable: Callable[[torch.device], Optional[str]] = _always
    logits_bytes_per_element: float = 0.0  # > 0: materializes [N, V]; bytes per element at its peak
    note: str = ""

    def builder(self, pass_name: str) -> Optional[Builder]:
        return self.train if pass_name == "train" else self.stats

    def memory_estimate(self, shape: BenchShape) -> float:
        return self.logits_bytes_per_element * shape.tokens * shape.vocab


# ----------------------------------------------------------------------------------------------
# erpo-kernels
# ----------------------------------------------------------------------------------------------
def _erpo_train(backend: str) -> Builder:
    def build(inp: BenchInputs):
        def run():
            inp.zero_grads()
            out = erpo_loss(inp.hidden, inp.weight, inp.targets, inp.mask, inp.rewards, group_size=inp.group_size,
                            old_logprobs=inp.old_logprobs, ref_logprobs=inp.ref_logprobs,
                            old_entropy=inp.old_entropy, config=inp.config, backend=backend)
            out.loss.backward()
            return out.loss.detach()
        return run
    return build


def _erpo_stats(backend: str) -> Builder:
    def build(inp: BenchInputs):
        def run():
            with torch.no_grad():
                stats = token_stats(inp.hidden, inp.weight, inp.targets, backend=backend)
            return stats.logprobs, stats.entropy
        return run
    return build


def _triton_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "needs CUDA (the Triton interpreter on the CPU is for tests, not timing)"
    return None if triton_available() else "triton is not importable"


def _native_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "CPU only"
    from erpo_kernels.backends import native_unavailable
    reason = native_unavailable()
    return None if reason is None else ("not built" if "not built" in reason else reason[:100])


def _erpo(backend: str, **kwargs) -> Contender:
    return Contender(f"erpo-{backend}", "erpo", _erpo_train(backend), _erpo_stats(backend), **kwargs)


# ----------------------------------------------------------------------------------------------
# plain PyTorch, full logits, written for speed (what a trainer does)
# ----------------------------------------------------------------------------------------------
def _full_log_softmax(inp: BenchInputs) -> Tuple[Tensor, Tensor]:
    """[B, T, V] fp32 log-softmax of the (bf16) logits upcast, as trainers do, and the picked log-probs."""
    log_probs = torch.log_softmax((inp.hidden @ inp.weight.t()).float(), dim=-1)
    return log_probs, log_probs.gather(-1, inp.targets.unsqueeze(-1)).squeeze(-1)


def _pytorch_train(inp: BenchInputs):
    def run():
        inp.zero_grads()
        log_probs, logprobs = _full_log_softmax(inp)
        with torch.no_grad():  # logged by every trainer; the loss uses the given old entropy
            entropy = -torch.einsum("btv,btv->bt", log_probs.exp(), log_probs)
        adv = erpo_advantages(inp.rewards, inp.mask, inp.old_entropy, inp.old_logprobs, inp.ref_logprobs,
                              group_size=inp.group_size, config=inp.config, backend="chunked").advantages
        old = reference.fill_off_mask(inp.old_logprobs, inp.mask, logprobs)
        ref = reference.fill_off_mask(inp.ref_logprobs, inp.mask, logprobs)
        token_loss, _ = reference.per_token_loss(logprobs, entropy, adv, old, ref, inp.config)
        loss = reference.aggregate(token_loss, inp.mask, inp.config)
        loss.backward()
        return loss.detach()
    return run


def _pytorch_stats(inp: BenchInputs):
    def run():
        with torch.no_grad():
            log_probs, logprobs = _full_log_softmax(inp)
            entropy = -torch.einsum("btv,btv->bt", log_probs.exp(), log_probs)
        return logprobs, entropy
    return run


# ----------------------------------------------------------------------------------------------
# Liger-Kernel and Cut Cross-Entropy (imported lazily)
# ----------------------------------------------------------------------------------------------
def _import_unavailable(module: str, pip_name: str, cpu: bool = False) -> Callable[[torch.device], Optional[str]]:
    """Why the library cannot run on ``device``: not installed, or (``cpu=False``) not on a CUDA device."""
    def unavailable(device: torch.device) -> Optional[str]:
        try:
            __import__(module)
        except ImportError:
            return f"not installed (pip install {pip_name})"
        return None if device.type == "cuda" or cpu else "needs CUDA"
    return unavailable


def _liger_train(inp: BenchInputs):
    """LigerFusedLinearGRPOLoss, loss_type="dapo" (token mean), no KL: the GRPO/DAPO loss, not ERPO.  Its
    chunked loss is torch code (torch.compile'd by default, Liger's own setting), so it runs on a CPU too."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    config = ERPOConfig(mode="dapo")
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=config.eps_low,
                                       epsilon_high=config.eps_high, loss_type="dapo", temperature=1.0)
    attention_mask = inp.mask.float()

    def run():
        inp.zero_grads()
        out = loss_fn(inp.hidden, inp.weight, inp.targets, attention_mask, inp.seq_advantages,
                      old_per_token_logps=inp.old_logprobs)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()
    return run


def _cce_per_token(inp: BenchInputs) -> Tensor:
    from cut_cross_entropy import linear_cross_entropy
    flat = inp.hidden.reshape(-1, inp.hidden.shape[-1])
    return linear_cross_entropy(flat, inp.weight, inp.targets.reshape(-1), reduction="none").view_as(inp.targets)


def _cce_train(inp: BenchInputs):
    """Cut Cross-Entropy: CE only, weighted per token by the ERPO advantages, mean over the mask."""
    weights, count = inp.token_advantages * inp.mask, inp.mask.sum().clamp_min(1)

    def run():
        inp.zero_grads()
        loss = (_cce_per_token(inp).float() * weights).sum() / count
        loss.backward()
        return loss.detach()
    return run


def _cce_stats(inp: BenchInputs):
    def run():
        with torch.no_grad():
            return -_cce_per_token(inp).float(), None   # log-probs only: CCE has no entropy
    return run


# ----------------------------------------------------------------------------------------------
# the floor: the GEMMs alone
# ----------------------------------------------------------------------------------------------
FLOOR_CHUNK_BYTES = 2 << 30


def floor_chunk(shape: BenchShape, element_size: int) -> int:
    """Tokens per [chunk, V] logits buffer: at most 2 GiB (a fused loss holds no more), all N when small."""
    return max(1, min(shape.tokens, FLOOR_CHUNK_BYTES // (shape.vocab * element_size)))


def _floor(gemms: int) -> Builder:
    """z = x W^T, then (train) grad_x = dz W and grad_W += dz^T x with dz := z (values don't change GEMM time)."""
    def build(inp: BenchInputs):
        x, w = inp.hidden.detach().reshape(-1, inp.hidden.shape[-1]), inp.weight.detach()
        shape = BenchShape(1, x.shape[0], x.shape[1], w.shape[0])
        chunk = floor_chunk(shape, x.element_size())

        def run():
            buffer = torch.empty(chunk, w.shape[0], dtype=x.dtype, device=x.device)
            grad_x = torch.empty_like(x) if gemms == 3 else None
            grad_w = torch.zeros_like(w) if gemms == 3 else None
            for start in range(0, x.shape[0], chunk):
                rows = x[start:start + chunk]
                logits = torch.mm(rows, w.t(), out=buffer[:rows.shape[0]])
                if gemms == 3:
                    torch.mm(logits, w, out=grad_x[start:start + chunk])
                    grad_w.addmm_(logits.t(), rows)
            return None
        return run
    return build


# ----------------------------------------------------------------------------------------------
# the registry (a function, not a mutable global: callers pass their own list to the runner)
# ----------------------------------------------------------------------------------------------
def all_contenders() -> List[Contender]:
    """Every contender, in table order; ``unavailable(device)`` says which can run here."""
    return [
        _erpo("triton", unavailable=_triton_unavailable, note="Triton kernels"),
        _erpo("chunked", note="pure torch, [chunk, V] logits at a time"),
        _erpo("native", unavailable=_native_unavailable, note="chunked loop with the compiled CPU kernels (csrc/)"),
        _erpo("torch", logits_bytes_per_element=28.0, note="full-logits reference path"),
        Contender("pytorch", "erpo", _pytorch_train, _pytorch_stats, logits_bytes_per_element=26.0,
                  note="plain PyTorch, bf16 logits upcast to fp32, log_softmax, gather, entropy"),
        Contender("liger", "dapo", _liger_train, None,
                  unavailable=_import_unavailable("liger_kernel.chunked_loss", "liger-kernel", cpu=True),
                  note="LigerFusedLinearGRPOLoss(loss_type='dapo', beta=0), torch.compile'd: GRPO/DAPO, not ERPO"),
        Contender("cce", "weighted_ce", _cce_train, _cce_stats,
                  unavailable=_import_unavailable("cut_cross_entropy", "cut-cross-entropy"),
                  note="Cut Cross-Entropy linear_cross_entropy: CE weighted per token (not ERPO)"),
        Contender("floor", "gemms", _floor(3), _floor(1),
                  note="the GEMMs alone: 3 x 2NHV (train), 1 x 2NHV (stats)"),
    ]
