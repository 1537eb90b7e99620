"""Train/decode agreement: the bins training would compute for a decoded sequence, against the bins
the decoder fed.

Each held-out decode (prompt + every generated content token, stop token included) is laid out as
a training row (prompt = prompt, response = the generated tokens); the mode's slot rule and
``compute_bins`` with the finetune's ``max_passes`` give the training-side bins, read in slot order
and compared with the confidence tokens of the decoder's interleaved sequence in order (position
rule included). With exact fixed-point bins (the default) the two are equal token for token; a
pass cap leaves later slots of long rows approximate, which is what training then learned from.

:func:`single_pass_mismatch` measures upstream's approximation: the share of a training batch's slot
bins that one plain-context pass (``max_passes=1``) gets wrong against the exact fixed point.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.demo_analysis.heldout import DecodedSample, HeldOutTask, reference_batch
from entropy_guided_generation.fixed_point import compute_bins
from entropy_guided_generation.modes import Interleaving


@dataclass(frozen=True)
class Agreement:
    """Attributes:
        equal_fraction: share of confidence tokens whose training-side bin equals the decoded one.
        rows_equal_fraction: share of sequences whose bins all agree.
        confidence_tokens: confidence tokens compared.
        max_passes: the cap used (None: until no bin changes).
        unconverged_batches: batches whose last pass still changed a bin.
    """

    equal_fraction: float
    rows_equal_fraction: float
    confidence_tokens: int
    max_passes: Optional[int]
    unconverged_batches: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _training_rows(samples: Sequence[DecodedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``tokens``, ``response_mask`` and ``valid_mask`` ``[b, n]`` of prompt + content."""
    width = max(len(s.prompt_ids) + len(s.content_ids) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    response = torch.zeros_like(tokens, dtype=torch.bool)
    valid = torch.zeros_like(response)
    for r, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.content_ids)
        tokens[r, : p + n] = torch.tensor(s.prompt_ids + s.content_ids)
        response[r, p : p + n] = True
        valid[r, : p + n] = True
    return tokens, response, valid


@torch.no_grad()
def train_decode_agreement(
    model: Any,
    samples: Sequence[DecodedSample],
    *,
    interleaving: Interleaving,
    codec: ConfidenceCodec,
    pad_id: int,
    max_passes: Optional[int],
    batch_size: int = 32,
) -> Agreement:
    """Compare the decoder's fed bins with the training layout's bins of the same sequences.

    Args:
        samples: real-bin decodes (no override) from :func:`~entropy_guided_generation.demo_analysis.heldout.decode_heldout`.
        max_passes: the finetune's ``interleaving.max_passes`` (None: until no bin changes).

    Raises:
        ValueError: when the training layout puts a different number of confidence tokens in a row
            than the decoder did (the slot rules disagree: a bug, not a measurement).
    """
    equal = total = rows_equal = unconverged = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        tokens, response, valid = _training_rows(chunk, pad_id)
        slots = interleaving.slots(tokens, response_mask=response, valid_mask=valid)
        fixed = compute_bins(
            model, tokens, codec=codec, slots=slots, valid_mask=valid, pad_id=pad_id, max_passes=max_passes,
            positions=interleaving.positions,
        )
        unconverged += 0 if fixed.converged else 1
        for r, sample in enumerate(chunk):
            trained = fixed.bins[r][slots[r]]
            seen = torch.tensor(sample.interleaved)
            decoded = codec.bins_for_token_ids(seen)[codec.is_confidence_token(seen)]
            if trained.numel() != decoded.numel():
                raise ValueError(
                    f"held-out row {start + r}: training puts {trained.numel()} confidence tokens, the decoder fed "
                    f"{decoded.numel()}; the slot rules of mode {interleaving.name!r} disagree"
                )
            same = int((trained == decoded).sum())
            equal, total = equal + same, total + trained.numel()
            rows_equal += int(same == trained.numel())
    return Agreement(
        equal_fraction=equal / total if total else 1.0,
        rows_equal_fraction=rows_equal / len(samples) if samples else 1.0,
        confidence_tokens=total,
        max_passes=max_passes,
        unconverged_batches=unconverged,
    )


@dataclass(frozen=True)
class SinglePassMismatch:
    """Attributes:
        share: share of slot bins where one plain-context pass differs from the exact fixed point.
        slots: slot bins compared.
        exact_passes_mean: fixed-point passes per batch the exact bins took (pass 0 included).
        rows: training rows compared.
    """

    share: float
    slots: int
    exact_passes_mean: float
    rows: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def single_pass_mismatch(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    task: HeldOutTask,
    *,
    interleaving: Interleaving,
    codec: ConfidenceCodec,
    batch_size: int = 32,
) -> SinglePassMismatch:
    """How often upstream's approximation (every bin from one plain forward: ``compute_bins(...,
    max_passes=1)``) differs from the exact interleaved-context bins (``max_passes=None``: what decoding
    with ``confidence.context: interleaved`` produces) on the training layout of ``rows`` (prompt +
    reference response + EOS, the mode's slot rule). Both sides use ``codec`` with its context set to
    ``interleaved``, so a checkpoint trained with ``context: plain`` is measured the same way (there the
    share says how far its bins are from what its own interleaved prefix would have given).

    Raises:
        ValueError: when ``rows`` is empty or ``interleaving`` is plain (mode none has no slots).
    """
    if interleaving.is_plain:
        raise ValueError(f"interleaving.mode {interleaving.name!r} has no confidence slots; expected full, answer or marker")
    if not rows:
        raise ValueError("single_pass_mismatch needs at least one row, got none")
    codec = dataclasses.replace(codec, context="interleaved")
    differ = total = passes = batches = 0
    for start in range(0, len(rows), batch_size):
        tokens, response, valid = reference_batch(tokenizer, rows[start : start + batch_size], task)
        slots = interleaving.slots(tokens, response_mask=response, valid_mask=valid)
        common = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=tokenizer.pad_id, positions=interleaving.positions)
        exact = compute_bins(model, tokens, max_passes=None, **common)
        single = compute_bins(model, tokens, max_passes=1, **common)
        differ += int((exact.bins[slots] != single.bins[slots]).sum())
        total += int(slots.sum())
        passes, batches = passes + exact.passes, batches + 1
    return SinglePassMismatch(share=differ / total if total else 0.0, slots=total, exact_passes_mean=passes / batches, rows=len(rows))


__all__ = ["Agreement", "SinglePassMismatch", "single_pass_mismatch", "train_decode_agreement"]
