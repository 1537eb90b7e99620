"""Calibration of per-sample confidence against per-sample correctness: expected calibration
error (ECE, equal-width bins) and AUROC (the Mann-Whitney rank statistic, ties averaged).

Both take ``confidence`` in [0, 1] (one value per sample, e.g. a sequence confidence) and
``correct`` in {0, 1} (e.g. lm-eval's per-sample ``exact_match`` or ``acc``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import torch

DEFAULT_ECE_BINS = 10

ArrayLike = Union[torch.Tensor, Sequence[float]]


def _check_pairs(confidence: ArrayLike, correct: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, correct)`` as float64 vectors, after checking shapes and ranges."""
    conf = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
    hit = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    if conf.numel() != hit.numel():
        raise ValueError(f"confidence has {conf.numel()} values but correct has {hit.numel()}; expected one of each per sample")
    if conf.numel() == 0:
        raise ValueError("calibration needs at least one sample, got none")
    bad = ~torch.isfinite(conf) | (conf < 0) | (conf > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"confidence[{i}] is {conf[i].item()}; expected a finite value in [0, 1]")
    not_binary = (hit != 0) & (hit != 1)
    if bool(not_binary.any()):
        i = int(not_binary.nonzero()[0])
        raise ValueError(f"correct[{i}] is {hit[i].item()}; expected 0 or 1")
    return conf, hit


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, num_bins: int = DEFAULT_ECE_BINS) -> float:
    """ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|.

    Bins are equal-width over [0, 1]: bin k holds confidences in [k/B, (k+1)/B), the last bin also
    holds 1.0. Empty bins contribute nothing.

    Args:
        confidence: ``[N]`` values in [0, 1].
        correct: ``[N]`` values in {0, 1}.
        num_bins: B >= 1.
    """
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    conf, hit = _check_pairs(confidence, correct)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(conf, edges, right=True)
    # |sum_b (correct - confidence)| / N equals (n_b / N) * |acc_b - conf_b|.
    gap_per_bin = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, hit - conf)
    return float(gap_per_bin.abs().sum() / conf.numel())


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` ``[N]`` in ascending order; tied values share their mean rank."""
    uniq, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # 1-based rank of each group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    return mean_rank[inverse]


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the ROC curve of ``confidence`` as a score for ``correct``: the probability that
    a random correct sample has a higher confidence than a random wrong one (ties count 1/2).

    Computed as the Mann-Whitney U statistic from average ranks. Returns NaN when all samples are
    correct or all are wrong (the AUROC is undefined there).
    """
    conf, hit = _check_pairs(confidence, correct)
    n_pos = float(hit.sum())
    n_neg = conf.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float((average_ranks(conf) * hit).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass(frozen=True)
class CalibrationReport:
    """Calibration of one (task, filter, metric).

    Attributes:
        num_samples: N.
        accuracy: mean correctness.
        mean_confidence: mean confidence.
        ece: expected calibration error over ``num_bins`` equal-width bins.
        auroc: AUROC of confidence vs correctness (NaN when only one class occurs).
        num_bins: ECE bins.
    """

    num_samples: int
    accuracy: float
    mean_confidence: float
    ece: float
    auroc: float
    num_bins: int = DEFAULT_ECE_BINS

    def to_dict(self) -> dict:
        """JSON-friendly dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def calibration_report(confidence: ArrayLike, correct: ArrayLike, num_bins: int = DEFAULT_ECE_BINS) -> CalibrationReport:
    """ECE, AUROC, accuracy and mean confidence of one set of samples."""
    conf, hit = _check_pairs(confidence, correct)
    return CalibrationReport(
        num_samples=int(conf.numel()),
        accuracy=float(hit.mean()),
        mean_confidence=float(conf.mean()),
        ece=expected_calibration_error(conf, hit, num_bins),
        auroc=auroc(conf, hit),
        num_bins=num_bins,
    )


__all__ = [
    "DEFAULT_ECE_BINS",
    "CalibrationReport",
    "auroc",
    "average_ranks",
    "calibration_report",
    "expected_calibration_error",
]
