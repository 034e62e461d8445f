"""The TRL adapter with the real TRL on the CPU: a tiny Qwen2 built from a config and the project's char tokenizer.

In grpo mode (ERPO's gate and progress term off) the loss and gradients must equal TRL's own ``GRPOTrainer``:
on a hand-built generation batch, split into micro-batches the way TRL splits it (``_compute_loss`` called
directly, fast), and through a real ``train()`` with steps_per_generation and gradient accumulation.  TRL runs
with ``bf16=False`` throughout: it defaults to bf16 autocast even on the CPU, which no exact comparison survives.
"""
import functools
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from erpo_kernels import token_stats
from erpo_kernels.trainer.models import build_preset
from tests.helpers import assert_close


@functools.lru_cache(maxsize=None)
def lib():
    """TRL, transformers and the adapter, imported on first use: importing them with this module would import
    torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR, and no test module may change the environment at import
    (tests/test_hygiene.py).  TRL is a dependency of the test extra: missing it fails, it is not a skip."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, HfArgumentParser, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    from erpo_kernels.integrations import ERPOGRPOConfig, ERPOGRPOTrainer
    return SimpleNamespace(**{value.__name__: value for value in (
        Dataset, AutoModelForCausalLM, HfArgumentParser, TrainerCallback, GRPOConfig, GRPOTrainer,
        shuffle_sequence_dict, split_tensor_dict, ERPOGRPOConfig, ERPOGRPOTrainer)})


def classes(kind):
    """(trainer, config) classes: "erpo" the adapter, "trl" TRL's own."""
    L = lib()
    return (L.ERPOGRPOTrainer, L.ERPOGRPOConfig) if kind == "erpo" else (L.GRPOTrainer, L.GRPOConfig)


G, GROUPS, P, C = 4, 4, 5, 7          # group size, groups, prompt width, completion width of the hand-built batch
COMMON = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
              epsilon=0.2, epsilon_high=0.28)


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    """No hub look-ups or telemetry; tiny models run fastest on one thread."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer():
    return build_preset("tiny", seed=0)[1]


def make_trainer(kind, model, out, **options):
    cls, config_cls = classes(kind)
    if kind == "erpo":
        options.setdefault("erpo_mode", "grpo")
    args = config_cls(output_dir=str(out), **{**COMMON, **options})
    data = lib().Dataset.from_dict({"prompt": ["1+1="] * 8})
    return cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
               train_dataset=data, processing_class=tokenizer())


def hand_built_batch(model):
    """A generation batch of GROUPS x G rows as TRL's ``_generate_and_score_completions`` returns it: left-padded
    prompts, right-padded completions (one fully masked), off-policy old log-probs (so the ratio clips), rewards
    with one zero-variance group, reference log-probs from a perturbed copy (so the KL is live)."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab = GROUPS * G, model.config.vocab_size
    prompt_ids, completion_ids = torch.randint(3, vocab, (rows, P), generator=gen), torch.randint(3, vocab, (rows, C),
                                                                                               generator=gen)
    prompt_mask, completion_mask = torch.ones(rows, P, dtype=torch.long), torch.ones(rows, C, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[6, :1] = 0
    completion_mask[0, 4:] = completion_mask[5, 2:] = completion_mask[11, 1:] = 0
    completion_mask[9] = 0
    rewards = torch.tensor([1., 0., 0., 1., .5, .5, .5, .5, 0., 1., .2, 0., 1., 1., 0., .3])
    ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[-1][:, -C - 1:-1]
        current = token_stats(hidden, model.lm_head, completion_ids).logprobs
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, num_items_in_batch=completion_mask.sum(),
                 old_per_token_logps=current + 0.3 * torch.randn(rows, C, generator=gen),
                 ref_per_token_logps=current + 0.2 * torch.randn(rows, C, generator=gen),
                 importance_sampling_ratio=torch.rand(rows, C, generator=gen) * 1.5)
    return batch, rewards


def trl_advantages(rewards):
    """TRL 1.16's group advantage: (r - mean) / (Bessel std + 1e-4)."""
    grouped = rewards.view(-1, G)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def accumulate(trainer, micro_batches, accumulation):
    """Each micro-batch's loss and the gradients summed over them, as the training loop accumulates them."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.model.zero_grad()
    losses = []
    for inputs in micro_batches:
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


CASES = [  # loss_type, steps_per_generation, gradient accumulation, beta, vLLM importance ratio
    pytest.param("grpo", 1, 1, 0.0, False, id="grpo"),
    pytest.param("grpo", 2, 2, 0.0, False, id="grpo-spg2-ga2"),
    pytest.param("dapo", 2, 2, 0.0, False, id="dapo-spg2-ga2"),
    pytest.param("dapo", 4, 2, 0.0, False, id="dapo-spg4-ga2"),
    pytest.param("bnpo", 2, 2, 0.0, False, id="bnpo-spg2-ga2"),
    pytest.param("dr_grpo", 2, 2, 0.0, False, id="dr_grpo-spg2-ga2"),
    pytest.param("dapo", 2, 2, 0.04, False, id="dapo-kl"),
    pytest.param("grpo", 2, 1, 0.0, True, id="grpo-vllm-is-ratio"),
]


@pytest.mark.parametrize("loss_type,spg,accumulation,beta,is_ratio", CASES)
def test_trl_grpo_mode_loss_and_grads_equal_trl(tmp_path, loss_type, spg, accumulation, beta, is_ratio):
    model, _ = build_preset("tiny", seed=0)
    if beta:   # TRL builds its reference model from the policy's path: a config-built model has none
        model.save_pretrained(tmp_path / "model")
    load = (lambda: lib().AutoModelForCausalLM.from_pretrained(tmp_path / "model")) if beta else (
        lambda: build_preset("tiny", seed=0)[0])
    options = dict(loss_type=loss_type, per_device_train_batch_size=GROUPS * G // spg, num_generations=G,
                   steps_per_generation=spg, gradient_accumulation_steps=accumulation, max_completion_length=C + 3,
                   beta=beta, **({"use_bias_correction_kl": False} if beta else {}))
    ours, theirs = make_trainer("erpo", load(), tmp_path / "a", **options), make_trainer(
        "trl", load(), tmp_path / "b", **options)
    batch, rewards = hand_built_batch(ours.model)
    for trainer in (ours, theirs):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = is_ratio
    # advantages on the whole generation batch, then TRL's own shuffle and split into micro-batches
    ours_batch = {**batch, "advantages": ours._erpo_token_advantages(batch, rewards)}
    theirs_batch = {**batch, "advantages": trl_advantages(rewards)}
    assert ours_batch["advantages"].shape == (GROUPS * G, C)
    L = lib()
    torch.manual_seed(1)
    ours_micro = L.split_tensor_dict(L.shuffle_sequence_dict(ours_batch), spg)
    torch.manual_seed(1)
    theirs_micro = L.split_tensor_dict(L.shuffle_sequence_dict(theirs_batch), spg)
    assert all(torch.equal(a["completion_ids"], b["completion_ids"]) for a, b in zip(ours_micro, theirs_micro))

    our_losses, our_grads = accumulate(ours, ours_micro, accumulation)
    their_losses, their_grads = accumulate(theirs, theirs_micro, accumulation)
    assert_close(our_losses, their_losses, rtol=1e-5, atol=1e-7, name="micro-batch losses")
    assert sorted(our_grads) == sorted(their_grads)
    for name in their_grads:
        assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-5, scaled=True, name=name)
    assert float(their_grads["model.embed_tokens.weight"].abs().max()) > 1e-3     # a live gradient, not two zeros


def gradients_at_step(model):
    """A callback whose ``steps`` list gets every parameter's accumulated gradient before each optimizer step."""

    class GradientsAtStep(lib().TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    return GradientsAtStep()


def arithmetic_data():
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(4)]
    return lib().Dataset.from_dict({"prompt": prompts, "answer": [str(eval(p[:-1])) for p in prompts]})


def arithmetic_reward(prompts, completions, answer, **_):
    return [float(c.strip().startswith(a)) + 0.1 * (len(c) % 3) for c, a in zip(completions, answer)]


def run_train(kind, out, **options):
    model, tok = build_preset("tiny", seed=0)
    grads = gradients_at_step(model)
    cls, config_cls = classes(kind)
    args = config_cls(output_dir=str(out), learning_rate=1e-2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, logging_steps=1, **{**COMMON, **options})
    trainer = cls(model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=arithmetic_data(),
                  processing_class=tok, callbacks=[grads])
    trainer.train()
    return trainer, grads.steps


@pytest.mark.parametrize("spg,accumulation,steps", [pytest.param(2, 2, 1, id="spg2-ga2"),
                                                    pytest.param(4, 2, 2, id="spg4-ga2-two-steps")])
def test_trl_train_accumulated_grads_equal_trl(tmp_path, spg, accumulation, steps):
    # same seed, same sampling: TRL's generation and shuffle are deterministic on the CPU, so both trainers see
    # the same completions (asserted); SGD keeps a 1e-8 gradient difference from flipping Adam's first step
    options = dict(loss_type="dapo", steps_per_generation=spg, gradient_accumulation_steps=accumulation,
                   max_steps=steps, max_grad_norm=0.0, optim="sgd")
    ours, our_steps = run_train("erpo", tmp_path / "a", erpo_mode="grpo", **options)
    theirs, their_steps = run_train("trl", tmp_path / "b", **options)
    for a, b in zip(ours._buffered_inputs, theirs._buffered_inputs):
        assert torch.equal(a["completion_ids"], b["completion_ids"]) and torch.equal(a["completion_mask"],
                                                                                     b["completion_mask"])
    assert ("old_per_token_logps" in theirs._buffered_inputs[0]) == (spg > accumulation)
    assert len(our_steps) == len(their_steps) == steps
    for step, (mine, theirs_grads) in enumerate(zip(our_steps, their_steps)):
        assert sorted(mine) == sorted(theirs_grads)
        for name in theirs_grads:
            assert_close(mine[name], theirs_grads[name], rtol=1e-4, atol=1e-5, scaled=True, name=f"step {step} {name}")
    assert ours.state.log_history[0]["loss"] == pytest.approx(theirs.state.log_history[0]["loss"], abs=1e-6)


def test_trl_erpo_mode_trains_with_a_frozen_reference(tmp_path):
    trainer, steps = run_train("erpo", tmp_path, erpo_mode="erpo", loss_type="dapo", steps_per_generation=2,
                               gradient_accumulation_steps=2, max_steps=3)
    initial, _ = build_preset("tiny", seed=0)
    logs = [row for row in trainer.state.log_history if "loss" in row and "erpo/gate_mean" in row]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logs)
    assert all(0.0 < row["erpo/gate_mean"] < 1.0 for row in logs)
    # first generation: policy == reference, so the implicit signal lambda * (lp_old - lp_ref) is exactly 0
    assert logs[0]["erpo/progress_signal_abs_mean"] == 0.0 and logs[-1]["erpo/progress_signal_abs_mean"] > 0.1
    assert all(float(g["model.embed_tokens.weight"].abs().max()) > 0 for g in steps)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, initial.state_dict()[n])]
    assert len(moved) == len(list(initial.parameters()))
    batch = trainer._buffered_inputs[0]
    mask = batch["completion_mask"].bool()
    assert bool((batch["advantages"][~mask] == 0).all())
    # the reference is the policy at the start, run by its own weights (a plain deepcopy would call the policy's
    # patched forward); the policy itself has moved away from it
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        hidden = initial.eval()(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                                logits_to_keep=1).hidden_states[-1][:, -batch["completion_ids"].shape[1] - 1:-1]
        expected = token_stats(hidden, initial.lm_head, batch["completion_ids"]).logprobs
        copied, fresh = (m(input_ids=ids, attention_mask=attention).logits for m in (trainer._erpo_reference, initial))
    assert_close(copied, fresh, name="the copy's own forward")
    assert_close(trainer._reference_logprobs(batch)[mask], expected[mask], name="reference log-probs")
    assert float((trainer._sequence_stats(trainer.model, batch)[0] - expected)[mask].abs().max()) > 1e-2


def test_trl_peft_reference_is_the_base_model(tmp_path):
    from peft import LoraConfig     # installed with the test extra (verl depends on it)

    model, tok = build_preset("tiny", seed=0)
    trainer_cls, config_cls = classes("erpo")
    args = config_cls(output_dir=str(tmp_path), erpo_mode="erpo", learning_rate=5e-2, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, steps_per_generation=2,
                          gradient_accumulation_steps=2, max_steps=2, logging_steps=1, **COMMON)
    trainer = trainer_cls(model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=arithmetic_data(),
                          processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["q_proj", "v_proj"]))
    assert trainer._erpo_reference is None      # no copy: the adapters switched off are the reference
    trainer.train()
    batch = trainer._buffered_inputs[0]
    mask, width = batch["completion_mask"].bool(), batch["completion_ids"].shape[1]
    base, _ = build_preset("tiny", seed=0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        hidden = base.eval()(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                             logits_to_keep=1).hidden_states[-1][:, -width - 1:-1]
        expected = token_stats(hidden, base.lm_head, batch["completion_ids"]).logprobs
    assert_close(trainer._reference_logprobs(batch)[mask], expected[mask], name="reference log-probs")
    assert float((trainer._sequence_stats(trainer.model, batch)[0] - expected)[mask].abs().max()) > 1e-2


def test_trl_empty_micro_batch_is_a_connected_zero(tmp_path):
    trainer = make_trainer("erpo", build_preset("tiny", seed=0)[0], tmp_path, per_device_train_batch_size=8,
                           num_generations=G, max_completion_length=C)
    batch, _ = hand_built_batch(trainer.model)
    batch = {k: v[:8] if v.dim() else v for k, v in batch.items()}
    batch.update(completion_mask=torch.zeros_like(batch["completion_mask"]), advantages=torch.zeros(8, C))
    losses, grads = accumulate(trainer, [batch], 1)
    assert float(losses[0]) == 0.0 and grads and all(float(g.abs().max()) == 0.0 for g in grads.values())


@pytest.mark.parametrize("option,value", [
    ("loss_type", "sapo"), ("loss_type", "cispo"), ("scale_rewards", "batch"),
    ("multi_objective_aggregation", "normalize_then_sum"), ("importance_sampling_level", "sequence"),
    ("delta", 2.0), ("top_entropy_quantile", 0.2), ("entropy_coef", 0.01), ("off_policy_mask_threshold", 0.5),
    ("beta", 0.04), ("erpo_mode", "dapo"), ("erpo_gate", "hard"), ("erpo_dual_clip_c", 0.5),
])
def test_trl_unsupported_options_raise_naming_the_option(tmp_path, option, value):
    named = {"beta": "use_bias_correction_kl", "erpo_gate": "gate", "erpo_dual_clip_c": "dual_clip_c"}.get(option,
                                                                                                           option)
    with pytest.raises(ValueError, match=named):
        classes("erpo")[1](output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                           **{**COMMON, option: value})


def test_trl_trainer_needs_its_config(tmp_path):
    args = classes("trl")[1](output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, **COMMON)
    with pytest.raises(ValueError, match="args: got GRPOConfig, expected an ERPOGRPOConfig"):
        classes("erpo")[0](model=build_preset("tiny")[0], reward_funcs=arithmetic_reward, args=args,
                        train_dataset=arithmetic_data(), processing_class=tokenizer())


def test_trl_scaled_logits_raise(tmp_path):
    model = build_preset("tiny", seed=0)[0]
    model.config.final_logit_softcapping = 30.0      # as Gemma 2: erpo_loss has no soft-capping
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        make_trainer("erpo", model, tmp_path, num_generations=4, per_device_train_batch_size=4)


def test_trl_config_maps_trl_options_and_parses(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--erpo_mode", "ep_grpo", "--erpo_gate_gamma", "3.0", "--loss_type",
            "dr_grpo", "--scale_rewards", "none", "--max_completion_length", "12", "--epsilon", "0.1",
            "--temperature", "0.7", "--num_generations", "4", "--per_device_train_batch_size", "4", "--use_cpu",
            "true", "--bf16", "false", "--erpo_gate_scope", "global"]
    (args,) = lib().HfArgumentParser(classes("erpo")[1]).parse_args_into_dataclasses(argv)
    assert args.to_dict()["erpo_gate_gamma"] == 3.0
    from erpo_kernels.integrations.trl_mapping import erpo_config
    config = erpo_config(args)
    assert (config.mode, config.gate_gamma, config.progress, config.aggregation, config.max_length) == (
        "ep_grpo", 3.0, "cum_entropy", "constant", 12)
    assert (config.std_normalize, config.reward_std, config.reward_std_eps) == (False, "unbiased", 1e-4)
    assert (config.eps_low, config.eps_high, config.temperature, config.gate_scope) == (0.1, 0.1, 0.7, "batch")


def test_trl_package_imports_without_trl():
    probe = textwrap.dedent("""
        import sys
        sys.modules["trl"] = None            # as if TRL were not installed
        import erpo_kernels, erpo_kernels.integrations
        assert "ERPOGRPOTrainer" in dir(erpo_kernels.integrations)
        try:
            erpo_kernels.integrations.ERPOGRPOTrainer
        except ImportError as error:
            assert 'pip install "erpo-kernels[trl]"' in str(error), error
        else:
            raise AssertionError("no ImportError without trl")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

