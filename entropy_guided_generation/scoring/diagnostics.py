"""Per-step and per-sequence diagnostics of the distributions that produced generated tokens.

Every per-step value describes q_t, the sampling policy's distribution (temperature + top-p,
renormalized) at the step that produced generated token t, unless its name says otherwise:

- ``rb_entropy``: H(q_t) in nats (the Rao-Blackwellized per-token entropy).
- ``head_mass`` / ``tail_mass``: mass the nucleus keeps / cuts under the untruncated tempered
  distribution softmax(z_t / tau) (1 / 0 when top_p = 1).
- ``two_point_entropy``: entropy (nats) of the two-point distribution (head_mass, tail_mass).
- ``top1_prob``, ``margin``: largest probability of q_t, and its lead over the second largest.
- ``collision_prob``: sum_j q_t(j)^2; ``renyi2_entropy``: -log collision_prob (nats).
- ``eff_support``: exp(H(q_t)), the number of equally likely tokens with the same entropy.
- ``logit_mean`` / ``logit_std``: mean and (population) std of the raw logits z_t over the vocabulary.
- ``eos_prob``: q_t(eos) (only with an ``eos_token_id``).
- ``policy_surprisal``: -log q_t(x_t) of the realized token (only when tokens are given).

Per sequence, each step series is summarized as sum / mean / min / max and the means of the first
and last ``window`` steps (``early_mean`` / ``late_mean``; the whole sequence when shorter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from entropy_guided_generation.scoring.policy import PolicyDistribution, SamplingPolicy

STEP_FIELDS = (
    "rb_entropy",
    "head_mass",
    "tail_mass",
    "two_point_entropy",
    "top1_prob",
    "margin",
    "collision_prob",
    "renyi2_entropy",
    "eff_support",
    "logit_mean",
    "logit_std",
    "eos_prob",
    "policy_surprisal",
)
SUMMARY_STATS = ("sum", "mean", "min", "max", "early_mean", "late_mean")


@dataclass
class TokenStepDiagnostics:
    """Per-step values of one sequence: each a float array ``[T]`` (see the module docstring);
    ``eos_prob`` / ``policy_surprisal`` are None when no eos id / no tokens were given."""

    rb_entropy: np.ndarray
    head_mass: np.ndarray
    tail_mass: np.ndarray
    two_point_entropy: np.ndarray
    top1_prob: np.ndarray
    margin: np.ndarray
    collision_prob: np.ndarray
    renyi2_entropy: np.ndarray
    eff_support: np.ndarray
    logit_mean: np.ndarray
    logit_std: np.ndarray
    eos_prob: Optional[np.ndarray] = None
    policy_surprisal: Optional[np.ndarray] = None


@dataclass
class SeriesSummary:
    """One step series of one sequence: sum, mean, min, max, and the means of the first and last
    ``window`` steps. All NaN for an empty sequence."""

    sum: float
    mean: float
    min: float
    max: float
    early_mean: float
    late_mean: float


@dataclass
class SequenceDiagnostics:
    """Per-sequence summaries: ``length`` (generated tokens) and one :class:`SeriesSummary` per step
    field of :class:`TokenStepDiagnostics` (None where that field is None)."""

    length: int
    rb_entropy: SeriesSummary
    head_mass: SeriesSummary
    tail_mass: SeriesSummary
    two_point_entropy: SeriesSummary
    top1_prob: SeriesSummary
    margin: SeriesSummary
    collision_prob: SeriesSummary
    renyi2_entropy: SeriesSummary
    eff_support: SeriesSummary
    logit_mean: SeriesSummary
    logit_std: SeriesSummary
    eos_prob: Optional[SeriesSummary] = None
    policy_surprisal: Optional[SeriesSummary] = None


@dataclass
class DiagnosticsPack:
    """Diagnostics of one sequence: per step and aggregated."""

    step: TokenStepDiagnostics
    sequence: SequenceDiagnostics


@dataclass
class DiagnosticsResults:
    """``diagnostics[b][g]``: the :class:`DiagnosticsPack` of response g to prompt b."""

    diagnostics: list[list[DiagnosticsPack]]


def _binary_entropy(head: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of (head, 1 - head), with 0 log 0 = 0."""
    tail = (1 - head).clamp(min=0)
    terms = torch.stack([head, tail])
    return -torch.where(terms > 0, terms * terms.clamp(min=torch.finfo(terms.dtype).tiny).log(), 0).sum(0)


class DistributionDiagnostics:
    """Computes diagnostics under one sampling policy.

    Args:
        top_p: nucleus mass of the policy.
        temperature: temperature of the policy.
        eos_token_id: id whose probability ``eos_prob`` reports (None: not reported).
        window: steps in the early / late windows of the per-sequence summaries.
        greedy: the policy is argmax decoding (q is a point mass).
        dtype: dtype of the math (float32 or float64).
    """

    def __init__(
        self,
        top_p: float = 1.0,
        temperature: float = 1.0,
        eos_token_id: Optional[int] = None,
        *,
        window: int = 8,
        greedy: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.policy = SamplingPolicy(temperature=temperature, top_p=top_p, greedy=greedy, dtype=dtype)
        self.eos_token_id = eos_token_id
        self.window = window

    @classmethod
    def for_policy(cls, policy: SamplingPolicy, eos_token_id: Optional[int] = None, window: int = 8) -> "DistributionDiagnostics":
        """Diagnostics under an existing policy (same temperature, top-p, greedy flag and dtype)."""
        return cls(policy.top_p, policy.temperature, eos_token_id, window=window, greedy=policy.greedy, dtype=policy.dtype)

    # ------------------------------------------------------------------ per step (vectorized)
    def step_statistics(
        self,
        logits: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        dist: Optional[PolicyDistribution] = None,
    ) -> dict[str, torch.Tensor]:
        """Every per-step value for a batch of distributions.

        Args:
            logits: ``[N, v]`` raw logits, one row per step.
            tokens: ``[N]`` realized tokens (adds ``policy_surprisal``).
            dist: q on these logits if the caller already has it (must come from ``self.policy``).

        Returns:
            ``{field: [N]}`` in the policy's dtype, for the fields of :data:`STEP_FIELDS` that apply.
        """
        dist = dist if dist is not None else self.policy.distribution(logits)
        z = logits.to(self.policy.dtype)
        head = self.policy.head_mass(z, dist)
        first, second = dist.top2()
        collision = (dist.q * dist.q).sum(-1)
        # Two-pass mean / population std by hand: cheaper on CPU than torch.std_mean.
        logit_mean = z.mean(-1, keepdim=True)
        centred = z - logit_mean
        logit_std, logit_mean = (centred * centred).mean(-1).sqrt(), logit_mean.squeeze(-1)
        out = {
            "rb_entropy": dist.entropy,
            "head_mass": head,
            "tail_mass": (1 - head).clamp(min=0),
            "two_point_entropy": _binary_entropy(head),
            "top1_prob": first,
            "margin": first - second,
            "collision_prob": collision,
            "renyi2_entropy": -collision.log(),
            "eff_support": dist.entropy.exp(),
            "logit_mean": logit_mean,
            "logit_std": logit_std,
        }
        if self.eos_token_id is not None:
            out["eos_prob"] = dist.q[..., self.eos_token_id]
        if tokens is not None:
            out["policy_surprisal"] = -dist.token_log_q(tokens)
        return out

    # ------------------------------------------------------------------ per sequence (vectorized)
    def summarize(self, series: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summaries of padded step series.

        Args:
            series: ``[..., n, T]`` values (any leading dims, e.g. one per field); column t belongs
                to generated token t (entries at t >= length are ignored).
            lengths: ``[n]`` valid steps per row.

        Returns:
            ``{stat: [..., n]}`` for each of :data:`SUMMARY_STATS` (NaN for rows of length 0).
        """
        t = torch.arange(series.shape[-1], device=series.device)
        lengths = lengths.to(series.device).unsqueeze(1)
        valid = t < lengths
        early = valid & (t < self.window)
        late = valid & (t >= lengths - self.window)
        zeros = torch.zeros((), dtype=series.dtype, device=series.device)

        def masked_mean(mask: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, series, zeros).sum(-1) / mask.sum(-1).to(series.dtype)

        total = torch.where(valid, series, zeros).sum(-1)
        empty = valid.sum(-1) == 0
        nan = torch.tensor(float("nan"), dtype=series.dtype, device=series.device)
        return {
            "sum": torch.where(empty, nan, total),
            "mean": total / valid.sum(-1).to(series.dtype),
            "min": torch.where(empty, nan, series.masked_fill(~valid, float("inf")).amin(-1)),
            "max": torch.where(empty, nan, series.masked_fill(~valid, float("-inf")).amax(-1)),
            "early_mean": masked_mean(early),
            "late_mean": masked_mean(late),
        }

    # ------------------------------------------------------------------ packs
    def packs(self, steps: dict[str, torch.Tensor], lengths: torch.Tensor) -> list[DiagnosticsPack]:
        """One :class:`DiagnosticsPack` per row from padded step tensors ``{field: [n, T]}``."""
        names = list(steps)
        return self._packs(names, torch.stack([steps[name].detach() for name in names]), lengths)

    def packs_from_flat(self, steps: dict[str, torch.Tensor], lengths: torch.Tensor) -> list[DiagnosticsPack]:
        """One :class:`DiagnosticsPack` per row from flat step values ``{field: [N]}``: the rows'
        real steps back to back in row-major order (N = sum of ``lengths``), as scoring yields them."""
        names = list(steps)
        flat = torch.stack([steps[name].detach() for name in names])  # [F, N]
        lengths = lengths.to(flat.device)
        width = int(lengths.max()) if lengths.numel() else 0
        valid = torch.arange(width, device=flat.device) < lengths.unsqueeze(1)
        padded = flat.new_full((len(names), lengths.numel(), width), float("nan"))
        padded[:, valid] = flat
        return self._packs(names, padded, lengths)

    def _packs(self, names: list[str], padded: torch.Tensor, lengths: torch.Tensor) -> list[DiagnosticsPack]:
        """Packs from step values ``padded`` ``[F, n, T]`` (field f is ``names[f]``): every field's
        summaries in one vectorized pass, then one Python object per row and field."""
        summaries = self.summarize(padded, lengths)
        stats = torch.stack([summaries[stat] for stat in SUMMARY_STATS], dim=-1)  # [F, n, S]
        steps_np = padded.cpu().numpy()
        stats_rows = stats.cpu().tolist()
        out = []
        for row, length in enumerate(lengths.tolist()):
            step = TokenStepDiagnostics(**{name: steps_np[f, row, :length] for f, name in enumerate(names)})
            per_field = {name: SeriesSummary(*stats_rows[f][row]) for f, name in enumerate(names)}
            out.append(DiagnosticsPack(step=step, sequence=SequenceDiagnostics(length=length, **per_field)))
        return out

    def compute_batch(
        self, logits: torch.Tensor, lengths: torch.Tensor, tokens: Optional[torch.Tensor] = None
    ) -> list[DiagnosticsPack]:
        """Diagnostics of ``n`` sequences.

        Args:
            logits: ``[n, T, v]``; ``logits[i, t]`` produced generated token t of row i.
            lengths: ``[n]`` generated tokens per row (later columns are ignored).
            tokens: ``[n, T]`` realized tokens (adds ``policy_surprisal``).
        """
        n, width, vocab = logits.shape
        flat_tokens = tokens.reshape(-1) if tokens is not None else None
        steps = self.step_statistics(logits.reshape(-1, vocab), flat_tokens)
        return self.packs({k: v.reshape(n, width) for k, v in steps.items()}, lengths)

    def compute_from_logits(self, logits: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> DiagnosticsPack:
        """Diagnostics of one sequence: ``logits`` ``[T, v]`` (row t produced token t), ``tokens`` ``[T]``."""
        if logits.dim() != 2:
            raise ValueError(f"compute_from_logits expects one sequence's logits [T, v], got shape {tuple(logits.shape)}")
        lengths = torch.tensor([logits.shape[0]])
        batch_tokens = tokens.unsqueeze(0) if tokens is not None else None
        return self.compute_batch(logits.unsqueeze(0), lengths, batch_tokens)[0]


__all__ = [
    "STEP_FIELDS",
    "SUMMARY_STATS",
    "DiagnosticsPack",
    "DiagnosticsResults",
    "DistributionDiagnostics",
    "SequenceDiagnostics",
    "SeriesSummary",
    "TokenStepDiagnostics",
]
