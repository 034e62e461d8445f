"""The verl adapter (erpo_kernels/integrations/verl.py) with the real verl package, on verl's own data structures.

- GRPO / DAPO configuration of the "erpo" estimator == verl's compute_grpo_outcome_advantage (both std settings),
  through verl's own compute_advantage on a DataProto; ERPO / EP-GRPO from a batch == the oracle's advantages.
- The "erpo" policy loss == compute_policy_loss_vanilla for each loss_agg_mode, with and without global batch
  info, values and gradients, a fully masked row included; and inside verl's own ppo_loss on its packed batch.
- The trainer hooks keep the old entropy verl drops; the verl.plugins entry point registers in a fresh process;
  the package imports without verl.

verl is imported in a module fixture, not at import: it writes to os.environ (RAY_CLIENT_MODE,
TORCH_CUDA_ARCH_LIST, ...), which tests/test_hygiene.py forbids at import, and the fixture restores it.
"""
import os
import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from erpo_kernels import reference
from tests.helpers import assert_close, make_surrogate_inputs, make_token_inputs

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module")
def verl():
    before = dict(os.environ)
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.protocol import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils import losses, padding

    from erpo_kernels.integrations import verl as adapter
    yield SimpleNamespace(OmegaConf=OmegaConf, DataProto=DataProto, core_algos=core_algos, ray_trainer=ray_trainer,
                          ActorConfig=ActorConfig, PolicyLossConfig=PolicyLossConfig, losses=losses,
                          padding=padding, adapter=adapter)
    os.environ.clear()
    os.environ.update(before)


def verl_batch(seed=0, dtype=torch.float32):
    """A generation batch as verl's driver holds it: token_level_rewards (the outcome reward on the row's last
    response token), response_mask (int), uid strings (groups of 4, 3, 3 rows, shuffled; one all-equal group;
    a fully masked row and a one-token row), old / ref log-probs and the old entropy [B, R]."""
    x = make_token_inputs(seed=seed, dtype=dtype)
    mask = x["mask"].long()
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    rewards = torch.zeros(mask.shape, dtype=dtype)
    rewards[torch.arange(mask.shape[0]), last] = x["rewards"]
    uid = np.array([f"prompt-{int(g)}" for g in x["group_ids"]], dtype=object)
    return x, dict(token_level_rewards=rewards, response_mask=mask, old_log_probs=x["old_logprobs"],
                   ref_log_prob=x["ref_logprobs"], entropys=x["old_entropy"]), uid


def algorithm(verl, norm=True, **erpo):
    """verl's algorithm config as its driver passes it (an OmegaConf DictConfig), with an algorithm.erpo section."""
    fields = dict(adv_estimator="erpo", norm_adv_by_std_in_grpo=norm)
    if erpo:
        fields["erpo"] = erpo
    return verl.OmegaConf.create(fields)


def test_verl_registries_hold_the_erpo_entries(verl):
    core = verl.core_algos
    assert core.get_adv_estimator_fn("erpo") is verl.adapter.erpo_estimator
    assert core.get_adv_estimator_fn("ep_grpo") is verl.adapter.ep_grpo_estimator
    assert core.get_policy_loss_fn("erpo") is verl.adapter.erpo_policy_loss


@pytest.mark.parametrize("mode", ["grpo", "dapo"])
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
def test_verl_grpo_and_dapo_config_advantage_equals_compute_grpo_outcome_advantage(verl, mode, norm):
    _, tensors, uid = verl_batch()
    expected, _ = verl.core_algos.compute_grpo_outcome_advantage(
        tensors["token_level_rewards"], tensors["response_mask"], uid, norm_adv_by_std_in_grpo=norm)
    # verl's own dispatcher on a DataProto, which passes the registered estimator rewards, mask, uid and config
    data = verl.DataProto.from_dict(tensors={k: tensors[k] for k in ("token_level_rewards", "response_mask")},
                                    non_tensors={"uid": uid})
    data = verl.ray_trainer.compute_advantage(data, adv_estimator="erpo", norm_adv_by_std_in_grpo=norm,
                                              config=algorithm(verl, norm, mode=mode))
    assert_close(data.batch["advantages"], expected, rtol=0, atol=1e-6, name="advantages")
    assert data.batch["returns"] is data.batch["advantages"]
    assert float(expected.abs().max()) > 0.5


def test_verl_singleton_group_gets_zero_advantage_where_verl_gives_the_reward(verl):
    tensors = dict(token_level_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]),
                   response_mask=torch.ones(3, 2, dtype=torch.long))
    uid = np.array(["a", "a", "alone"], dtype=object)
    ours, _ = verl.adapter.erpo_estimator(**tensors, index=uid, config=algorithm(verl, mode="grpo"))
    theirs, _ = verl.core_algos.compute_grpo_outcome_advantage(**tensors, index=uid)
    assert_close(ours[:2], theirs[:2], rtol=0, atol=1e-6, name="groups of two")
    assert ours[2].abs().max() == 0 and abs(float(theirs[2, 0]) - 1 / (1 + 1e-6)) < 1e-6


@pytest.mark.parametrize("estimator", ["erpo", "ep_grpo"])
def test_verl_erpo_advantage_from_a_batch_equals_the_oracle(verl, estimator):
    x, tensors, uid = verl_batch(dtype=torch.float64)
    data = verl.DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})
    config = algorithm(verl, gate_gamma=3.0)
    data = verl.adapter.compute_advantage(data, adv_estimator=estimator, config=config)
    erpo_config = verl.adapter.erpo_config(config, estimator)
    assert (erpo_config.mode, erpo_config.reward_std, erpo_config.reward_std_eps) == (estimator, "unbiased", 1e-6)
    expected = reference.token_advantages(x["rewards"], x["mask"], x["group_ids"], x["old_entropy"],
                                          x["old_logprobs"], x["ref_logprobs"], erpo_config)["advantages"]
    assert_close(data.batch["advantages"], expected, rtol=1e-10, atol=1e-12, name="advantages")
    assert "old_entropy" not in data.batch.keys()


def test_verl_registered_estimator_says_what_it_lacks(verl):
    _, tensors, uid = verl_batch()
    data = verl.DataProto.from_dict(tensors={k: tensors[k] for k in ("token_level_rewards", "response_mask")},
                                    non_tensors={"uid": uid})
    with pytest.raises(ValueError, match="old_entropy: got None.*compute_advantage"):
        verl.ray_trainer.compute_advantage(data, adv_estimator="erpo", config=algorithm(verl))
    with pytest.raises(ValueError, match="ref_log_prob: got None.*use_kl_loss"):
        verl.adapter.erpo_estimator(tensors["token_level_rewards"], tensors["response_mask"], uid,
                                    algorithm(verl), old_log_probs=tensors["old_log_probs"],
                                    old_entropy=tensors["entropys"])
    with pytest.raises(ValueError, match="algorithm.erpo: got \\['eps_high'\\]"):
        verl.adapter.erpo_config(algorithm(verl, eps_high=0.3))
    for index, message in ((None, "index: got None"), (uid[:-1], "index: got 9 uids, expected one per row")):
        with pytest.raises(ValueError, match=message):
            verl.adapter.erpo_estimator(tensors["token_level_rewards"], tensors["response_mask"], index,
                                        algorithm(verl, mode="dapo"))


def test_verl_trainer_hooks_keep_the_old_entropy_and_route_only_erpo(verl, monkeypatch):
    """The legacy trainer's fit: old-log-prob pass, pop "entropys", union, compute_advantage (ray_trainer's
    module global).  The old-log-prob pass is a stub here (it needs the actor workers)."""
    rt, adapter = verl.ray_trainer, verl.adapter
    x, tensors, uid = verl_batch(dtype=torch.float64)

    def old_log_prob_pass(self, batch):
        return verl.DataProto.from_dict(tensors={k: tensors[k] for k in ("old_log_probs", "entropys")}), 0.5

    monkeypatch.setattr(rt.RayPPOTrainer, "_compute_old_log_prob", old_log_prob_pass)
    monkeypatch.setattr(rt, "compute_advantage", rt.compute_advantage)   # restored after the test
    adapter.install_trainer_hooks()
    adapter.install_trainer_hooks()   # idempotent: one layer
    assert adapter._is_route(rt.compute_advantage) and not adapter._is_route(rt.compute_advantage.args[0])

    for estimator in ("erpo", "grpo"):
        trainer = SimpleNamespace(config=SimpleNamespace(algorithm=algorithm(verl)))
        trainer.config.algorithm.adv_estimator = estimator
        batch = verl.DataProto.from_dict(
            tensors={k: tensors[k] for k in ("token_level_rewards", "response_mask", "ref_log_prob")},
            non_tensors={"uid": uid})
        old, mfu = rt.RayPPOTrainer._compute_old_log_prob(trainer, batch)
        assert mfu == 0.5 and ("old_entropy" in old.batch.keys()) == (estimator == "erpo")
        old.batch.pop("entropys")
        batch = rt.compute_advantage(batch.union(old), adv_estimator=estimator, config=trainer.config.algorithm)
        if estimator == "erpo":
            expected = reference.token_advantages(
                x["rewards"], x["mask"], x["group_ids"], x["old_entropy"], x["old_logprobs"], x["ref_logprobs"],
                adapter.erpo_config(trainer.config.algorithm))["advantages"]
        else:
            expected, _ = verl.core_algos.compute_grpo_outcome_advantage(
                tensors["token_level_rewards"], tensors["response_mask"], uid)
        assert_close(batch.batch["advantages"], expected, rtol=1e-10, atol=1e-12, name=f"{estimator} advantages")
        assert "old_entropy" not in batch.batch.keys()


# ----------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------
def actor_config(verl, **fields):
    return verl.ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                            clip_ratio_high=0.28, clip_ratio_c=3.0, **fields)


def loss_and_grad(fn, inputs, mode, config, weights=None):
    log_prob = inputs["lp"].clone().requires_grad_()
    loss, metrics = fn(old_log_prob=inputs["old"], log_prob=log_prob, advantages=inputs["adv"],
                       response_mask=inputs["mask"], loss_agg_mode=mode, config=config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


GLOBAL_INFOS = {
    "local": {},
    "global": dict(dp_size=2, batch_num_tokens=300, global_batch_size=21),
    "scale_factor": dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=64),
}


@pytest.mark.parametrize("info", list(GLOBAL_INFOS), ids=list(GLOBAL_INFOS))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_policy_loss_equals_compute_policy_loss_vanilla(verl, mode, info):
    inputs = {k: v.double() for k, v in make_surrogate_inputs(shape=(9, 31), seed=3, spread=0.8).items()}
    mask = torch.rand(9, 31, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[4] = False                      # a fully masked row: verl's local seq modes leave it out of the count
    inputs.update(mask=mask, adv=inputs["adv"] * mask, old=torch.where(mask, inputs["old"], -1e4))
    weights = torch.rand(9, 31, dtype=torch.float64) + 0.5 if info == "global" else None
    config = actor_config(verl)
    config.global_batch_info.update(GLOBAL_INFOS[info])
    theirs = loss_and_grad(verl.core_algos.compute_policy_loss_vanilla, inputs, mode, config, weights)
    ours = loss_and_grad(verl.core_algos.get_policy_loss_fn("erpo"), inputs, mode, config, weights)
    assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14, name=f"{mode} loss")
    assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14, name=f"{mode} grad")
    assert ours[2].keys() == theirs[2].keys()
    for key in theirs[2]:
        assert abs(ours[2][key] - theirs[2][key]) < 1e-7, key
    assert theirs[2]["actor/pg_clipfrac"] > 0.1 and theirs[2]["actor/pg_clipfrac_lower"] > 0   # both clips taken


def test_verl_policy_loss_with_bf16_log_probs_equals_vanilla(verl):
    """bf16 model log-probs against fp32 old log-probs and advantages: verl's arithmetic comes out in fp32."""
    inputs = make_surrogate_inputs(shape=(9, 31), seed=4, spread=0.8)
    inputs.update(lp=inputs["lp"].bfloat16(), mask=torch.rand(9, 31, generator=torch.Generator().manual_seed(2)) > 0.3)
    config = actor_config(verl)
    theirs = loss_and_grad(verl.core_algos.compute_policy_loss_vanilla, inputs, "seq-mean-token-mean", config)
    ours = loss_and_grad(verl.core_algos.get_policy_loss_fn("erpo"), inputs, "seq-mean-token-mean", config)
    assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7, name="loss")
    assert_close(ours[1], theirs[1], rtol=0, atol=0, name="grad")


def test_verl_policy_loss_refuses_what_verl_refuses(verl):
    inputs = {k: v.double() for k, v in make_surrogate_inputs(shape=(3, 5)).items()}
    inputs["mask"] = torch.ones(3, 5, dtype=torch.bool)
    config = actor_config(verl)
    config.global_batch_info.update(dp_size=2)
    fn = verl.core_algos.get_policy_loss_fn("erpo")
    for mode, missing in (("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size")):
        with pytest.raises(ValueError):
            loss_and_grad(verl.core_algos.compute_policy_loss_vanilla, inputs, mode, config)
        with pytest.raises(ValueError, match=f"dp_size=2 without {missing}"):
            loss_and_grad(fn, inputs, mode, config)
    with pytest.raises(ValueError, match="loss_agg_mode: got 'seq-sum'"):
        loss_and_grad(fn, inputs, "seq-sum", actor_config(verl))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_ppo_loss_with_loss_mode_erpo_equals_vanilla(verl, mode):
    """verl's own ppo_loss: packed (nested) log-probs over prompt + response, unpadded to [B, R] inside."""
    gen = torch.Generator().manual_seed(0)
    B, P, R, V = 4, 3, 6, 11
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0                                      # left-padded prompt
    response_mask = torch.ones(B, R, dtype=torch.long)
    response_mask[1, 3:] = 0                                   # right-padded response
    prompts, responses = torch.randint(1, V, (B, P), generator=gen), torch.randint(1, V, (B, R), generator=gen)
    attention = torch.cat([prompt_mask, response_mask], 1)
    data = verl.DataProto.from_dict(tensors=dict(
        prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1), attention_mask=attention,
        position_ids=(attention.cumsum(1) - 1).clamp_min(0), response_mask=response_mask))
    td = verl.padding.left_right_2_no_padding(data.to_tensordict())
    offsets = td["input_ids"].offsets()
    packed = -torch.rand(int(offsets[-1]), generator=gen)
    current = verl.padding.no_padding_2_padding(torch.nested.nested_tensor_from_jagged(packed, offsets), td)
    td["old_log_probs"] = current + 0.05 * torch.randn(B, R, generator=gen)   # ratios inside the clip range
    td["advantages"] = torch.randn(B, R, generator=gen) * response_mask
    from verl.utils import tensordict_utils
    tensordict_utils.assign_non_tensor(td, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    results = []
    for loss_mode in ("vanilla", "erpo"):
        config = actor_config(verl, loss_agg_mode=mode, policy_loss=verl.PolicyLossConfig(loss_mode=loss_mode))
        log_probs = packed.clone().requires_grad_()
        output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, offsets)}
        loss, metrics = verl.losses.ppo_loss(config, output, td)
        (grad,) = torch.autograd.grad(loss, log_probs)
        results.append((loss.detach(), grad))
    assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7, name="ppo_loss")
    assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7, name="grad of the packed log-probs")
    assert int((results[1][1] != 0).sum()) == int(response_mask.sum())


# ----------------------------------------------------------------------------------------------
# registration in other processes, and the package without verl
# ----------------------------------------------------------------------------------------------
def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_verl_plugin_entry_point_registers_in_a_fresh_process(verl):
    points = [p for p in metadata.entry_points(group="verl.plugins") if p.value == "erpo_kernels.integrations.verl"]
    assert points, "no verl.plugins entry point for erpo_kernels.integrations.verl: reinstall (pip install -e .)"
    # nothing but `import verl`: verl loads the plugin (silently skipping one that fails)
    result = run_python("import verl\n"
                        "from verl.trainer.ppo import core_algos as c\n"
                        "names = (*c.ADV_ESTIMATOR_REGISTRY, *c.POLICY_LOSS_REGISTRY)\n"
                        "print(sorted(k for k in names if k in ('erpo', 'ep_grpo')))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['ep_grpo', 'erpo', 'erpo']", result.stdout[-2000:]


def test_verl_package_imports_without_verl():
    result = run_python("import sys\n"
                        "sys.modules['verl'] = None   # as if verl were not installed\n"
                        "import erpo_kernels, erpo_kernels.integrations\n"
                        "try:\n"
                        "    import erpo_kernels.integrations.verl\n"
                        "except ImportError as error:\n"
                        "    print(error)\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'erpo-kernels[verl]'" in result.stdout


def readme_block(language: str) -> str:
    """The first ```language block of README.md's "### verl" section."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")).read()
    section = readme.split("### verl", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_verl_readme_snippet_runs_and_its_config_is_accepted_by_verl(verl, capsys):
    exec(compile(readme_block("python"), "README.md ### verl", "exec"), {})
    assert "actor/pg_clipfrac" in capsys.readouterr().out
    # the example config over verl's own trainer config: the actor config verl builds from it, and ours
    import verl as verl_package
    from verl.utils import omega_conf_to_dataclass
    base = verl.OmegaConf.load(os.path.join(os.path.dirname(verl_package.__file__),
                                            "trainer", "config", "_generated_ppo_trainer.yaml"))
    config = verl.OmegaConf.merge(base, verl.OmegaConf.create(readme_block("yaml")))
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert (actor.policy_loss.loss_mode, actor.clip_ratio_c) == ("erpo", 3.0)
    assert verl.core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode) is verl.adapter.erpo_policy_loss
    erpo_config = verl.adapter.erpo_config(config.algorithm, config.algorithm.adv_estimator)
    assert (erpo_config.mode, erpo_config.gate_gamma, erpo_config.reward_std) == ("erpo", 5.0, "unbiased")
