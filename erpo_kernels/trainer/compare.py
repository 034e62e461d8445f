"""Run summaries, ``--compare`` (one run per algorithm, same seed and budget) and plots.

    erpo-train --compare grpo,erpo     # out_dir/<algo>/ per run, out_dir/compare.md, out_dir/*.png
    erpo-train --compare grpo,erpo,ep_grpo,erpo+ft4 --seeds 3 --jobs 2
                                       # out_dir/<label>/seed<s>/; compare.md adds mean +- std across seeds
"""
from __future__ import annotations

import json
import os
import time
import typing

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
    """A markdown table, one row per run."""
    head = ("| algo | seed | reward start | reward end | eval acc start | eval acc end | pass@{k} end | "
            "entropy end | length end | skipped | time (s) |").format(k=pass_k)
    rule = "|" + "---|" * 11
    body = [f"| {s.get('label', s['algo'])} | {s['seed']} | {_fmt(s['reward_start'])} | {_fmt(s['reward_end'])} | "
            f"{_fmt(s['eval_accuracy_start'])} | {_fmt(s['eval_accuracy_end'])} | {_fmt(s['pass_at_k_end'])} | "
            f"{_fmt(s['entropy_end'])} | {_fmt(s['length_end'])} | {s['skipped_updates']} | "
            f"{s['wall_time_s']:.0f} |" for s in summaries]
    return "\n".join([head, rule] + body)


# (summary key, column title) of the across-seeds table
SPREAD_COLUMNS = [("reward_end", "train reward end"), ("eval_accuracy_start", "eval acc start"),
                  ("eval_accuracy_end", "eval acc end"), ("pass_at_k_end", "pass@{k} end"),
                  ("entropy_start", "entropy start"), ("entropy_end", "entropy end"), ("length_end", "length end"),
                  ("wall_time_s", "time (s)")]


def mean_std(values) -> tuple:
    """(mean, sample std with n-1; 0.0 for one value) of the non-missing values; (nan, nan) if none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def spread_table(groups: dict, pass_k: int) -> str:
    """Markdown: one row per algorithm, each cell mean +- std (n-1) across its seeds' summaries."""
    head = "| algo | seeds | " + " | ".join(t.format(k=pass_k) for _, t in SPREAD_COLUMNS) + " |"
    rule = "|" + "---|" * (len(SPREAD_COLUMNS) + 2)
    body = []
    for label, summaries in groups.items():
        cells = []
        for key, _ in SPREAD_COLUMNS:
            mean, std = mean_std(s[key] for s in summaries)
            digits = 0 if key == "wall_time_s" else 3
            cells.append(f"{mean:.{digits}f} +- {std:.{digits}f}")
        body.append(f"| {label} | {len(summaries)} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule] + body)


def _smoothed(values, smooth: int) -> list:
    return [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
            for i in range(len(values))]


def plot_runs(runs: dict, out_dir: str, smooth: int = 10) -> list:
    """One PNG per metric (reward, held-out accuracy, entropy, length vs step). ``runs`` maps a label to one
    run's metric rows, or to a list of runs (seeds): then the line is the mean across seeds and the band
    mean +- std (n-1). Per-step metrics are smoothed by a running mean over ``smooth`` steps first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, title, name in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        banded = False
        for label, value in runs.items():
            seeds = value if value and isinstance(value[0], list) else [value]
            curves = []
            for rows in seeds:
                points = dict((r["step"], r[key]) for r in rows if r.get(key) is not None)
                if points and key != "eval_accuracy" and len(points) > smooth:  # per-step values are noisy
                    points = dict(zip(points, _smoothed(list(points.values()), smooth)))
                curves.append(points)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            stats = [mean_std(c[step] for c in curves) for step in steps]
            mean = [m for m, _ in stats]
            line, = ax.plot(steps, mean, label=label if len(curves) == 1 else f"{label} (n={len(curves)})",
                            marker="o" if key == "eval_accuracy" else None)
            if len(curves) > 1:
                ax.fill_between(steps, [m - sd for m, sd in stats], [m + sd for m, sd in stats],
                                color=line.get_color(), alpha=0.2, linewidth=0)
                banded = True
        ax.set_xlabel("step")
        ax.set_title(title + (" (mean, band +- std across seeds)" if banded else ""), fontsize=9 if banded else 10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_entries(text: str) -> list:
    """``"grpo,erpo,erpo+ft4,erpo+progress_eta=0"`` -> [(label, algo, {field: value})]: ALGO, then any number of
    ``+ftN`` (first_token_top_n=N) or ``+field=value`` (a TrainConfig field); ValueError naming --compare."""
    from erpo_kernels.trainer.config import ALGOS, TrainConfig, _convert

    hints = typing.get_type_hints(TrainConfig)
    entries = []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        algo, *extras = label.split("+")
        if algo not in ALGOS:
            raise ValueError(f"--compare: entry {label!r}: algo must be one of {ALGOS}")
        changes = {}
        for extra in extras:
            key, has_value, value = extra.partition("=")
            if not has_value and key.startswith("ft") and key[2:].isdigit() and int(key[2:]) > 0:
                changes["first_token_top_n"] = int(key[2:])
            elif has_value and key in hints and key not in ("algo", "compare", "seed", "seeds", "jobs", "out_dir"):
                try:
                    changes[key] = _convert(key, hints[key], value)
                except ValueError as e:
                    raise ValueError(f"--compare: entry {label!r}: {e}") from None
            else:
                raise ValueError(f"--compare: entry {label!r}: expected ALGO[+ftN][+field=value...] (N >= 1)")
        entries.append((label, algo, changes))
    labels = [e[0] for e in entries]
    if len(entries) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"--compare needs two or more distinct entries of {ALGOS} (or ALGO+ftN), got {text!r}")
    return entries


def plan_runs(cfg: TrainConfig, entries: list) -> list:
    """[(label, seed, run config)]: every entry on every seed, same budget; seed-major order."""
    plan = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for label, algo, extra in entries:
            out = os.path.join(cfg.out_dir, label) if cfg.seeds == 1 else os.path.join(cfg.out_dir, label, f"seed{seed}")
            plan.append((label, seed, cfg.replace(**extra, algo=algo, compare="", seeds=1, jobs=1, seed=seed,
                                                  out_dir=out)))
    return plan


def _run(run_cfg: TrainConfig) -> dict:
    from erpo_kernels.trainer.train import train

    return train(run_cfg)


def compare(cfg: TrainConfig, algos: list) -> dict:
    """Train every entry of ``algos`` (names, or (label, algo, changes) from ``parse_entries``) on the
    same seeds (cfg.seed ... cfg.seed + cfg.seeds - 1), budget and warm-up; ``cfg.jobs`` runs at once in
    separate processes. Writes out_dir/<label>/ (one seed) or out_dir/<label>/seed<s>/ per run, then
    compare.md (per-run table, and mean +- std across seeds when seeds > 1) and the PNG plots."""
    entries = [e if isinstance(e, tuple) else (e, e, {}) for e in algos]
    start = time.time()
    plan = plan_runs(cfg, entries)
    results = {}
    if cfg.jobs == 1:
        for label, seed, run_cfg in plan:
            print(f"\n### {label} seed {seed} -> {run_cfg.out_dir}", flush=True)
            results[(label, seed)] = _run(run_cfg)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from tqdm.auto import tqdm

        print(f"{len(plan)} runs, {cfg.jobs} at a time (per-run output quiet; summaries in each out_dir)", flush=True)
        with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run, run_cfg.replace(progress=False)): (label, seed)
                       for label, seed, run_cfg in plan}
            bar = tqdm(as_completed(futures), total=len(futures), desc="compare runs", disable=not cfg.progress,
                       dynamic_ncols=True)
            for future in bar:
                label, seed = futures[future]
                results[(label, seed)] = future.result()
                bar.write(f"done: {label} seed {seed} ({results[(label, seed)]['wall_time_s']:.0f} s)")
    report = write_report(cfg, entries, plan)
    print(f"\n{report['spread'] or report['table']}\n\nplots: {', '.join(report['plots'])}\n"
          f"total {time.time() - start:.0f} s", flush=True)
    return report


def write_report(cfg: TrainConfig, entries: list, plan: list) -> dict:
    """compare.md and the plots in cfg.out_dir from the runs' summary.json and metrics.jsonl on disk."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    summaries, groups, runs = [], {}, {}
    for label, seed, run_cfg in plan:
        with open(os.path.join(run_cfg.out_dir, "summary.json")) as f:
            summary = dict(json.load(f), label=label)
        summaries.append(summary)
        groups.setdefault(label, []).append(summary)
        runs.setdefault(label, []).append(read_metrics(os.path.join(run_cfg.out_dir, "metrics.jsonl")))
    summaries.sort(key=lambda s: ([e[0] for e in entries].index(s["label"]), s["seed"]))
    table = compare_table(summaries, cfg.pass_k)
    spread = spread_table(groups, cfg.pass_k)
    plots = plot_runs(runs if cfg.seeds > 1 else {k: v[0] for k, v in runs.items()}, cfg.out_dir)
    seed_text = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(f"# erpo-train --compare {','.join(e[0] for e in entries)} ({seed_text}, {cfg.steps} steps, "
                f"{cfg.model}, task {cfg.task} level {cfg.level})\n\n")
        if cfg.seeds > 1:
            f.write(f"Mean +- std (n-1) across {cfg.seeds} seeds; starts and ends are means of the first / last "
                    f"10 steps (reward, entropy, length) or the first / final evaluation (accuracy, pass@k)."
                    f"\n\n{spread}\n\nPer run:\n\n")
        f.write(f"{table}\n\n")
        f.write("\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots) + "\n")
    return {"summaries": summaries, "table": table, "spread": spread if cfg.seeds > 1 else None, "plots": plots}
