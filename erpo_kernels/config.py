"""ERPOConfig: every knob of ERPO_SPEC.md in one frozen, validated dataclass.

Mode presets fill in the *structure* (gate on/off, progress coordinate, polarity, aggregation);
any field given explicitly overrides its preset.  ``ERPOConfig(mode="grpo")`` is GRPO,
``ERPOConfig(mode="erpo", gate="none")`` is ERPO without its gate, and so on.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

MODES = ("erpo", "ep_grpo", "grpo", "dapo", "dr_grpo")
GATES = ("sigmoid", "topk", "none")
GATE_SCOPES = ("group", "batch", "sequence", "global")
PROGRESS = ("position", "cum_entropy")
POLARITIES = ("erpo", "ep_grpo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "holder")
REWARD_STDS = ("population", "unbiased")

# Structure of each mode.  Fields not named here keep their dataclass default.
_PRESETS = {
    "erpo": dict(gate="sigmoid", progress_term=True, progress="position", polarity="erpo",
                 aggregation="token_mean", std_normalize=True),
    "ep_grpo": dict(gate="sigmoid", progress_term=True, progress="cum_entropy", polarity="ep_grpo",
                    aggregation="token_mean", std_normalize=True),
    "dapo": dict(gate="none", progress_term=False, aggregation="token_mean", std_normalize=True),
    "grpo": dict(gate="none", progress_term=False, aggregation="seq_mean_token_mean",
                 std_normalize=True),
    "dr_grpo": dict(gate="none", progress_term=False, aggregation="constant", std_normalize=False),
}

_PRESET_FIELDS = ("std_normalize", "gate", "progress_term", "progress", "polarity", "aggregation")


@dataclass(frozen=True)
class ERPOConfig:
    """All ERPO / EP-GRPO / GRPO / DAPO / Dr.GRPO hyper-parameters (ERPO_SPEC.md, "Pinned defaults").

    Preset-controlled fields default to ``None`` and are filled from ``mode`` in ``__post_init__``.
    """

    mode: str = "erpo"
    eps: float = 1e-6                      # every denominator (std, entropy sums)
    # --- outcome advantage -------------------------------------------------------------
    std_normalize: Optional[bool] = None   # A_seq /= std_g(r) (False for Dr.GRPO)
    reward_std: str = "population"         # std of a group's rewards for A_seq: "population" (pinned) or
                                           # "unbiased" (Bessel's correction, as TRL and verl compute it)
    reward_std_eps: Optional[float] = None # added to that std; None = eps (TRL uses 1e-4, verl 1e-6)
    # --- (i) entropy gate --------------------------------------------------------------
    gate: Optional[str] = None             # "sigmoid" | "topk" (hard, top fraction) | "none" (W = 1)
    gate_gamma: float = 5.0
    gate_scope: str = "group"              # z statistics over the group | batch | sequence | global
                                           # ("global": the batch of every rank, via torch.distributed)
    gate_normalize: bool = False           # rescale W to mean 1 over each sequence's tokens
    gate_top_frac: float = 0.2
    # --- (ii) implicit progress signal and buckets -------------------------------------
    progress_term: Optional[bool] = None   # add eta * Psi to the advantage
    progress: Optional[str] = None         # "position" (ERPO) | "cum_entropy" (EP-GRPO)
    num_buckets: int = 10
    progress_lambda: float = 0.1
    progress_eta: float = 0.2
    bucket_normalize: bool = True          # z-score s inside each (group, bucket) cell
    progress_cap_kappa: Optional[float] = None  # cap |eta*Psi| <= |A_out| / kappa
    # --- (iii) synthesis polarity ------------------------------------------------------
    polarity: Optional[str] = None         # "erpo": d = sign(A_seq); "ep_grpo": + zero-variance fallback
    reward_threshold: float = 0.5
    # --- surrogate ---------------------------------------------------------------------
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: Optional[float] = None
    kl_beta: float = 0.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    # --- aggregation -------------------------------------------------------------------
    aggregation: Optional[str] = None
    holder_p: float = 1.0                  # power of the Hoelder mean (aggregation="holder")
    max_length: Optional[int] = None       # "constant" divisor length; None = padded T
    # --- plumbing ----------------------------------------------------------------------
    ignore_index: int = -100
    chunk_size: Optional[int] = None       # tokens per [chunk, V] logits block; None = 32 MiB (CPU) / 1 GiB (CUDA)
    fused_train: bool = True               # 3-matmul sweep (loss + grads at once) where it applies
    check_values: bool = True              # value checks of the inputs (one device read per call); False
                                           # for production runs that trust their inputs
    skip_dead_tokens: bool = True          # the GEMMs run only on tokens that carry gradient (completion
                                           # tokens; with kl_beta = entropy_coef = 0 also A != 0); their
                                           # count is read with the value checks (erpo_kernels.compaction)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ERPOConfig.mode: got {self.mode!r}, expected one of {MODES}")
        for name, value in _PRESETS[self.mode].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.progress is None:  # dapo/grpo/dr_grpo: irrelevant while progress_term is off
            object.__setattr__(self, "progress", "position")
        if self.polarity is None:
            object.__setattr__(self, "polarity", "erpo")
        self._validate()

    def _validate(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"ERPOConfig.{name}: got {getattr(self, name)!r}, expected one of {options}")

        def positive(name, allow_zero=False, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"ERPOConfig.{name}: got {value!r}, expected a finite number {bound}")

        choice("gate", GATES)
        choice("gate_scope", GATE_SCOPES)
        choice("progress", PROGRESS)
        choice("polarity", POLARITIES)
        choice("aggregation", AGGREGATIONS)
        choice("reward_std", REWARD_STDS)
        for name in ("std_normalize", "progress_term", "gate_normalize", "bucket_normalize", "fused_train",
                     "check_values", "skip_dead_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ERPOConfig.{name}: got {getattr(self, name)!r}, expected a bool")
        for name in ("eps", "temperature", "holder_p"):
            positive(name)
        for name in ("gate_gamma", "progress_lambda", "progress_eta", "eps_low", "eps_high",
                     "kl_beta", "entropy_coef"):
            positive(name, allow_zero=True)
        positive("progress_cap_kappa", optional=True)
        positive("reward_std_eps", allow_zero=True, optional=True)
        positive("dual_clip_c", optional=True)
        if self.gate == "topk" and self.gate_scope == "global":
            raise ValueError("ERPOConfig.gate_scope: got 'global' with gate='topk', expected 'group', 'batch' "
                             "or 'sequence' (a cross-rank top-k threshold is not implemented)")
        if not 0.0 < self.gate_top_frac <= 1.0:
            raise ValueError(f"ERPOConfig.gate_top_frac: got {self.gate_top_frac!r}, expected 0 < x <= 1")
        if self.eps_low >= 1.0:
            raise ValueError(f"ERPOConfig.eps_low: got {self.eps_low!r}, expected a value in [0, 1)")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"ERPOConfig.dual_clip_c: got {self.dual_clip_c!r}, expected > 1 (e.g. 3.0) or None")
        for name in ("num_buckets", "chunk_size"):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ERPOConfig.{name}: got {value!r}, expected an int >= 1")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"ERPOConfig.max_length: got {self.max_length!r}, expected an int >= 1 or None")
        if not isinstance(self.ignore_index, int):
            raise ValueError(f"ERPOConfig.ignore_index: got {self.ignore_index!r}, expected an int")

    def replace(self, **changes) -> "ERPOConfig":
        """A copy with ``changes``.  Changing ``mode`` re-applies that mode's preset to every preset
        field not named in ``changes``; otherwise resolved preset fields are kept as they are."""
        if "mode" in changes:
            for name in _PRESET_FIELDS:
                changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)

    @property
    def reward_eps(self) -> float:
        """The eps added to a group's reward std in A_seq."""
        return self.eps if self.reward_std_eps is None else self.reward_std_eps

    @property
    def uses_gate(self) -> bool:
        return self.gate != "none"
