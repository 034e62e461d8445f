"""Task generators and checkers: right answers pass, wrong and malformed ones score 0."""
import json
import random
import re

import pytest

from erpo_kernels.trainer.config import TrainConfig, parse_args
from erpo_kernels.trainer.tasks import (GENERATORS, Problem, TaskSource, check_countdown, check_integer,
                                        check_math, is_correct, is_well_formed, load_jsonl, reward, safe_eval)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("level", [1, 2, 3])
def test_generated_solutions_are_correct_and_well_formed(kind, level):
    rng = random.Random(level)
    for _ in range(200):
        problem = GENERATORS[kind](rng, level)
        assert problem.prompt.startswith("Q: ") and problem.prompt.endswith("\nA:")
        assert is_correct(problem, problem.solution), problem
        assert is_well_formed(problem.solution), problem
        assert reward(problem, problem.solution, format_weight=0.1) == pytest.approx(1.1)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arith_level_is_the_number_of_operators(level):
    rng = random.Random(level)
    for _ in range(50):
        problem = GENERATORS["arith"](rng, level)
        expression = problem.prompt[len("Q: "):-len("=?\nA:")]
        assert sum(c in "+-*" for c in expression) == level  # operands are non-negative
        assert problem.solution.count("=") == (level if level > 1 else 0)  # one worked step per operator


@pytest.mark.parametrize("completion,ok", [
    (" 4*2=8;3+8=11#11", True),
    (" #11", True),
    ("#11 ", True),
    (" #12", False),            # wrong
    (" 11", False),             # no answer mark
    ("", False),                # empty
    (" #", False),              # empty answer
    (" #11a", False),           # trailing junk
    (" #1 1", False),
    (" #eleven", False),
    (" #11.0", False),          # not an integer
    (" #12#11", True),          # the last mark counts
    (" #11#12", False),
], ids=lambda x: repr(x))
def test_integer_checker(completion, ok):
    assert check_integer(completion, "11") is ok


def test_negative_answers():
    assert check_integer(" 2-4=-2#-2", "-2")
    assert not check_integer(" #2", "-2")
    assert not check_integer(" #--2", "-2")


@pytest.mark.parametrize("completion,ok", [
    (" 3*5=15;15+7=22#3*5+7", True),
    ("#7+3*5", True),
    ("#(3+4)*5-13", False),     # 13 is not given
    ("#3*5+7+0", False),        # 0 is not given
    ("#3*5+7 ", True),
    ("#22", False),             # the target itself is not an expression over the numbers
    ("#3*5*7", False),          # wrong value
    ("#5+5+5+7", False),        # 5 used more often than given
    ("#__import__('os')", False),
    ("#3**5", False),           # only + - * allowed
    ("#3*5+7)", False),         # unbalanced
    ("3*5+7", False),           # no answer mark
], ids=lambda x: repr(x))
def test_countdown_checker(completion, ok):
    assert check_countdown(completion, "22", (3, 5, 7, 2)) is ok


def test_safe_eval_rejects_everything_but_integer_arithmetic():
    assert safe_eval("(1+2)*3") == (9, [1, 2, 3])
    for bad in ("1/2", "2**8", "a+1", "1.5+1", "", "1" * 100, "[1]"):
        assert safe_eval(bad) is None


@pytest.mark.parametrize("completion,ok", [(" #1/2", True), (" #0.5", True), (" #\\frac{1}{2}", True),
                                           (" #2", False), (" #garbage(", False), ("", False),
                                           (" so the answer is \\boxed{\\frac{1}{2}}", True),
                                           (" so the answer is \\boxed{2}", False)])
def test_math_checker_equivalent_forms(completion, ok):
    import math_verify  # noqa: F401  (in the test extra; the exact-match fallback has its own test)
    assert check_math(completion, "1/2") is ok


def test_jsonl_source(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"prompt": f"What is {i} squared?", "answer": str(i * i)} for i in range(20)]
    rows[0]["solution"] = " 0*0=0#0"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_jsonl(str(path))
    assert len(problems) == 20 and problems[0].solution == " 0*0=0#0" and problems[1].solution == " #1"
    assert problems[3].prompt == "Q: What is 3 squared?\nA:"
    assert is_correct(problems[3], " #9") and not is_correct(problems[3], " #8") and not is_correct(problems[3], " 8")
    source = TaskSource(str(path), seed=0, num_eval=8)
    assert len(source.eval_problems) == 4  # at most a fifth of the file is held out
    assert not {p.prompt for p in source.eval_problems} & {p.prompt for p in source.pool}
    assert source.batch(3, 5) == source.batch(3, 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="expected keys"):
        load_jsonl(str(bad))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_chain_is_a_worked_running_total(level):
    """2 x level steps, each 'total op digit = new total' and the next step starts from it; totals stay digits
    0..9; solutions of level 2 and 3 are 20-60 tokens (one token per character, plus EOS)."""
    rng = random.Random(10 + level)
    lengths = []
    for _ in range(300):
        problem = GENERATORS["chain"](rng, level)
        expression = problem.prompt[len("Q: "):-len("=?\nA:")]
        work, answer = problem.solution.strip().split("#")
        steps = work.split(";")
        assert len(steps) == 2 * level and answer == problem.answer
        total = int(re.match(r"\d+", expression).group())
        rest = expression[len(str(total)):]
        for step, (op, digit) in zip(steps, re.findall(r"([+-])(\d)", rest)):
            new = total + int(digit) if op == "+" else total - int(digit)
            assert step == f"{total}{op}{digit}={new}" and 0 <= new <= 9
            total = new
        assert str(total) == problem.answer
        lengths.append(len(problem.solution) + 1)
    if level >= 2:
        assert 20 <= min(lengths) and max(lengths) <= 60, (min(lengths), max(lengths))
    wrong = problem.solution[:problem.solution.rindex("#") + 1] + str(int(problem.answer) + 1)
    assert not is_correct(problem, wrong)


def test_mix_is_the_three_original_kinds():
    kinds = {p.kind for p in TaskSource("mix", level=1, seed=0, num_eval=8).batch(0, 300)}
    assert kinds == {"arith", "word", "countdown"}


@pytest.mark.parametrize("task", ["arith", "word", "countdown", "chain", "mix"])
def test_task_source_is_reproducible_and_held_out(task):
    source = TaskSource(task, level=1, seed=3, num_eval=32)
    assert len(source.eval_problems) == 32
    held_out = {p.prompt for p in source.eval_problems}
    batch = source.batch(7, 64)
    assert batch == TaskSource(task, level=1, seed=3, num_eval=32).batch(7, 64)
    assert batch != source.batch(8, 64)
    assert not held_out & {p.prompt for p in batch}


def test_task_source_rejects_unknown():
    with pytest.raises(ValueError, match="task"):
        TaskSource("algebra")
    with pytest.raises(ValueError, match="level"):
        TaskSource("arith", level=4)


def test_format_reward_is_optional():
    problem = Problem("Q: 1+1=?\nA:", "2", " #2", "arith")
    assert reward(problem, " #2") == 1.0
    assert reward(problem, " #3") == 0.0
    assert reward(problem, " #3", format_weight=0.2) == pytest.approx(0.2)
    assert reward(problem, " two", format_weight=0.2) == 0.0


def test_config_overrides():
    cfg = parse_args(["--steps=7", "--algo", "grpo", "--resume", "--lr=3e-4", "--betas=0.9,0.95",
                      "--compare=grpo,erpo", "--model", "/x/y"])
    assert (cfg.steps, cfg.algo, cfg.resume, cfg.lr, cfg.betas, cfg.compare, cfg.model) == \
        (7, "grpo", True, 3e-4, [0.9, 0.95], "grpo,erpo", "/x/y")
    assert parse_args(["--resume=false"]).resume is False
    assert parse_args([]) == TrainConfig()
    for bad in (["--nope=1"], ["--steps=abc"], ["--algo=ppo"], ["steps=3"], ["--micro_batch=0"]):
        with pytest.raises(ValueError):
            parse_args(bad)


@pytest.mark.parametrize("given, ok", [("1/2", True), (" 1 / 2.", True), ("0.5", False), (None, False)])
def test_exact_match_fallback(given, ok):
    from erpo_kernels.trainer.tasks import exact_match
    assert exact_match(given, "1/2") is ok


def test_warmup_levels_draw_only_those_levels_and_skip_held_out():
    from erpo_kernels.trainer.tasks import WarmupSource

    source = TaskSource("chain", level=2, seed=1, num_eval=16)
    warm = WarmupSource(source, [1, 3])
    batch = warm.batch(0, 200)
    steps = {p.solution.count("=") for p in batch}
    assert steps == {2, 6}  # levels 1 and 3: 2 and 6 worked steps, never level 2's 4
    assert warm.batch(0, 200) == batch and warm.batch(1, 200) != batch
    held_out = {p.prompt for p in source.eval_problems}
    source_1 = TaskSource("chain", level=1, seed=1, num_eval=16)
    warm_1 = WarmupSource(source_1, [1])
    assert not {p.prompt for p in warm_1.batch(3, 300)} & {p.prompt for p in source_1.eval_problems}
    assert held_out  # the level-2 source holds problems out too
    with pytest.raises(ValueError, match="warmup_levels"):
        TrainConfig(warmup_levels=[4])
