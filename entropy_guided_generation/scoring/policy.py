"""The sampling policy q: temperature + nucleus (top-p) truncation with renormalization.

One object, :class:`SamplingPolicy`, is the only place this math lives: generation samples from
``policy.log_probs(logits)`` and records log q of the drawn token, and teacher-forced scoring calls
the same method on the same logits, so the log q stored at generation time and the one recomputed
later agree up to the forward's floating-point noise.

With ``z = logits / temperature`` and ``p = softmax(z)``, q is p restricted to the nucleus of
:mod:`~entropy_guided_generation.generation.nucleus` (the rule the decoders sample under: every
token tied at the boundary kept) and renormalized.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from entropy_guided_generation.generation.nucleus import NucleusSearch, nucleus_mask, nucleus_search


ENTROPY_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SamplingPolicy:
    """The distribution q a sampler draws tokens from.

    Attributes:
        temperature: tau > 0 dividing the logits (ignored when ``greedy``).
        top_p: nucleus mass in (0, 1]; 1.0 keeps the whole vocabulary.
        greedy: q is a point mass on the argmax of the logits (lowest id among tied maxima).
        dtype: dtype of the policy math (float32 or float64); logits are cast to it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy=True for argmax decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.dtype not in ENTROPY_DTYPES:
            raise ValueError(f"policy dtype must be torch.float32 or torch.float64, got {self.dtype}")

    # ------------------------------------------------------------------ the distribution
    def kept_mask(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """Which tokens the policy can draw: ``[..., v]`` bool, or None when every token can.

        For ``greedy`` the mask holds the single argmax token.
        """
        if self.greedy:
            top = logits.argmax(-1, keepdim=True)
            return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
        if self.top_p >= 1.0:
            return None
        return nucleus_mask(self._tempered(logits), self.top_p)

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """z / tau in the policy dtype, ``[..., v]`` (as z * (1 / tau): a multiplication costs a
        third of a division on CPU, and generation and scoring both go through here)."""
        z = logits.to(self.dtype)
        return z * (1.0 / self.temperature) if self.temperature != 1.0 else z

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log q over the vocabulary: ``[..., v]`` in ``self.dtype``, -inf outside the kept set.

        Args:
            logits: ``[..., v]`` raw model logits (the temperature is applied here).
        """
        return self.distribution(logits, statistics=False).log_q

    def token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log q of ``tokens`` ``[...]`` under the distributions ``logits`` ``[..., v]``.

        A token outside the nucleus gets -inf: the policy could not have drawn it.
        """
        return self.distribution(logits, statistics=False).token_log_q(tokens)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of q in nats, ``[...]``; differentiable w.r.t. ``logits`` (excluded tokens add
        nothing, to the value or to the gradient)."""
        return self.distribution(logits).entropy

    @property
    def is_plain_softmax(self) -> bool:
        """True when q = softmax(logits) exactly (temperature 1, no truncation, sampling)."""
        return not self.greedy and self.temperature == 1.0 and self.top_p >= 1.0

    def head_mass(self, logits: torch.Tensor, dist: "PolicyDistribution") -> torch.Tensor:
        """Mass of q's kept set under the untruncated softmax(logits / tau), ``[...]``.

        1 without truncation; for a nucleus or greedy policy, the mass the truncation keeps.
        """
        if self.top_p >= 1.0 and not self.greedy:
            return torch.ones_like(dist.entropy)
        if dist.log_head_mass is not None:
            return dist.log_head_mass.exp().clamp(max=1.0)
        z = self._tempered(logits)
        # For a kept token j, log q_j = z_j - log(kept normalizer); the argmax of z is kept and is
        # the argmax of q, so log(kept normalizer) = max z - max log q, and log(head mass) = that
        # minus logsumexp(z). (amax only: much cheaper than locating the argmax.)
        log_kept = z.amax(-1) - dist.log_q.amax(-1)
        return (log_kept - torch.logsumexp(z, dim=-1)).exp().clamp(max=1.0)

    def distribution(self, logits: torch.Tensor, *, statistics: bool = True) -> "PolicyDistribution":
        """q on ``logits`` ``[..., v]`` with the intermediates that entropies and diagnostics share.

        log q = z / tau - log(kept normalizer) on the kept set (the nucleus of softmax(z / tau)).
        The nucleus search already has each row's maximum, exp(z - max) and full normalizer (and,
        where it searched past the maximum, the second-largest value), so the kept normalizer, the
        log head mass and the two largest probabilities need no further sort. With
        ``statistics=False`` only log q is formed (what sampling and token log-probs need).
        """
        if self.greedy:
            keep = self.kept_mask(logits).to(self.dtype)
            return PolicyDistribution.from_kept(torch.zeros_like(keep), keep, statistics=statistics)
        z = self._tempered(logits)
        if self.top_p >= 1.0:
            return PolicyDistribution.from_kept(torch.log_softmax(z, dim=-1), None, statistics=statistics)
        nucleus = nucleus_search(z, self.top_p)
        keep = float_mask_at_least(z, nucleus.threshold)
        # The kept normalizer from exp(z - max): the search's weights, or the same formula again
        # when z needs a gradient through it.
        weights = (z - nucleus.peak).exp() if z.requires_grad else nucleus.weights
        log_kept = nucleus.peak + (weights * keep).sum(-1, keepdim=True).log()
        if not statistics:
            return PolicyDistribution.from_kept(z - log_kept, keep, statistics=False)
        log_kept_values = log_kept.detach()
        return PolicyDistribution.from_kept(
            z - log_kept, keep,
            log_head_mass=(log_kept_values - nucleus.log_norm).squeeze(-1),
            top_two=_top_two_kept(nucleus, keep, log_kept_values),
        )

    # ------------------------------------------------------------------ drawing
    def sample(
        self, logits: torch.Tensor, rng: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row from q and return it with its log q.

        Sampling is the exponential race ``argmax(log q - log E)``, ``E ~ Exp(1)`` drawn from ``rng``
        (the same trick torchtune and gpt-fast use), so a fixed generator gives fixed tokens.

        Args:
            logits: ``[b, v]`` raw logits of the next position.
            rng: optional ``torch.Generator`` on ``logits``' device.

        Returns:
            ``(tokens [b] long, log_q [b] in self.dtype)``.
        """
        log_q = self.log_probs(logits)
        if self.greedy:
            tokens = logits.argmax(-1)
        else:
            race = torch.empty_like(log_q).exponential_(1, generator=rng).log()
            tokens = (log_q - race).argmax(-1)
        return tokens, log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class PolicyDistribution:
    """q over the vocabulary and what several statistics reuse.

    Excluded tokens are marked by a 0/1 float mask, not by -inf entries: on CPU, elementwise ops
    over -inf entries (exp, logsumexp) are slower than over finite ones, and bool masks are
    slow to form and to apply (``masked_fill`` / ``where``), so every statistic is formed from finite
    tensors by multiplication and :attr:`log_q` (with its -inf entries) is built only when asked for.

    Attributes:
        shifted_log_q: ``[..., v]`` equal to log q on the kept set; finite but meaningless elsewhere.
        keep: ``[..., v]`` 1.0 on the tokens q can draw, 0.0 elsewhere (None: every token).
        q: ``[..., v]`` probabilities, 0 outside the kept set (None when built without statistics).
        safe_log_q: ``[..., v]`` log q on the kept set, 0 elsewhere (finite, safe to multiply).
        entropy: ``[...]`` H(q) in nats.
        log_head_mass: ``[...]`` log of the mass q's kept set has under the untruncated
            softmax(z / tau), when the nucleus search produced it (else None).
        top_two: ``[..., 2]`` the two largest probabilities of q, when the nucleus search
            produced them (else None: :meth:`top2` finds them).
    """

    shifted_log_q: torch.Tensor
    keep: Optional[torch.Tensor]
    q: Optional[torch.Tensor]
    safe_log_q: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    log_head_mass: Optional[torch.Tensor] = None
    top_two: Optional[torch.Tensor] = None

    @classmethod
    def from_kept(
        cls,
        shifted_log_q: torch.Tensor,
        keep: Optional[torch.Tensor],
        *,
        statistics: bool = True,
        log_head_mass: Optional[torch.Tensor] = None,
        top_two: Optional[torch.Tensor] = None,
    ) -> "PolicyDistribution":
        """q from log q on the kept set (``shifted_log_q``, finite) and the 0/1 ``keep`` mask (None: all)."""
        if not statistics:
            return cls(shifted_log_q, keep, None, None, None)
        if keep is None:
            safe, q = shifted_log_q, shifted_log_q.exp()
        else:
            safe = shifted_log_q * keep
            q = safe.exp() * keep
        return cls(shifted_log_q, keep, q, safe, -(q * safe).sum(-1), log_head_mass, top_two)

    @classmethod
    def from_log_probs(cls, log_q: torch.Tensor) -> "PolicyDistribution":
        """q from log-probabilities that hold -inf on excluded tokens (a NaN stays NaN)."""
        keep = torch.ne(log_q.detach(), float("-inf"), out=torch.empty_like(log_q.detach()))
        return cls.from_kept(log_q.nan_to_num(nan=float("nan"), neginf=0.0, posinf=float("inf")), keep)

    @cached_property
    def log_q(self) -> torch.Tensor:
        """``[..., v]`` log q, -inf outside the kept set."""
        if self.keep is None:
            return self.shifted_log_q
        return self.shifted_log_q.masked_fill(self.keep == 0, float("-inf"))

    def token_log_q(self, tokens: torch.Tensor) -> torch.Tensor:
        """log q of ``tokens`` ``[...]`` (-inf for a token outside the kept set)."""
        index = tokens.unsqueeze(-1)
        values = self.shifted_log_q.gather(-1, index).squeeze(-1)
        if self.keep is None:
            return values
        return values.masked_fill(self.keep.gather(-1, index).squeeze(-1) == 0, float("-inf"))

    def detach(self) -> "PolicyDistribution":
        """The same values without a graph."""
        return PolicyDistribution(*(None if v is None else v.detach() for v in (
            self.shifted_log_q, self.keep, self.q, self.safe_log_q, self.entropy, self.log_head_mass, self.top_two
        )))

    def varentropy(self) -> torch.Tensor:
        """Variance of the surprisal -log q under q, ``[...]`` in nats^2."""
        centred = self.safe_log_q + self.entropy.unsqueeze(-1)
        return (self.q * centred * centred).sum(-1)

    def top2(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two largest probabilities ``([...], [...])`` (the second is 0 for a one-token vocabulary)."""
        if self.top_two is not None:
            return self.top_two[..., 0], self.top_two[..., 1]
        if self.q.shape[-1] == 1:
            return self.q[..., 0], torch.zeros_like(self.q[..., 0])
        values = self.q.topk(2, dim=-1).values
        return values[..., 0], values[..., 1]

    def kept_count(self) -> torch.Tensor:
        """Number of tokens q can draw, ``[...]`` (long)."""
        if self.keep is None:
            return torch.full(self.shifted_log_q.shape[:-1], self.shifted_log_q.shape[-1], device=self.shifted_log_q.device)
        return self.keep.sum(-1).long()


def _top_two_kept(nucleus: NucleusSearch, keep: torch.Tensor, log_kept: torch.Tensor) -> torch.Tensor:
    """q's two largest probabilities ``[..., 2]`` (q_j = exp(z_j - log_kept) on the kept set).

    The first is the maximum's. Where the threshold is the maximum, q keeps exactly the maximum's
    ties: the second is the first again when there are several, else 0. Elsewhere the threshold
    lies below the second-largest value, which the search found."""
    tied = keep.sum(-1, keepdim=True) > 1
    second = torch.where(nucleus.threshold < nucleus.peak, nucleus.second,
                         torch.where(tied, nucleus.peak, torch.full_like(nucleus.peak, float("-inf"))))
    return (torch.cat([nucleus.peak, second], dim=-1) - log_kept).exp()


def float_mask_at_least(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``values >= threshold`` as 1.0 / 0.0 in ``values``' dtype (no gradient).

    Written straight into a float tensor, which on CPU is cheaper than forming a bool mask and
    converting it (see bench/scoring.py)."""
    values = values.detach()
    return torch.ge(values, threshold, out=torch.empty_like(values))


def entropy_of_log_probs(log_q: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum q log q`` (nats) over the last dim of log-probabilities that may hold -inf.

    Differs from :func:`signals.entropy_from_log_probs` in its gradient: excluded tokens (log q =
    -inf) are replaced by 0 *before* the product, so backward never forms ``0 * -inf`` and the
    gradient w.r.t. the kept logits is finite.
    """
    return PolicyDistribution.from_log_probs(log_q).entropy


__all__ = [
    "ENTROPY_DTYPES",
    "PolicyDistribution",
    "SamplingPolicy",
    "entropy_of_log_probs",
    "float_mask_at_least",
]
