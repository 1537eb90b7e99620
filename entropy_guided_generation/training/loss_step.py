"""One training (or validation) step's loss on the interleaved batch.

A plain batch (``tokens``, ``labels``, ``response_mask``, ``valid_mask``, right-padded) becomes the
sequence the model trains on in four moves, all from :mod:`entropy_guided_generation.layout`:

1. slots: which content tokens get a confidence token (the :class:`~entropy_guided_generation.layout.Interleaving`'s rule);
2. bins: ``compute_bins`` by fixed-point iteration, without grad, from the model being trained
   or a frozen reference, so that the bins equal what sequential decoding would produce;
3. interleave: confidence tokens inserted, their labels set to the ignore index;
4. loss: next-token cross-entropy (torchtune's loss module, chunked or not), summed over targets.

A plain mode (``none``) skips 1-3. Confidence tokens are never targets.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager, Dict, Optional

import torch
from torch import nn

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.fixed_point import FixedPointBins, compute_bins
from entropy_guided_generation.interleaved import IGNORE_INDEX, interleave
from entropy_guided_generation.modes import Interleaving, marker_end_positions
from entropy_guided_generation.lockstep import lockstep_width, pad_columns
from entropy_guided_generation.training.metrics import ConfidenceStats

log = logging.getLogger(__name__)


@dataclass
class ModelBatch:
    """What the model is trained on.

    Attributes:
        tokens: ``[b, L]`` input ids (interleaved, or plain in mode none), right-padded.
        labels: ``[b, L]`` unshifted labels: ``labels[i]`` is the target of the logits that read
            tokens up to ``i - 1``; the ignore index on prompt, padding and confidence tokens.
        is_confidence: ``[b, L]`` True on confidence tokens.
        bins: the fixed-point result (None in mode none).
        slots: ``[b, n]`` plain positions followed by a confidence token (None in mode none).
        positions: ``[b, L]`` position ids under ``interleaving.positions: shared``; None when they
            are the model's default ``0..L-1`` (sequential positions of a right-padded batch).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    is_confidence: torch.Tensor
    bins: Optional[FixedPointBins] = None
    slots: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[b, L]`` targets of the logits at each position: ``labels[:, 1:]`` then one ignore column."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def check_no_confidence_ids(tokens: torch.Tensor, valid_mask: torch.Tensor, codec: ConfidenceCodec) -> None:
    """Raise if the plain data already holds a confidence token (it would become a target).

    Raises:
        ValueError: naming the first row, position and id.
    """
    found = codec.first_confidence_token(tokens, valid_mask)
    if found is not None:
        row, pos, token_id = found
        raise ValueError(
            f"training data row {row} holds confidence token id {token_id} at position {pos}; "
            "confidence tokens are inserted by the recipe and must not occur in the text"
        )


class ConfidenceLayout:
    """Builds the interleaved batch of one mode (everything but the loss).

    Args:
        interleaving: the mode bound to the tokenizer's stop and marker ids (not a plain mode).
        codec: the confidence codec.
        pad_id: padding id of the plain batch.
        max_passes: None (exact: iterate until no bin changes) or a fixed-point pass cap (>= 1).
        ignore_index: label of untrained positions.
    """

    def __init__(
        self,
        interleaving: Interleaving,
        codec: ConfidenceCodec,
        *,
        pad_id: int,
        max_passes: Optional[int] = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        if interleaving.is_plain:
            raise ValueError(f"mode {interleaving.name!r} is plain: it has no confidence layout")
        self.interleaving = interleaving
        self.codec = codec
        self.pad_id = pad_id
        self.max_passes = max_passes
        self.ignore_index = ignore_index

    def slots(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[b, n]`` bool: plain positions followed by their confidence token."""
        return self.interleaving.slots(batch["tokens"], response_mask=batch["response_mask"], valid_mask=batch["valid_mask"])

    def marker_found(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """``[b]`` bool: the marker occurs inside the row's response; None when the mode reads no marker."""
        if self.interleaving.marker_ids is None:
            return None
        allowed = batch["response_mask"] & batch["valid_mask"]
        return marker_end_positions(batch["tokens"], self.interleaving.marker_ids, allowed) >= 0

    @torch.no_grad()
    def build(
        self, bin_model: nn.Module, batch: Dict[str, torch.Tensor], seen: Optional["SeenRowBins"] = None
    ) -> ModelBatch:
        """The interleaved batch, with bins from ``bin_model`` (no grad).

        Args:
            bin_model: the model whose entropies give the bins (being trained, or a reference).
            batch: collated plain batch (see ``padded_collate_with_response_mask``).
            seen: bins of rows seen before (a frozen reference under ``confidence.context: plain``):
                only the other rows are forwarded, and their bins are remembered.
        """
        tokens, valid = batch["tokens"], batch["valid_mask"]
        check_no_confidence_ids(tokens, valid, self.codec)
        slots = self.slots(batch)
        if seen is not None:
            result = self._bins_with_seen(bin_model, batch, slots, seen)
        else:
            result = self._bins(bin_model, batch, slots)
        layout = result.interleaved
        positions = None
        if not self.interleaving.positions.is_default:
            positions = self.interleaving.position_ids(layout.valid_mask, layout.is_confidence)
        return ModelBatch(layout.tokens, layout.labels, layout.is_confidence, result, slots, positions)

    def _bins(self, bin_model: nn.Module, batch: Dict[str, torch.Tensor], slots: torch.Tensor) -> FixedPointBins:
        return compute_bins(
            bin_model,
            batch["tokens"],
            codec=self.codec,
            slots=slots,
            labels=batch["labels"],
            valid_mask=batch["valid_mask"],
            pad_id=self.pad_id,
            max_passes=self.max_passes,
            positions=self.interleaving.positions,
        )

    def _bins_with_seen(
        self, bin_model: nn.Module, batch: Dict[str, torch.Tensor], slots: torch.Tensor, seen: "SeenRowBins"
    ) -> FixedPointBins:
        """Bins of rows seen before from ``seen``; the others' by one plain forward of those rows
        (a rank with none joins its FSDP2 peers' forward rounds with an empty one), then remembered."""
        tokens, valid = batch["tokens"], batch["valid_mask"]
        keys = seen.keys(tokens, valid, slots)
        known, bins, signal = seen.lookup(keys, slots, self.codec.compute_dtype)
        new = (~known).nonzero().squeeze(1)
        passes, pass_rows, pass_slots = 0, (), ()
        if new.numel():
            part = {k: v[new] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:1] == tokens.shape[:1]}
            result = self._bins(bin_model, part, slots[new])
            bins[new], signal[new] = result.bins, result.signal.to(signal.dtype)
            seen.add([keys[i] for i in new.tolist()], result.bins, result.signal)
            passes, pass_rows, pass_slots = result.passes, result.pass_rows, result.pass_slots
        else:
            self._bins(bin_model, batch, torch.zeros_like(slots))  # no slots: only joins FSDP2 peers' forwards
        conf = self.codec.token_ids_for_bins(bins.clamp(min=0))
        laid = interleave(tokens, slots, conf, labels=batch["labels"], pad_id=self.pad_id, valid_mask=valid)
        return FixedPointBins(bins, signal, passes, 0.0, True, laid, pass_rows=pass_rows, pass_slots=pass_slots)


class SeenRowBins:
    """Bins of the rows a frozen reference has already read, under ``confidence.context: plain``: a
    row's bins then depend on its plain tokens and slots alone, so each distinct row is forwarded
    once per run (from its second epoch on, the reference runs no forward). Held on the CPU; a row
    costs its slot count in bytes."""

    def __init__(self) -> None:
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def keys(tokens: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> list[bytes]:
        """One key per row: its real tokens and which of them are slots."""
        marked = torch.where(slots, -tokens - 1, tokens)  # a slot's id negated: one tensor says both
        return [row[ok].numpy().tobytes() for row, ok in zip(marked.cpu(), valid.cpu())]

    def lookup(
        self, keys: list[bytes], slots: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(known [b], bins [b, n], signal [b, n])``: rows seen before hold their bins and signals
        (``dtype``; -1 and NaN elsewhere)."""
        b, n = slots.shape
        bins = torch.full((b, n), -1, dtype=torch.long, device=slots.device)
        signal = torch.full((b, n), float("nan"), dtype=dtype, device=slots.device)
        known = torch.tensor([key in self._rows for key in keys], dtype=torch.bool, device=slots.device)
        if bool(known.any()) and bool(slots[known].any()):
            hits = [self._rows[key] for key, hit in zip(keys, known.tolist()) if hit]
            stored_bins = torch.nn.utils.rnn.pad_sequence([h[0] for h in hits], batch_first=True, padding_value=-1)
            stored_signal = torch.nn.utils.rnn.pad_sequence([h[1] for h in hits], batch_first=True)
            where = slots[known]
            rank = (where.long().cumsum(1) - 1).clamp(min=0)  # a slot's index among its row's slots
            picked = torch.arange(where.shape[0], device=slots.device).unsqueeze(1).expand_as(rank)
            bins[known] = torch.where(where, stored_bins.to(slots.device).long()[picked, rank.clamp(max=stored_bins.shape[1] - 1)], -1)
            signal[known] = torch.where(where, stored_signal.to(slots.device, dtype)[picked, rank.clamp(max=stored_signal.shape[1] - 1)], signal[known])
        return known, bins, signal

    def add(self, keys: list[bytes], bins: torch.Tensor, signal: torch.Tensor) -> None:
        """Remember each row's slot bins ``bins[i][bins[i] >= 0]`` and their signals under ``keys[i]``."""
        has = bins >= 0
        for key, row_bins, row_signal, row_has in zip(keys, bins.cpu(), signal.cpu(), has.cpu()):
            self._rows[key] = (row_bins[row_has].to(torch.int16), row_signal[row_has].to(signal.dtype))


def plain_model_batch(batch: Dict[str, torch.Tensor]) -> ModelBatch:
    """Mode none: the plain batch as is."""
    return ModelBatch(batch["tokens"], batch["labels"], torch.zeros_like(batch["valid_mask"]))


@dataclass
class StepLoss:
    """``loss``: summed token cross-entropy (nats) of the micro-batch, with grad when trained;
    ``num_tokens``: its number of targets (long scalar)."""

    loss: torch.Tensor
    num_tokens: torch.Tensor


def summed_token_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: ModelBatch,
    ignore_index: int = IGNORE_INDEX,
    forward_ctx: Optional[ContextManager] = None,
) -> StepLoss:
    """Cross-entropy of next-token prediction summed over targets.

    torchtune's losses average over targets; multiplying by the count gives the sum, so a
    gradient-accumulation window can be normalized by its total token count afterwards.

    Args:
        forward_ctx: context around the forward only (activation offloading).
    """
    targets = shifted_labels(batch.labels, ignore_index)
    num_tokens = (targets != ignore_index).sum()
    # Under FSDP2 every rank's forward runs at a width that makes as many output chunks.
    width = lockstep_width(model, batch.tokens.shape[1])
    tokens, targets = pad_columns(batch.tokens, width), pad_columns(targets, width, ignore_index)
    positions = None if batch.positions is None else pad_columns(batch.positions, width)
    with forward_ctx or contextlib.nullcontext():
        logits = model(tokens) if positions is None else model(tokens, input_pos=positions)
    if int(num_tokens) == 0:
        # Nothing to learn here, but every parameter must still join the backward pass (FSDP).
        chunks = logits if isinstance(logits, list) else [logits]
        return StepLoss(sum(c.sum() for c in chunks) * 0.0, num_tokens)
    if not isinstance(logits, list):
        logits = logits.reshape(-1, logits.size(-1))
        targets = targets.reshape(-1)
    return StepLoss(loss_fn(logits, targets) * num_tokens, num_tokens)


class LossStep:
    """Plain batch -> model batch -> summed loss, with confidence statistics.

    Args:
        layout: the mode's layout builder (None in mode none).
        loss_fn: a cross-entropy module averaging over non-ignored targets (torchtune's
            ``CEWithChunkedOutputLoss``, or ``torch.nn.CrossEntropyLoss``).
        reference: frozen model giving the bins (None: the model being trained).
        activations_ctx: context around the loss forward (activation offloading).
        stats: accumulator for the ``conf/*`` metrics.
    """

    def __init__(
        self,
        layout: Optional[ConfidenceLayout],
        loss_fn: nn.Module,
        *,
        reference: Optional[nn.Module] = None,
        activations_ctx: Optional[ContextManager] = None,
        stats: Optional[ConfidenceStats] = None,
    ):
        self.layout = layout
        self.loss_fn = loss_fn
        self.reference = reference
        self.activations_ctx = activations_ctx
        self.stats = stats
        self.ignore_index = getattr(loss_fn, "ignore_index", IGNORE_INDEX)
        self.unconverged_batches = 0
        # A frozen reference reading plain prefixes gives each row the same bins every epoch.
        plain_reference = reference is not None and layout is not None and layout.codec.context == "plain"
        self.seen = SeenRowBins() if plain_reference else None

    def model_batch(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> ModelBatch:
        """The batch the model trains on (interleaved unless mode none); records statistics."""
        if self.layout is None:
            return plain_model_batch(batch)
        built = self.layout.build(self.reference if self.reference is not None else model, batch, self.seen)
        if not built.bins.converged:
            self._warn_unconverged(built.bins)
        if self.stats is not None:
            self.stats.add_batch(built.bins, built.slots)
            found = self.layout.marker_found(batch)
            if found is not None:
                self.stats.add_marker_rows(batch["tokens"].shape[0], found)
        return built

    def _warn_unconverged(self, result: FixedPointBins) -> None:
        """Warn that a pass cap left bins decoding would not produce: at the 1st, 2nd, 4th, 8th ...
        such micro-batch, so a long run is told without being flooded."""
        self.unconverged_batches += 1
        n = self.unconverged_batches
        if n & (n - 1) == 0:
            log.warning(
                f"interleaving.max_passes={self.layout.max_passes} stopped the fixed point with {result.unconverged_rows} "
                f"row(s) unconverged ({n} micro-batch(es) so far): their bins differ from what decoding produces; "
                "set interleaving.max_passes: null for exact bins"
            )

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> StepLoss:
        model_batch = self.model_batch(model, batch)
        return summed_token_loss(model, self.loss_fn, model_batch, self.ignore_index, self.activations_ctx)


__all__ = [
    "ConfidenceLayout",
    "LossStep",
    "ModelBatch",
    "SeenRowBins",
    "StepLoss",
    "check_no_confidence_ids",
    "plain_model_batch",
    "shifted_labels",
    "summed_token_loss",
]
