"""The kit's synthetic data in the real formats: GSM8K-format arithmetic word problems and
BIG-Bench-Mistake-format arithmetic traces with injected mistakes.

GSM8K format: ``{"question": str, "answer": str}`` where the answer is step lines then ``#### n``::

    question: Ann has 3 bags with 4 shells each. She finds 5 more and then gives away 3. How many shells does she have now?
    answer:   3 * 4 = 12
              12 + 5 = 17
              17 - 3 = 14
              #### 14

BIG-Bench Mistake format: ``{"input", "steps": [str], "answer", "target", "mistake_index": int | None}``
where ``steps[mistake_index]`` is the first wrong step, ``answer`` is the trace's final answer and
``target`` the correct one.

Every problem belongs to one split for good, decided by a hash of its text (``split_of``), so
held-out problems never occur in training data whatever the seeds.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

SPLITS = ("train", "test")
PROMPT_SUFFIX = "\n"
TEST_SHARE_PERCENT = 10

_NAMES = (("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"), ("Gina", "she"), ("Hugo", "he"))
_OBJECTS = ("apples", "books", "coins", "pens", "shells", "cards", "stamps", "marbles")
_GAIN_VERBS = ("buys", "finds", "gets")
_LOSS_VERBS = ("gives away", "loses", "sells")
_MAX_START = 50
_MAX_CHANGE = 20
_FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]+)\s*$")


@dataclass(frozen=True)
class WordProblem:
    """One GSM8K-format problem: a start amount (given, or ``bags`` x ``per_bag``) changed by
    gains and losses.

    ``changes`` holds signed amounts in story order (+b: gains b, -c: loses c); running amounts
    stay >= 1. One step line per computation: the product (if any), then each change.
    """

    name: str
    pronoun: str
    obj: str
    start: int
    changes: tuple[int, ...]
    verbs: tuple[str, ...]
    bags: Optional[tuple[int, int]] = None

    @property
    def question(self) -> str:
        if self.bags is None:
            opening = f"{self.name} has {self.start} {self.obj}."
        else:
            opening = f"{self.name} has {self.bags[0]} bags with {self.bags[1]} {self.obj} each."
        phrases = [f"{verb} {abs(change)}{' more' if change > 0 else ''}" for verb, change in zip(self.verbs, self.changes)]
        actions = f" {self.pronoun.capitalize()} {' and then '.join(phrases)}." if phrases else ""
        return f"{opening}{actions} How many {self.obj} does {self.pronoun} have now?"

    @property
    def amounts(self) -> list[int]:
        """Running amounts: start, then after each change."""
        running = [self.start]
        for change in self.changes:
            running.append(running[-1] + change)
        return running

    @property
    def result(self) -> int:
        return self.amounts[-1]

    @property
    def answer(self) -> str:
        amounts = self.amounts
        steps = [f"{self.bags[0]} * {self.bags[1]} = {self.start}"] if self.bags is not None else []
        steps += [
            f"{before} {'+' if change > 0 else '-'} {abs(change)} = {after}"
            for before, change, after in zip(amounts, self.changes, amounts[1:])
        ]
        return "\n".join(steps + [f"#### {self.result}"])

    def as_gsm8k(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


def split_of(text: str) -> str:
    """The split a problem belongs to for good: ``"test"`` for ~10% of texts (by SHA-256), else ``"train"``."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if bucket < TEST_SHARE_PERCENT else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of examples must be a positive int, got {n!r}")


def sample_word_problem(rng: random.Random) -> WordProblem:
    """Draw one problem: half start with 2..50 items and change 1..2 times, half with 2..9 bags of
    2..9 items and change 0..2 times; a change is a gain or loss of 1..20 (never down to 0)."""
    name, pronoun = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    if rng.random() < 0.5:
        bags, start, num_changes = None, rng.randint(2, _MAX_START), rng.randint(1, 2)
    else:
        bags = (rng.randint(2, 9), rng.randint(2, 9))
        start, num_changes = bags[0] * bags[1], rng.randint(0, 2)
    amount, changes, verbs = start, [], []
    for _ in range(num_changes):
        if amount >= 2 and rng.random() < 0.5:
            change = -rng.randint(1, min(_MAX_CHANGE, amount - 1))
            verbs.append(rng.choice(_LOSS_VERBS))
        else:
            change = rng.randint(1, _MAX_CHANGE)
            verbs.append(rng.choice(_GAIN_VERBS))
        changes.append(change)
        amount += change
    return WordProblem(name, pronoun, obj, start, tuple(changes), tuple(verbs), bags)


def _distinct(examples: Iterable, key, n: int, what: str) -> list:
    """The first ``n`` examples with distinct ``key``; raises if the stream runs dry first."""
    seen, chosen = set(), []
    for example in examples:
        k = key(example)
        if k in seen:
            continue
        seen.add(k)
        chosen.append(example)
        if len(chosen) == n:
            return chosen
    raise ValueError(f"could not draw {n} distinct {what}; found only {len(chosen)}")


def word_problems(n: int, seed: int = 0, split: str = "train") -> list[WordProblem]:
    """``n`` distinct word problems of ``split``, deterministic in ``(n, seed, split)`` (prefix-stable in n)."""
    _check_count(n)
    _check_split(split)
    rng = random.Random(f"gsm8k-{seed}")
    stream = (sample_word_problem(rng) for _ in range(200 * n + 10_000))
    in_split = (p for p in stream if split_of(p.question) == split)
    return _distinct(in_split, lambda p: p.question, n, f"{split} word problems")


def gsm8k_examples(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``n`` GSM8K-format rows ``{"question", "answer"}`` (see the module docstring)."""
    return [p.as_gsm8k() for p in word_problems(n, seed, split)]


def final_answer(answer: str) -> int:
    """The integer after ``####`` in a GSM8K answer (commas removed).

    Raises:
        ValueError: if the answer does not end with ``#### <integer>``.
    """
    match = _FINAL_ANSWER.search(answer.strip())
    if match is None:
        raise ValueError(f"expected a GSM8K answer ending with '#### <integer>', got {answer[-60:]!r}")
    return int(match.group(1).replace(",", ""))


def prompt_of(question: str) -> str:
    """The kit's prompt format: the question then one newline (the response follows directly)."""
    return question + PROMPT_SUFFIX


# ---------------------------------------------------------------- BIG-Bench Mistake traces

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticTrace:
    """A two-group expression ``(a1 op1 b1) op (a2 op2 b2)`` and its worked steps, possibly with
    one injected mistake: ``error`` is added to the result computed in step ``mistake_index``
    and every later step carries the wrong value on."""

    groups: tuple[tuple[int, str, int], tuple[int, str, int]]
    op: str
    mistake_index: int | None
    error: int

    @property
    def input(self) -> str:
        (a1, o1, b1), (a2, o2, b2) = self.groups
        return f"(({a1} {o1} {b1}) {self.op} ({a2} {o2} {b2})) ="

    def _value(self, step: int, correct: int) -> int:
        return correct + (self.error if self.mistake_index == step else 0)

    def worked(self) -> tuple[list[str], int]:
        """The trace's steps and its final answer (wrong from ``mistake_index`` on)."""
        (a1, o1, b1), (a2, o2, b2) = self.groups
        value_a = self._value(1, _OPS[o1](a1, b1))
        value_b = self._value(2, _OPS[o2](a2, b2))
        final = self._value(3, _OPS[self.op](value_a, value_b))
        steps = [
            f'This equation can be written as "A {self.op} B", where A = ({a1} {o1} {b1}) and B = ({a2} {o2} {b2}).',
            f"Let's calculate A = ({a1} {o1} {b1}) = {value_a}.",
            f"Let's calculate B = ({a2} {o2} {b2}) = {value_b}.",
            f"Then, the final equation is A {self.op} B = {value_a} {self.op} {value_b} = {final}. So the answer is {final}",
        ]
        return steps, final

    @property
    def target(self) -> int:
        (a1, o1, b1), (a2, o2, b2) = self.groups
        return _OPS[self.op](_OPS[o1](a1, b1), _OPS[o2](a2, b2))

    def as_bigbench_mistake(self) -> dict:
        steps, final = self.worked()
        return {
            "input": self.input,
            "steps": steps,
            "answer": str(final),
            "target": str(self.target),
            "mistake_index": self.mistake_index,
        }


def sample_arithmetic_trace(rng: random.Random, mistake_rate: float) -> ArithmeticTrace:
    """Draw operands 1..9 and operators; with probability ``mistake_rate`` inject an error of
    +-1..3 into one of the three computing steps (1, 2 or 3)."""
    groups = tuple((rng.randint(1, 9), rng.choice("+-*"), rng.randint(1, 9)) for _ in range(2))
    op = rng.choice("+-")
    if rng.random() < mistake_rate:
        return ArithmeticTrace(groups, op, rng.randint(1, 3), rng.choice((-3, -2, -1, 1, 2, 3)))
    return ArithmeticTrace(groups, op, None, 0)


def bigbench_mistake_examples(n: int, seed: int = 0, mistake_rate: float = 0.5) -> list[dict]:
    """``n`` BIG-Bench-Mistake-format rows (distinct inputs), deterministic in the arguments.

    Args:
        n: number of rows.
        seed: random seed.
        mistake_rate: probability in [0, 1] that a trace has an injected mistake.
    """
    _check_count(n)
    if not 0.0 <= mistake_rate <= 1.0:
        raise ValueError(f"mistake_rate must lie in [0, 1], got {mistake_rate!r}")
    rng = random.Random(f"bbm-{seed}")
    stream = (sample_arithmetic_trace(rng, mistake_rate) for _ in range(200 * n + 10_000))
    return [t.as_bigbench_mistake() for t in _distinct(stream, lambda t: t.input, n, "arithmetic traces")]


# ---------------------------------------------------------------- JSONL files

PathLike = Union[str, Path]


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> Path:
    """Write ``rows`` one JSON object per line (UTF-8, keys in insertion order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: PathLike) -> list[dict]:
    """Rows of a JSONL file (blank lines are an error, not skipped)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
    return rows


def write_gsm8k_jsonl(path: PathLike, n: int, seed: int = 0, split: str = "test") -> Path:
    """Write ``n`` GSM8K-format rows of ``split`` to ``path`` (JSONL); returns the path."""
    return write_jsonl(path, gsm8k_examples(n, seed, split))


def write_bigbench_mistake_jsonl(path: PathLike, n: int, seed: int = 0, mistake_rate: float = 0.5) -> Path:
    """Write ``n`` BIG-Bench-Mistake-format rows to ``path`` (JSONL); returns the path."""
    return write_jsonl(path, bigbench_mistake_examples(n, seed, mistake_rate))
