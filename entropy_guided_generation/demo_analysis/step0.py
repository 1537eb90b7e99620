"""Step 0: how foreign the interleaved layout is to a base model before any finetuning.

For each interleaved mode, the base's held-out content loss through the interleaved layout (exact
fixed-point bins) against its plain content loss, under each way of giving the confidence tokens
their embedding rows (a :class:`RowsVariant`: which tokens, and their rows as they are or set to the
mean of the trained rows) and each position rule. The excess over plain is what finetuning must
remove before CaC costs nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.demo_analysis.heldout import HeldOutTask, heldout_content_loss
from entropy_guided_generation.modes import Interleaving, mode_named
from entropy_guided_generation.positions import POSITION_RULES
from entropy_guided_generation.training.embeddings import mean_embedding_rows

ROW_INITS = ("raw", "mean")
"""``raw``: the confidence tokens' embedding rows as the base holds them (pretrained rows of existing
tokens; rows appended for added tokens are the mean of the trained rows already); ``mean``: every
confidence row set to the mean of all other rows (``interleaving.init_confidence_embeddings: mean``)."""


@dataclass(frozen=True)
class RowsVariant:
    """One choice of confidence tokens and their rows.

    Attributes:
        tokens: a label for the token set (e.g. ``added`` or ``smollm2_unused``).
        codec: the codec over those tokens (ids within the model's vocabulary).
        init: one of :data:`ROW_INITS`.
    """

    tokens: str
    codec: ConfidenceCodec
    init: str

    def __post_init__(self) -> None:
        if self.init not in ROW_INITS:
            raise ValueError(f"unknown confidence row init {self.init!r}; expected one of {', '.join(ROW_INITS)}")


@contextmanager
def confidence_rows(model: Any, token_ids: torch.Tensor, init: str) -> Iterator[Any]:
    """``model`` with the input-embedding rows ``token_ids`` set by ``init`` for the duration of the
    block (a tied output projection shares them), restored afterwards."""
    if init not in ROW_INITS:
        raise ValueError(f"unknown confidence row init {init!r}; expected one of {', '.join(ROW_INITS)}")
    if init == "raw":
        yield model
        return
    weight = model.tok_embeddings.weight
    ids = token_ids.to(torch.long).flatten()
    saved = weight.detach()[ids].clone()
    with torch.no_grad():
        weight[ids] = mean_embedding_rows(weight.detach(), ids)[ids]
    try:
        yield model
    finally:
        with torch.no_grad():
            weight[ids] = saved


@torch.no_grad()
def step0_study(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    task: HeldOutTask,
    *,
    variants: Sequence[RowsVariant],
    modes: Sequence[tuple[str, Optional[str]]],
    positions: Sequence[str] = POSITION_RULES,
    batch_size: int = 32,
) -> dict:
    """Held-out content loss of the base ``model`` (its vocabulary already covering every variant's
    tokens) in the plain layout and, per interleaved mode, variant and position rule, in the
    interleaved layout with exact bins.

    Args:
        modes: ``(mode, marker)`` pairs, interleaved modes only (marker None except in mode marker).
        positions: the position rules to measure.

    Returns:
        ``{"plain": nats, "rows": [{"mode", "tokens", "init", "positions", "content_loss", "excess"}]}``;
        ``excess`` = content_loss - plain (nats per content token).

    Raises:
        ValueError: on an empty ``rows`` or a plain mode in ``modes``.
    """
    if not rows:
        raise ValueError("step0_study needs at least one held-out row, got none")
    plain = heldout_content_loss(model, tokenizer, rows, task, interleaving=Interleaving.for_tokenizer("none", tokenizer),
                                 codec=None, batch_size=batch_size)
    out: list[dict] = []
    for mode, marker in modes:
        if mode_named(mode).is_plain:
            raise ValueError(f"step0_study measures interleaved modes; got {mode!r} (its loss is the plain one)")
        for variant in variants:
            with confidence_rows(model, variant.codec.token_ids, variant.init):
                for rule in positions:
                    interleaving = Interleaving.for_tokenizer(mode, tokenizer, marker, rule)
                    loss = heldout_content_loss(model, tokenizer, rows, task, interleaving=interleaving, codec=variant.codec,
                                                batch_size=batch_size)
                    out.append({"mode": mode, "tokens": variant.tokens, "init": variant.init, "positions": rule,
                                "content_loss": loss, "excess": loss - plain})
    return {"plain": plain, "rows": out}


__all__ = ["ROW_INITS", "RowsVariant", "confidence_rows", "step0_study"]
