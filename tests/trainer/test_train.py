"""The trainer on a real (tiny, randomly initialised) transformers model: no mocks."""
import json
import os

import pytest
import torch

import transformers  # noqa: F401  (a dependency of the test extra: missing it is a failure, not a skip)

from erpo_kernels import erpo_loss  # noqa: E402
from erpo_kernels.trainer.checkpoint import read_metrics  # noqa: E402
from erpo_kernels.trainer.cli import main  # noqa: E402
from erpo_kernels.trainer.config import TrainConfig  # noqa: E402
from erpo_kernels.trainer.models import backbone_and_head, build_preset, load_model, save_model  # noqa: E402
from erpo_kernels.trainer.rollout import HFRollout, _assemble, encode_prompts, policy_hidden  # noqa: E402
from erpo_kernels.trainer.tasks import TaskSource, reward  # noqa: E402
from erpo_kernels.trainer.train import guarded_step, loss_config, sequence_stats, train, update  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/trainer/conftest.py


# small budgets: every run here takes seconds on one CPU thread
FAST = dict(warmup_steps=40, warmup_batch=16, prompts_per_step=4, group_size=4, micro_batch=8,
            num_eval=8, pass_k=2, eval_every=2, ckpt_every=0, max_new_tokens=8, progress=False)


def fixed_batch(tokenizer, group_size=4):
    """4 prompts x G completions, half right half wrong in every group (so every group has signal)."""
    problems = TaskSource("arith", level=1, seed=0).batch(0, 4)
    rows, texts = [], []
    for problem in problems:
        for g in range(group_size):
            rows.append(problem.prompt)
            texts.append(problem.solution if g % 2 == 0 else f" #{int(problem.answer) + 1 + g}")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, rows, "cpu")
    completion = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, completion))
    ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completion])
    rollout = _assemble(prompt_ids, prompt_mask, ids, tokenizer)
    rewards = torch.tensor([reward(problems[i // group_size], t) for i, t in enumerate(rollout.completions)])
    assert rollout.completions == texts and rewards.tolist() == [1.0, 0.0] * (2 * len(problems))
    return rollout, rewards


@pytest.mark.parametrize("algo", ["erpo", "grpo", "dr_grpo"])
def test_one_rl_step_changes_weights_and_lowers_loss(algo):
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny", seed=0)
    cfg = TrainConfig(algo=algo, group_size=4, micro_batch=8, lr=1e-3, kl_beta=0.02)
    config = loss_config(cfg)
    rollout, rewards = fixed_batch(tokenizer)
    old = sequence_stats(model, rollout, cfg.temperature)
    reference = build_preset("tiny", seed=0)[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the reference drifted from the policy, so the progress term and the KL are live
        for p in reference.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    ref = sequence_stats(reference, rollout, cfg.temperature)
    assert float((ref.logprobs - old.logprobs).abs().max()) > 1e-2
    _, lm_head = backbone_and_head(model)

    def batch_loss():
        with torch.no_grad():
            return float(erpo_loss(policy_hidden(model, rollout), lm_head, rollout.targets, rollout.completion_mask,
                                   rewards, group_size=4, old_logprobs=old.logprobs, old_entropy=old.entropy,
                                   ref_logprobs=ref.logprobs, config=config).loss)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = batch_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    metrics = update(model, optimizer, rollout, rewards, old, ref, cfg, config)
    assert metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    assert metrics["kl"] > 0
    if config.progress_term:
        assert metrics["progress_signal_abs_mean"] > 0.1
    assert metrics["loss"] == pytest.approx(loss_before, abs=1e-5)  # micro-batch shares add up to the batch loss
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert batch_loss() < loss_before - 1e-4


def test_micro_batches_that_split_groups_give_the_same_update():
    """update() computes the advantages on the whole batch and passes a global normalizer, so a micro-batch of
    3 rows (groups of 4 split across micro-batches) gives the gradient of one 16-row micro-batch."""
    grads = []
    for micro_batch in (16, 3):
        torch.manual_seed(0)
        model, tokenizer = build_preset("tiny", seed=0)
        cfg = TrainConfig(group_size=4, micro_batch=micro_batch, lr=0.0, grad_clip=0.0)
        rollout, rewards = fixed_batch(tokenizer)
        old = sequence_stats(model, rollout, cfg.temperature)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics = update(model, optimizer, rollout, rewards, old, None, cfg, loss_config(cfg))
        grads.append((metrics["loss"], [p.grad.clone() for p in model.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    for a, b in zip(grad_a, grad_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_gradient_is_skipped_and_reported():
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny", seed=0)
    cfg = TrainConfig(group_size=4, micro_batch=8)
    rollout, rewards = fixed_batch(tokenizer)
    old = sequence_stats(model, rollout, cfg.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = model.get_decoder().layers[0].mlp.up_proj.weight
    handle = bad.register_hook(lambda grad: grad * float("nan"))  # a real NaN in the backward pass
    metrics = update(model, optimizer, rollout, rewards, old, None, cfg, loss_config(cfg))
    handle.remove()
    assert metrics["skipped"] == 1 and not torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state  # Adam moments untouched: the next good step is unaffected
    assert guarded_step(model, optimizer, loss_is_finite=False, grad_clip=1.0)[0] is False
    metrics = update(model, optimizer, rollout, rewards, old, None, cfg, loss_config(cfg))
    assert metrics["skipped"] == 0


def test_preset_saves_as_a_real_hf_model_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = build_preset("tiny-llama", seed=1)
    save_model(model, tokenizer, str(tmp_path))
    loaded_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    text = "Q: Ann has 3 pens, gets 4 and loses 1. How many pens?\nA: 3+4=7;7-1=6#6"
    ids = loaded_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and loaded_tok.decode(ids) == text
    assert loaded_tok.decode(ids + [loaded_tok.eos_token_id], skip_special_tokens=True) == text
    assert loaded.config.head_dim >= 32 and type(loaded).__name__ == "LlamaForCausalLM"
    x = torch.tensor([ids])
    assert torch.equal(loaded(x).logits, model(x).logits)
    again, _, is_preset = load_model(str(tmp_path))
    assert not is_preset and torch.equal(again(x).logits, model(x).logits)


def test_hf_rollout_layout():
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny", seed=0)
    prompts = ["Q: 1+2=?\nA:", "Q: Ann has 3 pens and gets 4 more. How many pens?\nA:"]
    rollout = HFRollout(tokenizer).generate(model, prompts, 3, 1.0, 6)
    B, C = rollout.targets.shape
    assert B == 6 and C <= 6 and rollout.sequences.shape[1] == rollout.prompt_length + C
    assert rollout.sequences[0, 0] == tokenizer.pad_token_id  # the short prompt is left-padded
    eos = (rollout.targets == tokenizer.eos_token_id)
    for row in range(B):  # mask covers tokens up to and including the first EOS, nothing after
        n = int(rollout.completion_mask[row].sum())
        first = int(eos[row].float().argmax()) if eos[row].any() else C
        assert n == min(first + 1, C)
    stats = sequence_stats(model, rollout, 1.0)
    assert stats.logprobs.shape == (B, C) and bool((stats.logprobs <= 0).all())


def write_pool(path, n=20, seed=0):
    """A local JSONL task: n level-1 arithmetic problems with worked solutions."""
    import random
    from erpo_kernels.trainer.tasks import make_arith
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = make_arith(rng, 1)
            question = p.prompt[len("Q: "):-len("\nA:")]
            f.write(json.dumps({"prompt": question, "answer": p.answer, "solution": p.solution}) + "\n")
    return str(path)


def test_short_run_raises_reward(tmp_path):
    """RL alone (after a short warm-up) raises the reward on a small pool of problems."""
    task = write_pool(tmp_path / "pool.jsonl", n=10)  # 8 training problems, 2 held out
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), task=task, seed=0, steps=30, warmup_steps=60,
                      prompts_per_step=8, group_size=8, micro_batch=64, lr=5e-4, eval_every=0, num_eval=4,
                      pass_k=2, ckpt_every=0, max_new_tokens=8, progress=False)
    summary = train(cfg)
    rows = [r for r in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")) if "reward" in r]
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert 0.05 < first < 0.9, first  # the warm-up gives a non-zero, imperfect start
    assert last > first + 0.08, (first, last)  # measured: 0.44 -> 0.61 (seed 0)
    assert summary["skipped_updates"] == 0


@pytest.mark.parametrize("algo", ["erpo", "grpo"])
def test_resume_equals_uninterrupted_run(tmp_path, algo):
    task = write_pool(tmp_path / "pool.jsonl")  # warm-up gives non-zero rewards, so the updates move weights
    straight = TrainConfig(out_dir=str(tmp_path / "straight"), algo=algo, steps=4, task=task,
                           **{**FAST, "warmup_steps": 100, "warmup_batch": 32, "prompts_per_step": 8, "num_eval": 4})
    train(straight)
    split = straight.replace(out_dir=str(tmp_path / "split"), stop_after=2)
    train(split)
    assert [r["step"] for r in read_metrics(os.path.join(split.out_dir, "metrics.jsonl"))] == [0, 1, 2]
    train(split.replace(stop_after=0, resume=True))
    a, _, _ = load_model(os.path.join(straight.out_dir, "ckpt"))
    b, _, _ = load_model(os.path.join(split.out_dir, "ckpt"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    def rows(run):  # everything but the wall-clock time
        path = os.path.join(run.out_dir, "metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "step_time"} for r in read_metrics(path)]

    rows_a, rows_b = rows(straight), rows(split)
    assert rows_a == rows_b
    assert any(r.get("grad_norm", 0) > 0 for r in rows_a[3:])  # steps after the resume did update
    state_a = torch.load(os.path.join(straight.out_dir, "ckpt", "trainer_state.pt"), weights_only=False)
    state_b = torch.load(os.path.join(split.out_dir, "ckpt", "trainer_state.pt"), weights_only=False)
    assert state_a["step"] == state_b["step"] == 4
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], state_b["optimizer"]["state"][key]["exp_avg"])


def test_cli_compare_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([f"--out_dir={out}", "--compare=grpo,erpo", "--steps=2", "--warmup_steps=20",
                 "--prompts_per_step=2", "--group_size=4", "--micro_batch=8", "--num_eval=4", "--pass_k=2",
                 "--max_new_tokens=6", "--progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "| grpo |" in printed and "| erpo |" in printed and "erpo-train summary" in printed
    table = (out / "compare.md").read_text()
    assert "| algo |" in table and "| grpo |" in table and "| erpo |" in table
    for name in ("reward.png", "eval_accuracy.png", "entropy.png", "response_length.png"):
        assert (out / name).stat().st_size > 1000
    for algo in ("grpo", "erpo"):
        summary = json.loads((out / algo / "summary.json").read_text())
        assert summary["algo"] == algo and summary["steps"] == 2
    assert main(["--nope=1"]) == 2


def test_advantage_metrics_by_hand():
    """The entropy-dynamics diagnostics on a hand-made batch (one group of 2 rows, 3 tokens)."""
    from erpo_kernels.advantages import Advantages
    from erpo_kernels.trainer.train import advantage_metrics

    mask = torch.tensor([[1., 1., 0.], [1., 1., 1.]])
    adv = Advantages(advantages=torch.tensor([[0.6, -0.2, 9.0], [-0.3, -0.5, 0.0]]),
                     gate=torch.full((2, 3), 0.5), seq_advantage=torch.tensor([1.0, -1.0]),
                     bucket=torch.tensor([[0, 1, 0], [0, 0, 1]]), signal=torch.zeros(2, 3),
                     zero_var=torch.tensor([False, False]))
    old_logprobs = torch.tensor([[-1.0, -2.0, -7.0], [-3.0, -1.0, -2.0]])
    m = advantage_metrics(adv, mask, group_size=2, old_logprobs=old_logprobs)
    assert m["outcome_share"] == pytest.approx(2.5 / 1.6)      # |0.5| x 5 tokens over |A| summed
    assert m["progress_flip_frac"] == pytest.approx(0.25)      # -0.2 against +0.5; the 0.0 token is not live
    assert m["bucket_cell_tokens"] == pytest.approx(2.5)       # cells of 3 and 2 tokens
    assert m["bucket_thin_frac"] == 0.0
    assert m["cov_logp_adv"] == pytest.approx(0.096)           # by hand: sum of 5 centred products / 5
    assert m["zero_var_groups"] == 0.0 and m["gate_mean"] == pytest.approx(0.5)


def test_lr_warmup_ramps_the_rl_learning_rate(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=3, lr=1e-3, lr_warmup_steps=2, warmup_steps=0,
                      prompts_per_step=1, group_size=2, micro_batch=4, num_eval=1, pass_k=1, eval_every=0,
                      ckpt_every=0, max_new_tokens=3, progress=False)
    train(cfg)
    lrs = [r["lr"] for r in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")) if "lr" in r]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        TrainConfig(lr_warmup_steps=-1)
