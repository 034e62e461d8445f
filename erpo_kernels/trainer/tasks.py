"""Tasks with verifiable rewards: generated arithmetic problems (no downloads) and local JSONL files.

A problem is a prompt, a gold answer and a worked solution (the warm-up's target). The model is
asked to write its work, then ``#`` and the final answer, then stop:

    prompt      "Q: 3+4*2=?\\nA:"
    completion  " 4*2=8;3+8=11#11"                 (then EOS)

Task kinds (``TrainConfig.task``), each with difficulty ``level`` 1..3:
    arith      multi-step expressions; level L has L operators (level 1: single digits, + and -)
    word       short word problems ("Ann has 3 pens and gets 4 more. How many pens?")
    countdown  reach a target from given numbers; the answer is an expression ("#3*5+7")
    chain      a running total of digits: level L has 2L + / - steps, the total always 0..9, each step
               worked on the scratchpad (" 7+2=9;9-3=6;6+1=7;7-5=2#2"); level 2 solutions are 27
               tokens, level 3 39 (with EOS), and one wrong step anywhere makes the answer wrong
    mix        arith, word and countdown
    FILE.jsonl one {"prompt": ..., "answer": ...} object per line (optional "solution");
               answers checked by math-verify when installed, else by exact match

Checkers are exact: the text after the last ``#`` must be the integer (or, for countdown, an
expression that uses only the given numbers, each at most once, and evaluates to the target).
Anything else (no ``#``, trailing junk, an unparsable number) is wrong and scores 0.
"""
from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional

PROMPT_TEMPLATE = "Q: {question}\nA:"
ANSWER_MARK = "#"
# a well-formed completion: work made of expression characters, then '#', then a final answer
_FORMAT_RE = re.compile(r"^ ?[0-9+\-*()=;]*#[0-9+\-*()]+$")
_INT_RE = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Problem:
    prompt: str          # the full text the model sees, ends where the completion begins
    answer: str          # gold answer (integer text, or the countdown target)
    solution: str        # a correct completion, used by the supervised warm-up
    kind: str            # "arith" | "word" | "countdown" | "jsonl"
    numbers: tuple = ()  # countdown: the numbers that may be used


# ---------------------------------------------------------------------------------------------
# answer checking
# ---------------------------------------------------------------------------------------------

def final_answer(completion: str) -> Optional[str]:
    """The text after the last '#', stripped; None when there is no '#'."""
    if ANSWER_MARK not in completion:
        return None
    return completion.rsplit(ANSWER_MARK, 1)[1].strip()


def check_integer(completion: str, answer: str) -> bool:
    """Exact integer match of the final answer; malformed output is wrong."""
    given = final_answer(completion)
    return given is not None and bool(_INT_RE.match(given)) and int(given) == int(answer)


def safe_eval(expression: str) -> Optional[tuple]:
    """(value, numbers used) of an expression of integers, + - * and parentheses; None if invalid."""
    if not expression or len(expression) > 64 or not re.fullmatch(r"[0-9+\-*() ]+", expression):
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    numbers: List[int] = []

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise ValueError("unsupported expression")

    try:
        return value(tree), numbers
    except ValueError:
        return None


def check_countdown(completion: str, target: str, numbers: tuple) -> bool:
    """The final answer is an expression over a sub-multiset of ``numbers`` equal to ``target``."""
    given = final_answer(completion)
    result = safe_eval(given) if given else None
    if result is None:
        return False
    value, used = result
    return value == int(target) and not (Counter(used) - Counter(numbers))


def check_math(completion: str, answer: str) -> bool:
    """User JSONL answers: math-verify when installed (equivalent forms match), else exact match.

    The answer is the text after the last '#'; with math-verify, a completion without '#' is
    handed to it whole (it extracts a final \\boxed{} or number, as a pretrained model writes it).
    """
    given = final_answer(completion)
    try:
        from math_verify import parse, verify
    except ImportError:
        return exact_match(given, answer)
    if given is None:
        given = completion
    try:
        return bool(verify(parse(answer), parse(given)))
    except Exception:  # math-verify raises on some unparsable inputs; those are wrong answers
        return False


def _normalize(text: str) -> str:
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def exact_match(given, answer: str) -> bool:
    """The fallback checker without math-verify: equal up to whitespace, case and a final period."""
    return given is not None and _normalize(given) == _normalize(answer)


def is_correct(problem: Problem, completion: str) -> bool:
    if problem.kind == "countdown":
        return check_countdown(completion, problem.answer, problem.numbers)
    if problem.kind == "jsonl":
        return check_math(completion, problem.answer)
    return check_integer(completion, problem.answer)


def is_well_formed(completion: str) -> bool:
    return bool(_FORMAT_RE.match(completion.strip("\n")))


def reward(problem: Problem, completion: str, format_weight: float = 0.0) -> float:
    """Correctness (0 or 1) plus ``format_weight`` if the completion has the '<work>#<answer>' form."""
    score = float(is_correct(problem, completion))
    if format_weight:
        score += format_weight * float(is_well_formed(completion))
    return score


# ---------------------------------------------------------------------------------------------
# generators: each takes a random.Random and a level, returns a Problem
# ---------------------------------------------------------------------------------------------

def _steps(tokens: list) -> tuple:
    """Evaluate [n, op, n, op, ...] with * before +/-, left to right; the steps as 'a*b=c' strings."""
    tokens, steps = list(tokens), []
    for ops in ("*", "+-"):
        i = 1
        while i < len(tokens):
            if tokens[i] in ops:
                a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
                c = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append(f"{a}{op}{b}={c}")
                tokens[i - 1:i + 2] = [c]
            else:
                i += 2
    return tokens[0], steps


def make_arith(rng: random.Random, level: int) -> Problem:
    """Level 1: a±b (digits). Level 2: two operators incl. *. Level 3: three operators, up to 19."""
    high = 9 if level < 3 else 19
    ops = "+-" if level == 1 else "+-*"
    tokens = [rng.randint(0, high)]
    for _ in range(max(1, level)):
        tokens += [rng.choice(ops), rng.randint(0, high if tokens[-1] != "*" else 9)]
    expression = "".join(str(t) for t in tokens)
    value, steps = _steps(tokens)
    work = ";".join(steps) if level > 1 else ""
    return Problem(PROMPT_TEMPLATE.format(question=f"{expression}=?"), str(value),
                   f" {work}#{value}", "arith")


_NAMES = ["Ann", "Bob", "Cat", "Dan", "Eve", "Max", "Sam", "Zoe"]
_ITEMS = ["pens", "apples", "cards", "books", "coins", "eggs"]


def make_word(rng: random.Random, level: int) -> Problem:
    """Short word problems; level 1: one step (+/-), level 2: * or two steps, level 3: both."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(1, 9), rng.randint(1, 9)
    kinds = ["gets", "loses"] if level == 1 else ["gets", "loses", "boxes", "gets_then_loses"]
    kind = rng.choice(kinds if level < 3 else kinds[2:])
    if kind == "gets":
        text, tokens = f"{name} has {a} {item} and gets {b} more.", [a, "+", b]
    elif kind == "loses":
        a = max(a, b)
        text, tokens = f"{name} has {a} {item} and loses {b}.", [a, "-", b]
    elif kind == "boxes":
        text, tokens = f"{name} has {a} boxes of {b} {item}.", [a, "*", b]
    else:
        text, tokens = f"{name} has {a} {item}, gets {b} and loses {c}.", [a, "+", b, "-", c]
    value, steps = _steps(tokens)
    question = f"{text} How many {item}?"
    return Problem(PROMPT_TEMPLATE.format(question=question), str(value), f" {';'.join(steps)}#{value}", "word")


def make_countdown(rng: random.Random, level: int) -> Problem:
    """Use some of the given numbers (each at most once) with + - * to reach the target."""
    count = level + 1
    numbers = [rng.randint(1, 9) for _ in range(count + (level > 1))]
    chosen = rng.sample(numbers, count)
    tokens = [chosen[0]]
    for n in chosen[1:]:
        tokens += [rng.choice("+-*" if level > 1 else "+-"), n]
    value, steps = _steps(tokens)
    if value < 0:  # keep targets non-negative: swap to addition
        tokens = [t if t != "-" else "+" for t in tokens]
        value, steps = _steps(tokens)
    expression = "".join(str(t) for t in tokens)
    question = f"make {value} from {' '.join(map(str, numbers))}"
    return Problem(PROMPT_TEMPLATE.format(question=question), str(value),
                   f" {';'.join(steps)}#{expression}", "countdown", tuple(numbers))


def make_chain(rng: random.Random, level: int) -> Problem:
    """A start digit, then 2 x level steps of + or - a digit 1..9, left to right, the running total always a
    digit 0..9 (a step is drawn again until it stays in range). Every step is one of ~90 single-digit facts,
    so the skill is shared by all problems; what is hard is getting every step of the chain right."""
    total = rng.randint(0, 9)
    expression, steps = str(total), []
    while len(steps) < 2 * level:
        b, op = rng.randint(1, 9), rng.choice("+-")
        new = total + b if op == "+" else total - b
        if not 0 <= new <= 9:
            continue
        steps.append(f"{total}{op}{b}={new}")
        expression += f"{op}{b}"
        total = new
    return Problem(PROMPT_TEMPLATE.format(question=f"{expression}=?"), str(total),
                   f" {';'.join(steps)}#{total}", "chain")


GENERATORS: dict = {"arith": make_arith, "word": make_word, "countdown": make_countdown, "chain": make_chain}
MIX_KINDS = ("arith", "word", "countdown")


def load_jsonl(path: str, template: str = PROMPT_TEMPLATE) -> List[Problem]:
    """A user's {"prompt", "answer"[, "solution"]} lines; the prompt is put into ``template``."""
    problems = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "answer" not in row:
                raise ValueError(f"{path}:{line_number}: expected keys 'prompt' and 'answer', got {sorted(row)}")
            answer = str(row["answer"]).strip()
            solution = row.get("solution") or f" {ANSWER_MARK}{answer}"
            problems.append(Problem(template.format(question=row["prompt"]), answer, solution, "jsonl"))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


class TaskSource:
    """A reproducible stream of training problems and a fixed held-out set that never overlaps it.

    ``batch(step, n)`` depends only on (seed, step), so a resumed run sees the same problems.
    """

    def __init__(self, task: str, level: int = 1, seed: int = 0, num_eval: int = 64):
        self.task, self.level, self.seed = task, level, seed
        if task.endswith(".jsonl"):
            problems = load_jsonl(task)
            random.Random(seed).shuffle(problems)
            num_eval = min(num_eval, len(problems) // 5 or 1)
            self.eval_problems, self.pool = problems[:num_eval], problems[num_eval:] or problems
            self._make: Optional[Callable] = None
            return
        kinds = list(MIX_KINDS) if task == "mix" else [task]
        if any(k not in GENERATORS for k in kinds):
            raise ValueError(f"task: got {task!r}, expected one of {sorted(GENERATORS)}, 'mix' or a .jsonl path")
        if not 1 <= level <= 3:
            raise ValueError(f"level: got {level!r}, expected 1, 2 or 3")
        self._kinds = kinds
        self._make = lambda rng: GENERATORS[rng.choice(self._kinds)](rng, level)
        rng, seen, self.eval_problems = random.Random(f"eval-{seed}"), set(), []
        for _ in range(50 * num_eval):  # distinct prompts; small levels have few distinct problems
            if len(self.eval_problems) == num_eval:
                break
            problem = self._make(rng)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                self.eval_problems.append(problem)
        self._held_out = seen

    def batch(self, step: int, n: int, stream: str = "rl") -> List[Problem]:
        """n training problems for ``step`` of ``stream`` ("rl" or "sft")."""
        rng = random.Random(f"{stream}-{self.seed}-{step}")
        if self._make is None:
            return [rng.choice(self.pool) for _ in range(n)]
        out = []
        while len(out) < n:
            problem = self._make(rng)
            if problem.prompt not in self._held_out:
                out.append(problem)
        return out


class WarmupSource:
    """The warm-up's problems drawn from other levels of the same task (``TrainConfig.warmup_levels``): each
    problem's level is picked at random from ``levels``; prompts held out by the RL source are skipped too.
    With levels that exclude the RL level the warm-up teaches the format and the step skills, never a
    problem of the trained distribution."""

    def __init__(self, source: TaskSource, levels: List[int]):
        if source._make is None:
            raise ValueError("warmup_levels: needs a generated task, not a .jsonl file")
        self.levels, self.source = list(levels), source
        self._sources = {level: TaskSource(source.task, level, source.seed, num_eval=0) for level in self.levels}

    def batch(self, step: int, n: int, stream: str = "sft") -> List[Problem]:
        rng = random.Random(f"{stream}-levels-{self.source.seed}-{step}")
        out = []
        while len(out) < n:
            problem = self._sources[rng.choice(self.levels)]._make(rng)
            if problem.prompt not in self.source._held_out:
                out.append(problem)
        return out
