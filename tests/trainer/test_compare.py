"""--compare across seeds (mean +- std table, band plots), its argument checks, and REFT-style first-token
exploration in the HF rollout."""
import json
import re

import pytest
import torch

from erpo_kernels.trainer.cli import main
from erpo_kernels.trainer.compare import mean_std, parse_entries, plan_runs, spread_table
from erpo_kernels.trainer.config import TrainConfig, parse_args
from erpo_kernels.trainer.models import build_preset
from erpo_kernels.trainer.rollout import HFRollout


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/trainer/conftest.py


def test_compare_two_seeds_smoke(tmp_path, capsys):
    """CI smoke test: --compare grpo,erpo --seeds 2 at a tiny budget writes the per-run and the mean +- std
    tables, every spread cell filled, and the four plots."""
    out = tmp_path / "cmp"
    assert main([f"--out_dir={out}", "--compare=grpo,erpo", "--seeds=2", "--seed=3", "--steps=2",
                 "--warmup_steps=20", "--prompts_per_step=2", "--group_size=4", "--micro_batch=8", "--num_eval=4",
                 "--pass_k=2", "--eval_every=1", "--max_new_tokens=6", "--progress=false"]) == 0
    text = (out / "compare.md").read_text()
    assert "seeds 3..4" in text
    summaries = {}
    for algo in ("grpo", "erpo"):
        for seed in (3, 4):
            summary = json.loads((out / algo / f"seed{seed}" / "summary.json").read_text())
            assert summary["algo"] == algo and summary["seed"] == seed and summary["steps"] == 2
            summaries.setdefault(algo, []).append(summary)
    header = next(line for line in text.splitlines() if line.startswith("| algo | seeds |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for algo in ("grpo", "erpo"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {algo} | 2 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns)
        for name, cell in zip(columns[2:], cells[2:]):
            match = re.fullmatch(r"(-?\d+\.?\d*) \+- (\d+\.?\d*)", cell)
            assert match, (name, cell)  # filled: a number +- a number, no nan
        # the cell is the mean and n-1 std of the two runs' summary.json values
        acc = [s["eval_accuracy_end"] for s in summaries[algo]]
        mean = (acc[0] + acc[1]) / 2
        std = abs(acc[0] - acc[1]) / 2 ** 0.5
        assert cells[columns.index("eval acc end")] == f"{mean:.3f} +- {std:.3f}"
        lengths = [s["length_end"] for s in summaries[algo]]
        assert cells[columns.index("length end")].startswith(f"{(lengths[0] + lengths[1]) / 2:.3f} +- ")
    assert len([line for line in text.splitlines() if re.match(r"\| (grpo|erpo) \| [34] \|", line)]) == 4
    for name in ("reward.png", "eval_accuracy.png", "entropy.png", "response_length.png"):
        assert (out / name).stat().st_size > 1000
    assert "+-" in capsys.readouterr().out


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sum of squares 2, over n-1 = 2
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([None, 4.0, 2.0]) == pytest.approx((3.0, 2 ** 0.5))
    table = spread_table({"a": [{"reward_end": 1.0, "eval_accuracy_start": 0.0, "eval_accuracy_end": 0.5,
                                 "pass_at_k_end": 1.0, "entropy_start": 0.3, "entropy_end": 0.2, "length_end": 4.0,
                                 "wall_time_s": 3},
                                {"reward_end": 0.0, "eval_accuracy_start": 0.0, "eval_accuracy_end": 0.25,
                                 "pass_at_k_end": 1.0, "entropy_start": 0.5, "entropy_end": 0.4, "length_end": 6.0,
                                 "wall_time_s": 5}]},
                         pass_k=4)
    assert "| a | 2 | 0.500 +- 0.707 | 0.000 +- 0.000 | 0.375 +- 0.177 | 1.000 +- 0.000 | 0.400 +- 0.141 | " \
           "0.300 +- 0.141 | 5.000 +- 1.414 | 4 +- 1 |" in table
    assert "pass@4 end" in table


@pytest.mark.parametrize("argv,name", [(["--seeds=0"], "seeds"), (["--jobs=0"], "jobs"),
                                       (["--first_token_top_n=-1"], "first_token_top_n"),
                                       (["--seeds=2"], "seeds"),  # more than one seed needs --compare
                                       (["--first_token_top_n=4", "--rollout=vllm"], "first_token_top_n")])
def test_bad_arguments_name_the_argument(argv, name):
    with pytest.raises(ValueError, match=name):
        parse_args(argv)


def test_compare_entries():
    assert parse_entries("grpo, erpo,erpo+ft4,erpo+progress_eta=0+ft2") == [
        ("grpo", "grpo", {}), ("erpo", "erpo", {}), ("erpo+ft4", "erpo", {"first_token_top_n": 4}),
        ("erpo+progress_eta=0+ft2", "erpo", {"progress_eta": 0.0, "first_token_top_n": 2})]
    for bad in ("erpo", "grpo,nope", "grpo,erpo+ft0", "grpo,erpo+x4", "grpo,grpo", "grpo,erpo+seed=3",
                "grpo,erpo+progress_eta=abc", "grpo,erpo+nope=1"):
        with pytest.raises(ValueError, match="--compare"):
            parse_entries(bad)
    assert main(["--compare=grpo,erpo+top4"]) == 2
    cfg = parse_args(["--compare=grpo,erpo+ft4+progress_eta=0", "--seeds=2", "--seed=5", "--steps=7", "--out_dir=o"])
    plan = plan_runs(cfg, parse_entries(cfg.compare))
    assert [(label, seed) for label, seed, _ in plan] == [("grpo", 5), ("erpo+ft4+progress_eta=0", 5),
                                                          ("grpo", 6), ("erpo+ft4+progress_eta=0", 6)]
    for label, seed, run in plan:
        assert run.seed == seed and run.steps == 7 and run.compare == "" and run.seeds == 1
        assert run.out_dir == f"o/{label}/seed{seed}"
        assert (run.algo, run.first_token_top_n, run.progress_eta) == (
            ("grpo", 0, 0.2) if label == "grpo" else ("erpo", 4, 0.0))


def test_first_token_is_uniform_over_the_top_n_and_the_rest_is_sampled():
    """A random-init model is close to uniform over the vocabulary, so plain sampling would spread the first
    token over many ids; with top-N the first token is one of the model's own N best, each about 1/N of the
    time, while the second token still spreads over far more than N ids."""
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny", seed=0)
    prompt, n, rows = "Q: 1+2=?\nA:", 3, 600
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = set(model(ids).logits[0, -1].topk(n).indices.tolist())
    rollout = HFRollout(tokenizer).generate(model, [prompt], rows, 1.0, 4, first_token_top_n=n)
    first, second = rollout.targets[:, 0], rollout.targets[:, 1]
    assert set(first.tolist()) == top
    counts = [int((first == t).sum()) for t in top]
    assert min(counts) > rows / n * 0.75, counts  # uniform: ~200 each (binomial sd ~12)
    assert len(set(second[first != tokenizer.eos_token_id].tolist())) > 4 * n
    assert rollout.completion_mask[:, 0].eq(1).all()
    plain = HFRollout(tokenizer).generate(model, [prompt], rows, 1.0, 2)
    assert len(set(plain.targets[:, 0].tolist())) > 4 * n  # without the option the first token is not limited
    with pytest.raises(ValueError, match="first_token_top_n"):
        HFRollout(tokenizer).generate(model, [prompt], 2, 1.0, 4, first_token_top_n=-2)


def test_train_with_first_token_top_n(tmp_path, monkeypatch):
    """The option reaches the training rollouts (every sampled first token among the policy's top-2)."""
    from erpo_kernels.trainer.train import train

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=1, warmup_steps=0, prompts_per_step=2, group_size=4,
                      micro_batch=8, num_eval=2, pass_k=1, eval_every=0, ckpt_every=0, max_new_tokens=3,
                      first_token_top_n=2, progress=False)
    seen = []
    original = HFRollout.generate

    def spy(self, model, prompts, group_size, temperature, max_new_tokens, greedy=False, first_token_top_n=0):
        seen.append(first_token_top_n)
        return original(self, model, prompts, group_size, temperature, max_new_tokens, greedy, first_token_top_n)

    monkeypatch.setattr(HFRollout, "generate", spy)
    train(cfg)
    assert 2 in seen  # the training rollout
    assert all(n in (0, 2) for n in seen) and 0 in seen  # evaluation samples plainly


def test_jobs_2_gives_the_same_runs_as_one_by_one(tmp_path):
    """--jobs 2 (spawned processes) trains the same runs as --jobs 1: every summary equal but the wall time."""
    common = ["--compare=grpo,erpo", "--steps=1", "--warmup_steps=5", "--prompts_per_step=2", "--group_size=2",
              "--micro_batch=4", "--num_eval=2", "--pass_k=1", "--eval_every=0", "--ckpt_every=0",
              "--max_new_tokens=4", "--progress=false"]
    for jobs in (1, 2):
        assert main([f"--out_dir={tmp_path / str(jobs)}", f"--jobs={jobs}", *common]) == 0
    for algo in ("grpo", "erpo"):
        one, two = (json.loads((tmp_path / str(j) / algo / "summary.json").read_text()) for j in (1, 2))
        one.pop("wall_time_s"), two.pop("wall_time_s")
        assert one == two and one["algo"] == algo
