import dataclasses

import pytest

from erpo_kernels import ERPOConfig


@pytest.mark.parametrize("mode, gate, progress_term, aggregation, std_normalize", [
    ("erpo", "sigmoid", True, "token_mean", True),
    ("ep_grpo", "sigmoid", True, "token_mean", True),
    ("dapo", "none", False, "token_mean", True),
    ("grpo", "none", False, "seq_mean_token_mean", True),
    ("dr_grpo", "none", False, "constant", False),
], ids=["erpo", "ep_grpo", "dapo", "grpo", "dr_grpo"])
def test_presets(mode, gate, progress_term, aggregation, std_normalize):
    cfg = ERPOConfig(mode=mode)
    assert (cfg.gate, cfg.progress_term, cfg.aggregation, cfg.std_normalize) == (
        gate, progress_term, aggregation, std_normalize)


def test_pinned_defaults():
    cfg = ERPOConfig()
    assert (cfg.eps, cfg.gate_gamma, cfg.gate_scope, cfg.num_buckets, cfg.progress_lambda, cfg.progress_eta,
            cfg.reward_threshold, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c, cfg.kl_beta, cfg.entropy_coef,
            cfg.temperature, cfg.aggregation) == (1e-6, 5.0, "group", 10, 0.1, 0.2, 0.5, 0.2, 0.28, None, 0.0,
                                                  0.0, 1.0, "token_mean")
    assert ERPOConfig(mode="ep_grpo").progress == "cum_entropy" and ERPOConfig().progress == "position"
    assert ERPOConfig(mode="ep_grpo").polarity == "ep_grpo" and ERPOConfig().polarity == "erpo"


def test_explicit_field_overrides_preset():
    cfg = ERPOConfig(mode="grpo", aggregation="token_mean", gate="sigmoid")
    assert cfg.aggregation == "token_mean" and cfg.gate == "sigmoid"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ERPOConfig().gate_gamma = 1.0


@pytest.mark.parametrize("field, value", [
    ("mode", "ppo"), ("gate", "relu"), ("gate_scope", "world"), ("progress", "time"), ("aggregation", "max"),
    ("eps", 0.0), ("eps", float("nan")), ("temperature", -1.0), ("gate_gamma", -1.0), ("num_buckets", 0),
    ("num_buckets", 2.5), ("eps_low", 1.5), ("dual_clip_c", 0.5), ("gate_top_frac", 0.0), ("kl_beta", -0.1),
    ("chunk_size", 0), ("holder_p", 0.0), ("std_normalize", "yes"), ("max_length", 0),
    ("progress_cap_kappa", -2.0),
])
def test_bad_value_names_field(field, value):
    with pytest.raises(ValueError, match=f"ERPOConfig.{field}"):
        ERPOConfig(**{field: value})


def test_replace_mode_reapplies_preset():
    cfg = ERPOConfig(mode="erpo", gate_gamma=2.0).replace(mode="grpo")
    assert (cfg.gate, cfg.aggregation, cfg.gate_gamma) == ("none", "seq_mean_token_mean", 2.0)
    assert ERPOConfig(mode="grpo").replace(eps_high=0.2).aggregation == "seq_mean_token_mean"


def test_topk_gate_has_no_global_scope():
    with pytest.raises(ValueError, match="ERPOConfig.gate_scope"):
        ERPOConfig(gate="topk", gate_scope="global")
