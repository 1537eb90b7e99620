"""Constraint functions for TTA remasking: ``tokens [b, s] -> violations [b, s] float32``.

A violation score says how much the token at a position breaks a rule (0: fine, higher: worse);
``generate_with_tta_uncertainty`` adds ``gamma_violation`` times it to that position's
uncertainty. Bind the options with a lambda: ``constraint_fn=lambda t: no_repeat_ngrams(t, n=3)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be a [b, s] integer tensor, got {getattr(tokens, 'shape', type(tokens))!r}")


def no_repeat_ngrams(tokens: torch.Tensor, n: int = 3, ignore_ids: Sequence[int] = ()) -> torch.Tensor:
    """1.0 at the last token of every n-gram that already occurred earlier in the same row.

    Args:
        tokens: ``[b, s]`` token ids.
        n: n-gram length (>= 1).
        ignore_ids: ids (padding, end-of-sequence, the mask token) whose n-grams never count,
            so that a run of end-of-sequence fill is not a violation.

    Returns:
        ``[b, s]`` float32: 1.0 at position i if ``tokens[i-n+1 : i+1]`` equals an n-gram ending
        before i in that row, else 0.0 (positions < n-1 end no n-gram).
    """
    _check_tokens(tokens)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    b, s = tokens.shape
    scores = torch.zeros(b, s, dtype=torch.float32, device=tokens.device)
    if s < n:
        return scores
    grams = tokens.unfold(1, n, 1)  # [b, m, n]; gram j ends at position j + n - 1
    counted = ~torch.isin(grams, torch.as_tensor(list(ignore_ids), dtype=tokens.dtype, device=tokens.device)).any(-1)
    same = (grams.unsqueeze(2) == grams.unsqueeze(1)).all(-1)  # [b, m, m]
    m = grams.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=tokens.device).tril(-1)
    repeated = (same & earlier & counted.unsqueeze(1) & counted.unsqueeze(2)).any(-1)
    scores[:, n - 1 :] = repeated.float()
    return scores


def bracket_depth_change(tokenizer: Any, vocab_size: int, open: str = "(", close: str = ")") -> torch.Tensor:
    """``[vocab_size]`` long: (number of ``open``) - (number of ``close``) in each token's text.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str`` (torchtune or Hugging Face).
        vocab_size: number of ids (the predictor's logits width); ids the tokenizer cannot decode
            count 0.
        open, close: the bracket strings, e.g. ``"["`` and ``"]"``.
    """
    if not open or not close or open == close:
        raise ValueError(f"open and close must be two different non-empty strings, got {open!r} and {close!r}")
    change = torch.zeros(vocab_size, dtype=torch.long)
    for token_id in range(vocab_size):
        try:
            text = tokenizer.decode([token_id])
        except (KeyError, IndexError, ValueError):
            continue
        change[token_id] = text.count(open) - text.count(close)
    return change


def balanced_brackets(tokens: torch.Tensor, depth_change: torch.Tensor) -> torch.Tensor:
    """Violations of bracket balance: closers with no opener and openers never closed.

    The depth is the running sum of ``depth_change[token]`` along each row. A token that takes the
    depth below every earlier depth (and below 0) closes that many brackets nobody opened; a token
    that raises the depth to levels the rest of the row never comes back below leaves that many
    brackets unclosed. Its score is the number of such brackets.

    Args:
        tokens: ``[b, s]`` token ids.
        depth_change: ``[v]`` long, brackets opened minus closed by each token id (see
            ``bracket_depth_change``).

    Returns:
        ``[b, s]`` float32 counts of unmatched brackets attributed to each token.
    """
    _check_tokens(tokens)
    if depth_change.dim() != 1 or depth_change.is_floating_point():
        raise ValueError(f"depth_change must be a [v] integer tensor, got shape {tuple(depth_change.shape)} of {depth_change.dtype}")
    if tokens.numel() and int(tokens.max()) >= depth_change.shape[0]:
        raise ValueError(f"token id {int(tokens.max())} is outside depth_change's {depth_change.shape[0]} ids")
    delta = depth_change.to(tokens.device)[tokens]
    depth = delta.cumsum(dim=1)  # depth after each token
    before = depth - delta  # depth before each token
    # Unclosed closers: the lowest depth so far (0 included) minus this token's depth, if positive.
    floor_before = torch.cat([torch.zeros_like(depth[:, :1]), depth[:, :-1]], dim=1).cummin(dim=1).values
    unopened = (floor_before - depth).clamp(min=0)
    # A level L opened by this token is closed iff a later depth drops to L - 1 or below, so the
    # levels (before, min(depth, later_min)] stay open; the last token counts its own depth.
    later_min = torch.cat([depth[:, 1:], depth[:, -1:]], dim=1).flip(1).cummin(dim=1).values.flip(1)
    unclosed = (torch.minimum(depth, later_min) - before).clamp(min=0)
    return (unopened + unclosed).float()


__all__ = ["balanced_brackets", "bracket_depth_change", "no_repeat_ngrams"]
