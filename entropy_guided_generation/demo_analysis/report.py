"""One finetuned checkpoint analysed on the held-out set: accuracy and calibration of the real decode,
the confidence ablations, calibration from the trace's bins, bins at right and wrong digits,
train/decode agreement and held-out content loss. Returns JSON-ready dicts (NaN as None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.demo_analysis.agreement import train_decode_agreement
from entropy_guided_generation.demo_analysis.heldout import (
    DecodedSample,
    HeldOutTask,
    decode_heldout,
    heldout_content_loss,
    reference_bins,
)
from entropy_guided_generation.demo_analysis.trace import (
    bin_probabilities,
    digit_tokens,
    mean_or_none,
    trace_confidence,
)
from entropy_guided_generation.eval.calibration import auroc, calibration_report
from entropy_guided_generation.generation import FixedBin, ShuffledBins
from entropy_guided_generation.modes import Interleaving

ABLATIONS = ("fixed_confident", "fixed_unconfident", "shuffled")
"""Decodes with the confidence token fed back replaced: every one by the codec's most confident bin
(bin 0 of entropy, the top bin of max-prob), every one by its least confident bin, or each row's
own bins in a shuffled order."""


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def calibration_of(confidence: Sequence[float], correct: Sequence[bool]) -> dict:
    """accuracy, ECE (10 bins), AUROC, mean confidence (``None`` for an undefined AUROC)."""
    report = calibration_report(list(confidence), [float(c) for c in correct])
    return {k: _clean(v) for k, v in report.to_dict().items() if k != "num_bins"}


def extreme_bins(codec: ConfidenceCodec) -> dict[str, int]:
    """The most and least confident bins of a codec (entropy: low bins are confident)."""
    top = codec.num_bins - 1
    return {"fixed_confident": 0, "fixed_unconfident": top} if codec.signal == "entropy" else {"fixed_confident": top, "fixed_unconfident": 0}


def decode_summary(samples: Sequence[DecodedSample]) -> dict:
    """Accuracy and calibration of exp(mean token log-prob) over a set of decodes."""
    return {**calibration_of([s.sequence_confidence for s in samples], [s.correct for s in samples]), "n": len(samples)}


def trace_calibration(
    samples: Sequence[DecodedSample], codec: ConfidenceCodec, *, own_bins: bool = False, reduce: str = "mean"
) -> Optional[dict]:
    """Calibration of the trace confidence (:func:`trace_confidence` of each sample's bins, reduced
    by ``reduce``).

    ``own_bins``: bin each token's own signal instead of reading the fed bins (mode none, whose
    decodes feed none: what the trace would have said), from the entropy of the producing
    distribution (entropy codecs only). None when no sample has a bin.
    """
    probabilities = bin_probabilities(codec)
    pairs = []
    for s in samples:
        bins = s.bins
        if own_bins:
            if codec.signal != "entropy":
                return None
            bins = codec.bins_from_signal(s.entropies[~torch.isnan(s.entropies)])
        value = trace_confidence(bins, probabilities, reduce)
        if value is not None:
            pairs.append((value, s.correct))
    if not pairs:
        return None
    confidence, correct = zip(*pairs)
    return {**calibration_of(confidence, correct), "n": len(pairs), "bin_probabilities": probabilities.tolist()}


def digit_view(samples: Sequence[DecodedSample], targets: Sequence[Optional[str]], codec: Optional[ConfidenceCodec]) -> dict:
    """Bins and entropies at digit tokens of computed results, split by right and wrong.

    For each digit token: ``own_bin`` (the bin fed after it: its own distribution's, in a real
    decode), ``prev_bin`` (the bin the model read just before producing it), ``entropy`` of the
    distribution that produced it. ``auroc_entropy``: how well exp(-entropy) ranks right digits
    above wrong ones; ``auroc_bin``: the same for the fed bin's probability.
    """
    groups: dict[str, dict[str, list]] = {k: {"own_bin": [], "prev_bin": [], "entropy": []} for k in ("right", "wrong")}
    for sample, target in zip(samples, targets):
        for digit in digit_tokens(sample.pieces, target):
            group = groups["right" if digit.right else "wrong"]
            group["own_bin"].append(int(sample.bins[digit.index]))
            group["prev_bin"].append(int(sample.bins[digit.index - 1]) if digit.index > 0 else -1)
            group["entropy"].append(float(sample.entropies[digit.index]))
    out: dict[str, Any] = {}
    for name, group in groups.items():
        fed = [b for b in group["own_bin"] if b >= 0]
        prev = [b for b in group["prev_bin"] if b >= 0]
        out[name] = {
            "n": len(group["entropy"]),
            "mean_entropy": mean_or_none(group["entropy"]),
            "mean_own_bin": mean_or_none(fed),
            "mean_prev_bin": mean_or_none(prev),
            "own_bin_histogram": torch.bincount(torch.tensor(fed, dtype=torch.long), minlength=codec.num_bins).tolist() if fed and codec else [],
        }
    right, wrong = groups["right"], groups["wrong"]
    labels = [1.0] * len(right["entropy"]) + [0.0] * len(wrong["entropy"])
    if right["entropy"] and wrong["entropy"]:
        out["auroc_entropy"] = _clean(auroc([math.exp(-h) for h in right["entropy"] + wrong["entropy"]], labels))
        bins = right["own_bin"] + wrong["own_bin"]
        if codec is not None and all(b >= 0 for b in bins):
            probabilities = bin_probabilities(codec)
            out["auroc_bin"] = _clean(auroc([float(probabilities[b]) for b in bins], labels))
    return out


def bin_histogram(samples: Sequence[DecodedSample], num_bins: int) -> list[int]:
    fed = torch.cat([s.bins[s.bins >= 0] for s in samples] or [torch.zeros(0, dtype=torch.long)])
    return torch.bincount(fed.long(), minlength=num_bins).tolist()


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows, their task, and how to decode them."""

    rows: Sequence[dict]
    task: HeldOutTask
    max_gen_toks: int
    targets: Sequence[Optional[str]]
    batch_size: int = 32


def analyze_checkpoint(
    model: Any,
    tokenizer: Any,
    interleaving: Interleaving,
    codec: Optional[ConfidenceCodec],
    heldout: HeldOut,
    *,
    max_passes: Optional[int],
    full: bool = True,
    reference_codec: Optional[ConfidenceCodec] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Everything the demo reports about one finetuned checkpoint.

    Args:
        interleaving, codec: the checkpoint's mode and codec (codec None in mode none).
        max_passes: the finetune's fixed-point cap (agreement, content loss).
        full: also the ablations, trace calibration, digit view and agreement (else accuracy,
            calibration and content loss only: the learning-curve points).
        reference_codec: mode none's stand-in codec for the would-be bins (e.g. mode answer's).
    """
    decode_kw = dict(interleaving=interleaving, codec=codec, max_gen_toks=heldout.max_gen_toks, batch_size=heldout.batch_size)
    real = decode_heldout(model, tokenizer, heldout.rows, heldout.task, desc=f"decode[{interleaving.name}]", **decode_kw)
    out: dict[str, Any] = {"real": decode_summary(real)}
    log(f"[analysis] {interleaving.name}: held-out accuracy {out['real']['accuracy']:.3f} ({len(real)} problems)")
    out["content_loss"] = heldout_content_loss(
        model, tokenizer, heldout.rows, heldout.task, interleaving=interleaving, codec=codec, max_passes=max_passes,
        batch_size=heldout.batch_size,
    )
    out["samples"] = {"confidence": [s.sequence_confidence for s in real], "correct": [s.correct for s in real]}
    if not full:
        return out
    view_codec = codec or reference_codec
    out["digits"] = digit_view(real, heldout.targets, view_codec)
    if codec is None:
        if reference_codec is not None:
            out["trace"] = trace_calibration(real, reference_codec, own_bins=True)
            out["trace_min"] = trace_calibration(real, reference_codec, own_bins=True, reduce="min")
        return out
    out["bin_histogram"] = bin_histogram(real, codec.num_bins)
    out["trace"] = trace_calibration(real, codec)
    out["trace_min"] = trace_calibration(real, codec, reduce="min")
    if out["trace"] is not None:
        probabilities = bin_probabilities(codec)
        out["samples"]["trace_confidence"] = [trace_confidence(s.bins, probabilities) for s in real]
    out["agreement"] = train_decode_agreement(
        model, real, interleaving=interleaving, codec=codec, pad_id=tokenizer.pad_id, max_passes=max_passes,
        batch_size=heldout.batch_size,
    ).to_dict()
    out["ablations"] = {}
    fixed = extreme_bins(codec)
    for name in ABLATIONS:
        if name == "shuffled":
            override_for = lambda first, rows: ShuffledBins.from_reference(reference_bins(real, first, rows), seed=first)
        else:
            override_for = lambda first, rows, k=fixed[name]: FixedBin(k)
        ablated = decode_heldout(model, tokenizer, heldout.rows, heldout.task, override_for=override_for,
                                 desc=f"decode[{interleaving.name}, {name}]", **decode_kw)
        summary = decode_summary(ablated)
        summary["accuracy_change"] = summary["accuracy"] - out["real"]["accuracy"]
        summary["answers_changed"] = sum(a.text != r.text for a, r in zip(ablated, real)) / len(real)
        if name != "shuffled":
            summary["bin"] = fixed[name]
        out["ablations"][name] = summary
        log(f"[analysis] {interleaving.name}: {name} accuracy {summary['accuracy']:.3f} "
            f"({summary['accuracy_change']:+.3f}; {summary['answers_changed']:.0%} of answers changed)")
    return out


__all__ = [
    "ABLATIONS",
    "HeldOut",
    "analyze_checkpoint",
    "bin_histogram",
    "calibration_of",
    "decode_summary",
    "digit_view",
    "extreme_bins",
    "trace_calibration",
]
