"""Sequence rewards: a reward function maps (response text, its prompt example) to a float.

The default, :func:`gsm8k_answer_reward`, is 1.0 when the response's final answer equals the
reference's ``#### n`` answer and 0.0 otherwise.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from entropy_guided_generation.scoring.prompts import PromptExample

RewardFn = Callable[[str, PromptExample], float]

_HASH_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_TAGGED_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _as_number(text: str) -> Optional[float]:
    cleaned = text.replace(",", "").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_final_answer(text: str) -> Optional[float]:
    """The number a text gives as its final answer, or None when it gives none.

    Looks, in order, for the last ``#### n`` (GSM8K), then the last number inside the last
    ``<answer>...</answer>`` pair. Commas are thousands separators.
    """
    hashed = _HASH_ANSWER.findall(text)
    if hashed:
        return _as_number(hashed[-1])
    tagged = _TAGGED_ANSWER.findall(text)
    if tagged:
        numbers = _NUMBER.findall(tagged[-1])
        if numbers:
            return _as_number(numbers[-1])
    return None


def gsm8k_answer_reward(response: str, example: PromptExample) -> float:
    """1.0 if the response's final answer equals the reference's ``#### n``, else 0.0.

    Raises:
        ValueError: if the example has no reference answer, or the reference has no ``#### n``.
    """
    if example.answer is None:
        raise ValueError(f"gsm8k_answer_reward needs a reference answer; the example for prompt {example.prompt[:60]!r} has none")
    gold = extract_final_answer(example.answer)
    if gold is None:
        raise ValueError(f"the reference answer has no final '#### n' answer: {example.answer[-80:]!r}")
    predicted = extract_final_answer(response)
    return float(predicted is not None and predicted == gold)


__all__ = ["RewardFn", "extract_final_answer", "gsm8k_answer_reward"]
