"""Held-out evaluation: greedy accuracy and pass@k on problems never used for training."""
from __future__ import annotations

from erpo_kernels.trainer.tasks import is_correct


def evaluate(engine, model, problems, pass_k: int, temperature: float, max_new_tokens: int,
             batch_size: int = 64) -> dict:
    """{"eval_accuracy": greedy accuracy, "eval_pass@k": share of problems with a correct one of k samples}."""
    greedy_hits, any_hits = 0, 0
    prompts_per_batch = max(1, batch_size // max(1, pass_k))
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        greedy = engine.generate(model, [p.prompt for p in chunk], 1, temperature, max_new_tokens, greedy=True)
        greedy_hits += sum(is_correct(p, text) for p, text in zip(chunk, greedy.completions))
    for start in range(0, len(problems), prompts_per_batch):
        chunk = problems[start:start + prompts_per_batch]
        sampled = engine.generate(model, [p.prompt for p in chunk], pass_k, temperature, max_new_tokens)
        for i, problem in enumerate(chunk):
            samples = sampled.completions[i * pass_k:(i + 1) * pass_k]
            any_hits += any(is_correct(problem, text) for text in samples)
    n = max(1, len(problems))
    return {"eval_accuracy": greedy_hits / n, f"eval_pass@{pass_k}": any_hits / n}
