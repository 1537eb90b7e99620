"""What fixed-point binning did during a logging interval, summed over micro-batches and ranks.

Logged (prefix ``conf/``): ``passes_mean`` (no-grad forwards per micro-batch), ``unconverged_fraction``
(micro-batches an ``interleaving.max_passes`` cap stopped before every bin was final: 0 at the exact
default), ``changed_fraction`` (share of slot bins the last pass changed, over micro-batches with >= 2
passes), ``recomputed_fraction`` (mean share of a full pass's rows that each pass after the first
forwarded), ``signal_mean``
(mean confidence signal at slots: nats for entropy), ``slots`` (confidence tokens inserted),
``bin_KK`` (share of slots in bin KK: the histogram) and, in mode marker, ``marker_found_fraction``.

:func:`read_disk_log` reads back what torchtune's ``DiskLogger`` wrote (loss curves for plots and tests).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, Union

import torch

from entropy_guided_generation.fixed_point import FixedPointBins

# Layout of the packed accumulator (one tensor, so that a single all-reduce sums everything).
_FIELDS = (
    "batches", "passes", "unconverged", "changed", "changed_of", "recomputed", "recomputed_of", "signal_sum", "slots",
    "marker_rows", "marker_found",
)


class ConfidenceStats:
    """Running sums for one logging interval.

    Args:
        num_bins: K, the number of confidence tokens.
        device: where the accumulator lives (the training device, for all-reduce).
    """

    def __init__(self, num_bins: int, device: torch.device):
        self.num_bins = num_bins
        self.totals = torch.zeros(len(_FIELDS) + num_bins, dtype=torch.float64, device=device)

    def _add(self, field: str, value: torch.Tensor | float) -> None:
        self.totals[_FIELDS.index(field)] += value

    def add_batch(self, result: FixedPointBins, slots: torch.Tensor) -> None:
        """Record one micro-batch's binning.

        Args:
            result: what ``compute_bins`` returned.
            slots: ``[b, n]`` the slots it was given.
        """
        num_slots = slots.sum()
        self._add("batches", 1.0)
        self._add("passes", float(result.passes))
        self._add("unconverged", 0.0 if result.converged else 1.0)
        if result.passes >= 2:
            self._add("changed", float(result.changed_fraction) * num_slots)
            self._add("changed_of", num_slots)
            self._add("recomputed", float(result.recomputed_fraction))
            self._add("recomputed_of", 1.0)
        self._add("slots", num_slots)
        if bool(slots.any()):
            self._add("signal_sum", result.signal[slots].to(torch.float64).sum())
            hist = torch.bincount(result.bins[slots], minlength=self.num_bins)
            self.totals[len(_FIELDS) :] += hist.to(torch.float64)

    def add_marker_rows(self, rows: int, found: torch.Tensor) -> None:
        """Record how many rows of a mode-marker batch contain the marker in their response."""
        self._add("marker_rows", float(rows))
        self._add("marker_found", found.sum())

    def reset(self) -> None:
        self.totals.zero_()

    def log_dict(self) -> Dict[str, float]:
        """The ``conf/*`` metrics of the interval (call after summing over ranks)."""
        t = dict(zip(_FIELDS, self.totals[: len(_FIELDS)].tolist()))
        hist = self.totals[len(_FIELDS) :].tolist()

        def ratio(num: float, den: float) -> float:
            return num / den if den else math.nan

        out = {
            "conf/passes_mean": ratio(t["passes"], t["batches"]),
            "conf/unconverged_fraction": ratio(t["unconverged"], t["batches"]),
            "conf/changed_fraction": ratio(t["changed"], t["changed_of"]),
            "conf/recomputed_fraction": ratio(t["recomputed"], t["recomputed_of"]),
            "conf/signal_mean": ratio(t["signal_sum"], t["slots"]),
            "conf/slots": t["slots"],
        }
        out.update({f"conf/bin_{k:02d}": ratio(count, t["slots"]) for k, count in enumerate(hist)})
        if t["marker_rows"]:
            out["conf/marker_found_fraction"] = t["marker_found"] / t["marker_rows"]
        return out


_DISK_LOG_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def read_disk_log(log_dir: Union[str, Path]) -> Dict[int, Dict[str, float]]:
    """Every metric a ``DiskLogger`` wrote under ``log_dir``, as ``{step: {name: value}}``.

    ``DiskLogger`` writes one file ``log_<unix time>.txt`` per run, one line per ``log_dict`` call:
    ``Step <n> | name:value name:value ...``. A resumed run adds a file; files are read oldest
    first, so a step logged twice keeps its latest value.

    Raises:
        FileNotFoundError: when ``log_dir`` holds no ``log_*.txt`` file.
    """
    files = sorted(Path(log_dir).glob("log_*.txt"), key=lambda f: (len(f.name), f.name))
    if not files:
        raise FileNotFoundError(f"no DiskLogger file log_*.txt in {log_dir}")
    steps: Dict[int, Dict[str, float]] = {}
    for file in files:
        for line in file.read_text().splitlines():
            match = _DISK_LOG_LINE.match(line.strip())
            if match is None:
                continue
            pairs = (item.split(":", 1) for item in match.group(2).split())
            steps.setdefault(int(match.group(1)), {}).update({name: float(value) for name, value in pairs})
    return steps


__all__ = ["ConfidenceStats", "read_disk_log"]
