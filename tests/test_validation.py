"""Bad input raises ValueError naming the argument; normal-but-odd input does not."""
import pytest
import torch

from erpo_kernels import backends, erpo_advantages, erpo_loss, token_stats
from tests.helpers import make_batch, small_config


def _args(**changes):
    batch = make_batch(seed=1)
    args = dict(hidden=batch["hidden"], lm_head=batch["weight"], targets=batch["targets"], mask=batch["mask"],
                rewards=batch["rewards"], group_size=4, old_logprobs=batch["old_logprobs"],
                ref_logprobs=batch["ref_logprobs"], old_entropy=batch["old_entropy"], config=small_config())
    args.update(changes)
    return args


def _nan_at(x, index=(0, 0)):
    x = x.clone()
    x[index] = float("nan")
    return x


B, T, H, V = 8, 12, 16, 37
BAD = {
    "hidden_nan": (dict(hidden=_nan_at(make_batch(seed=1)["hidden"], (0, 0, 0))), "hidden"),
    "hidden_int": (dict(hidden=torch.ones(B, T, H, dtype=torch.long)), "hidden"),
    "hidden_1d": (dict(hidden=torch.randn(H)), "hidden"),
    "weight_wrong_H": (dict(lm_head=torch.randn(V, H + 1)), "lm_head"),
    "weight_1d": (dict(lm_head=torch.randn(H)), "lm_head"),
    "weight_dtype": (dict(lm_head=torch.randn(V, H, dtype=torch.float64)),
                     "lm_head: .*expected dtype torch.float32, the dtype of hidden .*lm_head is torch.float64"),
    "lm_head_type": (dict(lm_head="lm_head"), "lm_head"),
    "targets_out_of_vocab": (dict(targets=torch.full((B, T), V)), "targets"),
    "targets_negative": (dict(targets=torch.full((B, T), -5)), "targets"),
    "targets_float": (dict(targets=torch.zeros(B, T)), "targets"),
    "targets_shape": (dict(targets=torch.zeros(B, T + 1, dtype=torch.long)), "targets"),
    "mask_shape": (dict(mask=torch.ones(B, T - 1, dtype=torch.bool)), "mask"),
    "mask_values": (dict(mask=torch.full((B, T), 2.0)), "mask"),
    "all_masked": (dict(mask=torch.zeros(B, T, dtype=torch.bool)), "mask"),
    "rewards_nan": (dict(rewards=_nan_at(torch.rand(B), (1,))), "rewards"),
    "rewards_inf": (dict(rewards=torch.tensor([float("inf")] + [0.0] * (B - 1))), "rewards"),
    "rewards_shape": (dict(rewards=torch.rand(B + 1)), "rewards"),
    "group_size_not_divisor": (dict(group_size=3), "group_size"),
    "group_size_zero": (dict(group_size=0), "group_size"),
    "groups_both": (dict(group_ids=torch.zeros(B, dtype=torch.long)), "group_size / group_ids"),
    "groups_neither": (dict(group_size=None), "group_size / group_ids"),
    "positive_old_logprobs": (dict(old_logprobs=torch.full((B, T), 0.5)), "old_logprobs"),
    "positive_ref_logprobs": (dict(ref_logprobs=torch.full((B, T), 0.1)), "ref_logprobs"),
    "nan_old_logprobs": (dict(old_logprobs=_nan_at(make_batch(seed=1)["old_logprobs"])), "old_logprobs"),
    "negative_entropy": (dict(old_entropy=torch.full((B, T), -0.5)), "old_entropy"),
    "old_entropy_shape": (dict(old_entropy=torch.rand(B, T + 2)), "old_entropy"),
    "config_type": (dict(config={"mode": "erpo"}), "config"),
    "gates_negative": (dict(gates=-torch.rand(B, T)), "gates"),
    "token_weights_nan": (dict(token_weights=_nan_at(torch.rand(B, T))), "token_weights"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_argument(case):
    changes, name = BAD[case]
    with pytest.raises(ValueError, match=f"^{name}"):
        erpo_loss(**_args(**changes))


def test_tensors_on_another_device():
    batch = make_batch(seed=1)
    with pytest.raises(ValueError, match="^lm_head"):
        erpo_loss(**_args(lm_head=batch["weight"].to("meta")))
    with pytest.raises(ValueError, match="^old_logprobs"):
        erpo_loss(**_args(old_logprobs=batch["old_logprobs"].to("meta")))


def test_bad_backend_and_triton_on_cpu(monkeypatch):
    with pytest.raises(ValueError, match="^backend: got 'cuda'"):
        erpo_loss(**_args(), backend="cuda")
    # CPU tensors and no interpreter: Triton cannot run them.  (The flag is patched where the backend reads it,
    # not in the environment: Triton caches TRITON_INTERPRET when it is first imported.)
    monkeypatch.setattr(backends, "interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="backend='triton': tensors are on cpu, expected CUDA tensors"):
        erpo_loss(**_args(), backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        token_stats(torch.randn(5, 4), torch.randn(7, 4), torch.zeros(5, dtype=torch.long), backend="triton")


def test_token_stats_validation():
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="^temperature"):
        token_stats(h, w, torch.zeros(5, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="^targets"):
        token_stats(h, w, torch.full((5,), 9))
    with pytest.raises(ValueError, match="^bias"):
        token_stats(h, w, torch.zeros(5, dtype=torch.long), bias=torch.randn(6))


def test_erpo_advantages_validation():
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="^rewards"):
        erpo_advantages(torch.tensor([0.0, float("nan"), 1.0, 1.0]), mask, torch.rand(4, 3), group_size=2)
    with pytest.raises(ValueError, match="^old_entropy"):
        erpo_advantages(torch.rand(4), mask, -torch.rand(4, 3) - 0.1, group_size=2)
    with pytest.raises(ValueError, match="^mask"):
        erpo_advantages(torch.rand(4), ~mask, torch.rand(4, 3), group_size=2)


def test_normal_inputs_are_not_errors():
    """Zero-variance groups, masked rows, ignore-index targets, int rewards and masked garbage pass."""
    batch = make_batch(seed=2, ignore_frac=0.2)
    old = batch["old_logprobs"].clone()
    old[~batch["mask"]] = -1e4         # garbage off the mask is never looked at (exp(1e4) would be inf)
    mask = batch["mask"].clone()
    mask[3] = False
    entropy = batch["old_entropy"].clone()
    entropy[~mask] = float("nan")
    out = erpo_loss(**_args(targets=batch["targets"], mask=mask.float(), old_logprobs=old, old_entropy=entropy,
                            rewards=torch.ones(B, dtype=torch.long)))
    assert torch.isfinite(out.loss) and out.metrics["zero_var_groups"] == 2.0
    assert all(v == v for v in out.metrics.values())  # no NaN metric
    hidden = batch["hidden"].clone().requires_grad_()
    out = erpo_loss(**_args(hidden=hidden, targets=batch["targets"], mask=mask, old_logprobs=old,
                            ref_logprobs=old, config=small_config(kl_beta=0.1)))
    out.loss.backward()
    assert bool(torch.isfinite(hidden.grad).all())
