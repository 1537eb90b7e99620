"""Stopping a generated row when its text reaches a stop string (e.g. ``</answer>``), on token ids.

A stop string can end inside a token and start in an earlier one, and the same text tokenizes
differently in different contexts, so matching token-id sequences misses stops. Instead each
string gets a small automaton over characters (Knuth-Morris-Pratt), lifted to tokens once: a
table ``[m, V]`` gives, for each state (characters of the string matched so far) and token id,
the state after reading that token's text. During decoding a step is one gather per row.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text each id ``0..vocab_size-1`` decodes to on its own (special tokens as empty text,
    as they are in ``responses_text``).

    Raises:
        ValueError: if the tokenizer cannot decode an id below ``vocab_size`` (a model whose
            vocabulary exceeds its tokenizer's can emit text-less ids).
    """
    texts = []
    for token_id in range(vocab_size):
        try:
            texts.append(decode_ids(tokenizer, [token_id]))
        except Exception as error:  # tokenizers raise KeyError, TypeError, IndexError, ... on unknown ids
            raise ValueError(
                f"the tokenizer cannot decode token id {token_id} (model vocabulary {vocab_size}): {error!r}"
            ) from error
    return texts


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` with special tokens left out (torchtune and Hugging Face tokenizers alike)."""
    if "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    return tokenizer.decode(list(ids))


def _failure_function(pattern: str) -> list[int]:
    """KMP failure links: ``fail[k]`` = length of the longest proper border of ``pattern[:k]``."""
    fail = [0] * (len(pattern) + 1)
    border = 0
    for i in range(1, len(pattern)):
        while border and pattern[i] != pattern[border]:
            border = fail[border]
        if pattern[i] == pattern[border]:
            border += 1
        fail[i + 1] = border
    return fail


class StopStringMatcher:
    """Tracks, per row, how much of ``stop`` the generated text currently ends with.

    States ``0..m-1`` mean that many characters are matched; ``m = len(stop)`` means the text
    contains ``stop`` (the row must stop). ``advance`` is vectorized over rows.
    """

    def __init__(self, stop: str, texts: Sequence[str], device: torch.device | str = "cpu"):
        """
        Args:
            stop: the stop string (non-empty).
            texts: each token id's text (see :func:`token_texts`).
            device: where the transition table lives (the generation device).
        """
        if not stop:
            raise ValueError("a stop string must be non-empty; got ''")
        self.stop = stop
        self._fail = _failure_function(stop)
        self._chars = set(stop)
        table = [self._token_transitions(text) for text in texts]
        self.table = torch.tensor(table, dtype=torch.long, device=device).T.contiguous()  # [m, V]

    @property
    def done_state(self) -> int:
        return len(self.stop)

    def _char_step(self, state: int, char: str) -> int:
        while state and char != self.stop[state]:
            state = self._fail[state]
        return state + 1 if char == self.stop[state] else 0

    def _run(self, state: int, text: str) -> int:
        for char in text:
            state = self._char_step(state, char)
            if state == self.done_state:
                break
        return state

    def _token_transitions(self, text: str) -> list[int]:
        """The state after ``text`` from each start state ``0..m-1``.

        A character absent from ``stop`` resets any state to 0, so only the text before the first
        such character depends on the start state; the rest is run once.
        """
        cut = next((i for i, char in enumerate(text) if char not in self._chars), len(text))
        tail_state = self._run(0, text[cut + 1 :]) if cut < len(text) else None
        out = []
        for start in range(self.done_state):
            state = self._run(start, text[:cut])
            if state != self.done_state and tail_state is not None:
                state = tail_state
            out.append(state)
        return out

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """``[b]`` long zeros: nothing matched yet."""
        return torch.zeros(batch_size, dtype=torch.long, device=self.table.device)

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one token per row.

        Args:
            state: ``[b]`` current states (< m).
            tokens: ``[b]`` token ids just generated.

        Returns:
            ``(new_state [b], completed [b] bool)``; a completed row's state is reset to 0.
        """
        new_state = self.table[state, tokens]
        completed = new_state == self.done_state
        return new_state.masked_fill(completed, 0), completed


__all__ = ["StopStringMatcher", "decode_ids", "token_texts"]
