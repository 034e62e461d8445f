"""Run summaries, ``--compare`` (one run per algorithm, same seed and budget) and plots.

    erpo-train --compare grpo,erpo     # out_dir/<algo>/ per run, out_dir/compare.md, out_dir/*.png
"""
from __future__ import annotations

import json
import os
import time

from erpo_kernels.trainer.checkpoint import read_metrics
from erpo_kernels.trainer.config import TrainConfig

# (metrics key, plot title, file name)
PLOTS = [("reward", "training reward", "reward.png"),
         ("eval_accuracy", "held-out greedy accuracy", "eval_accuracy.png"),
         ("entropy", "policy entropy (sampled tokens)", "entropy.png"),
         ("response_length", "response length (tokens)", "response_length.png")]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarize(cfg: TrainConfig, metrics_path: str, wall_time: float, warmup_losses=(), window: int = 10,
              echo: bool = True) -> dict:
    """Start -> end of reward, held-out accuracy, entropy and length; printed and saved as summary.json."""
    rows = read_metrics(metrics_path)
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval_accuracy" in r]
    pass_key = f"eval_pass@{cfg.pass_k}"
    first, last = train_rows[:window], train_rows[-window:]
    summary = {
        "algo": cfg.algo, "model": cfg.model, "task": cfg.task, "level": cfg.level, "seed": cfg.seed,
        "steps": train_rows[-1]["step"] if train_rows else 0, "wall_time_s": round(wall_time, 1),
        "warmup_final_loss": warmup_losses[-1] if warmup_losses else None,
        "reward_start": _mean(r["reward"] for r in first), "reward_end": _mean(r["reward"] for r in last),
        "entropy_start": _mean(r["entropy"] for r in first), "entropy_end": _mean(r["entropy"] for r in last),
        "length_start": _mean(r["response_length"] for r in first),
        "length_end": _mean(r["response_length"] for r in last),
        "eval_accuracy_start": eval_rows[0]["eval_accuracy"] if eval_rows else None,
        "eval_accuracy_end": eval_rows[-1]["eval_accuracy"] if eval_rows else None,
        "pass_at_k_start": eval_rows[0].get(pass_key) if eval_rows else None,
        "pass_at_k_end": eval_rows[-1].get(pass_key) if eval_rows else None,
        "skipped_updates": int(sum(r.get("skipped", 0) for r in train_rows)),
    }
    with open(os.path.join(os.path.dirname(metrics_path), "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if echo:
        print(format_summary(summary, cfg.pass_k), flush=True)
    return summary


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def format_summary(s: dict, pass_k: int) -> str:
    rows = [("reward (train, mean of first/last 10 steps)", "reward_start", "reward_end"),
            ("held-out greedy accuracy", "eval_accuracy_start", "eval_accuracy_end"),
            (f"held-out pass@{pass_k}", "pass_at_k_start", "pass_at_k_end"),
            ("policy entropy", "entropy_start", "entropy_end"),
            ("response length (tokens)", "length_start", "length_end")]
    lines = [f"== erpo-train summary: {s['algo']} on {s['task']} (level {s['level']}), model {s['model']}, "
             f"{s['steps']} steps, {s['wall_time_s']:.0f} s =="]
    lines += [f"{label + ':':<46} {_fmt(s[start])} -> {_fmt(s[end])}" for label, start, end in rows]
    if s["skipped_updates"]:
        lines.append(f"skipped updates (NaN/inf): {s['skipped_updates']}")
    return "\n".join(lines)


def compare_table(summaries: list, pass_k: int) -> str:
    """A markdown table, one row per algorithm."""
    head = ("| algo | reward start | reward end | eval acc start | eval acc end | pass@{k} end | "
            "entropy end | length end | skipped | time (s) |").format(k=pass_k)
    rule = "|" + "---|" * 10
    body = [f"| {s['algo']} | {_fmt(s['reward_start'])} | {_fmt(s['reward_end'])} | "
            f"{_fmt(s['eval_accuracy_start'])} | {_fmt(s['eval_accuracy_end'])} | {_fmt(s['pass_at_k_end'])} | "
            f"{_fmt(s['entropy_end'])} | {_fmt(s['length_end'])} | {s['skipped_updates']} | "
            f"{s['wall_time_s']:.0f} |" for s in summaries]
    return "\n".join([head, rule] + body)


def plot_runs(runs: dict, out_dir: str, smooth: int = 10) -> list:
    """One PNG per metric (reward, held-out accuracy, entropy, length vs step), a line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, title, name in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            if key != "eval_accuracy" and len(values) > smooth:  # running mean: per-step values are noisy
                values = [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
                          for i in range(len(values))]
            ax.plot(steps, values, label=label, marker="o" if key == "eval_accuracy" else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(cfg: TrainConfig, algos: list) -> dict:
    """Train one run per algorithm (same seed, budget and warm-up), then table + plots in out_dir."""
    from erpo_kernels.trainer.train import train

    start = time.time()
    summaries, runs = [], {}
    for algo in algos:
        run_cfg = cfg.replace(algo=algo, compare="", out_dir=os.path.join(cfg.out_dir, algo))
        print(f"\n### {algo} -> {run_cfg.out_dir}", flush=True)
        summaries.append(train(run_cfg))
        runs[algo] = read_metrics(os.path.join(run_cfg.out_dir, "metrics.jsonl"))
    table = compare_table(summaries, cfg.pass_k)
    plots = plot_runs(runs, cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(f"# erpo-train --compare {','.join(algos)} (seed {cfg.seed}, {cfg.steps} steps, "
                f"{cfg.model}, task {cfg.task} level {cfg.level})\n\n{table}\n\n")
        f.write("\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n")
    print(f"\n{table}\n\nplots: {', '.join(plots)}\ntotal {time.time() - start:.0f} s", flush=True)
    return {"summaries": summaries, "table": table, "plots": plots}
