"""The sampling policy q: temperature + nucleus (top-p) truncation with renormalization.

One object, :class:`SamplingPolicy`, is the only place this math lives: generation samples from
``policy.log_probs(logits)`` and records log q of the drawn token, and teacher-forced scoring calls
the same method on the same logits, so the log q stored at generation time and the one recomputed
later agree up to the forward's floating-point noise.

Nucleus rule (deterministic, independent of sort order): with ``z = logits / temperature`` and
``p = softmax(z)``, token j is kept iff the mass of the tokens with a strictly larger ``z`` is
``< top_p``. So the most likely token is always kept, and tokens tied at the boundary are kept or
dropped together (all kept). q is p restricted to the kept set and renormalized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from entropy_guided_generation import signals

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
        return nucleus_mask(logits.to(self.dtype) / self.temperature, self.top_p)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log q over the vocabulary: ``[..., v]`` in ``self.dtype``, -inf outside the kept set.

        Args:
            logits: ``[..., v]`` raw model logits (the temperature is applied here).
        """
        kept = self.kept_mask(logits)
        if self.greedy:
            zeros = torch.zeros_like(logits, dtype=self.dtype)
            return zeros.masked_fill(~kept, float("-inf"))
        if kept is not None:
            logits = logits.masked_fill(~kept, float("-inf"))
        return signals.log_probs(logits, temperature=self.temperature, dtype=self.dtype)

    def token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log q of ``tokens`` ``[...]`` under the distributions ``logits`` ``[..., v]``.

        A token outside the nucleus gets -inf: the policy could not have drawn it.
        """
        return self.log_probs(logits).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of q in nats, ``[...]``; differentiable w.r.t. ``logits`` (see :func:`entropy_of_log_probs`)."""
        return entropy_of_log_probs(self.log_probs(logits))

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
        z = logits.to(self.dtype) / self.temperature
        # For a kept token j, log q_j = z_j - log(kept normalizer); the argmax of z is kept and is
        # the argmax of q, so log(kept normalizer) = max z - max log q, and log(head mass) = that
        # minus logsumexp(z). (amax only: much cheaper than locating the argmax.)
        log_kept = z.amax(-1) - dist.log_q.amax(-1)
        return (log_kept - torch.logsumexp(z, dim=-1)).exp().clamp(max=1.0)

    def distribution(self, logits: torch.Tensor) -> "PolicyDistribution":
        """q on ``logits`` ``[..., v]`` with the intermediates that entropies and diagnostics share."""
        return PolicyDistribution.from_log_probs(self.log_probs(logits))

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

    Attributes:
        log_q: ``[..., v]`` log q, -inf outside the kept set.
        q: ``[..., v]`` probabilities.
        safe_log_q: ``[..., v]`` log q with 0 where q = 0 (finite everywhere, safe to multiply).
        entropy: ``[...]`` H(q) in nats.
    """

    log_q: torch.Tensor
    q: torch.Tensor
    safe_log_q: torch.Tensor
    entropy: torch.Tensor

    @classmethod
    def from_log_probs(cls, log_q: torch.Tensor) -> "PolicyDistribution":
        q = log_q.exp()
        safe = torch.where(q > 0, log_q, torch.zeros_like(log_q))
        return cls(log_q=log_q, q=q, safe_log_q=safe, entropy=-(q * safe).sum(-1))

    def detach(self) -> "PolicyDistribution":
        """The same values without a graph."""
        return PolicyDistribution(self.log_q.detach(), self.q.detach(), self.safe_log_q.detach(), self.entropy.detach())

    def varentropy(self) -> torch.Tensor:
        """Variance of the surprisal -log q under q, ``[...]`` in nats^2."""
        centred = self.safe_log_q + self.entropy.unsqueeze(-1)
        return (self.q * centred * centred).sum(-1)

    def top2(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two largest probabilities ``([...], [...])`` (the second is 0 for a one-token vocabulary)."""
        if self.q.shape[-1] == 1:
            return self.q[..., 0], torch.zeros_like(self.q[..., 0])
        values = self.q.topk(2, dim=-1).values
        return values[..., 0], values[..., 1]

    def kept_count(self) -> torch.Tensor:
        """Number of tokens q can draw, ``[...]`` (long)."""
        return torch.isfinite(self.log_q).sum(-1)


NUCLEUS_FIRST_K = 4
NUCLEUS_SECOND_K = 64


def _nucleus_threshold(sorted_head: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From the k largest scaled logits per row (descending) and each row's full log-normalizer:
    ``(threshold [r, 1], resolved [r])``. A row is resolved when its boundary lies inside the k values."""
    cumulative = (sorted_head - log_norm).exp().cumsum(-1)
    k = sorted_head.shape[-1]
    last_kept = (cumulative < top_p).sum(-1, keepdim=True).clamp(max=k - 1)
    return sorted_head.gather(-1, last_kept), cumulative[:, -1] >= top_p


def nucleus_mask(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens kept by the nucleus of ``softmax(scaled_logits)``: ``[..., v]`` bool.

    Token j is kept iff the mass of tokens with a strictly larger scaled logit is ``< top_p``;
    ties at the boundary are therefore all kept, whatever order a sort puts them in.

    Implementation: in descending order the inclusive cumulative mass ``c`` is monotone, so the
    kept sorted positions are the first ``m + 1`` where ``m = #{k : c_k < top_p}``; every token
    whose logit is >= the logit at sorted position ``m`` is kept (this adds the boundary's ties).
    Only the head of the order is needed: the top 4 values settle most rows of a peaked
    distribution, the top 64 most others; only the rest (flat distributions) pay a full sort.
    The 64-stage is skipped for rows that cannot reach ``top_p`` in it (64 tokens hold at most
    16 x the mass of the top 4).
    """
    shape, v = scaled_logits.shape, scaled_logits.shape[-1]
    flat = scaled_logits.detach().reshape(-1, v)  # the kept set is piecewise constant: no gradient
    log_norm = torch.logsumexp(flat, dim=-1, keepdim=True)
    first_k = min(NUCLEUS_FIRST_K, v)
    head = flat.topk(first_k, dim=-1).values
    threshold, resolved = _nucleus_threshold(head, log_norm, top_p)
    pending = (~resolved).nonzero().squeeze(-1)
    if pending.numel() and NUCLEUS_SECOND_K < v:
        may_reach = (head[pending] - log_norm[pending]).exp().sum(-1) * (NUCLEUS_SECOND_K / first_k) >= top_p
        rows = pending[may_reach]
        if rows.numel():
            found, done = _nucleus_threshold(flat[rows].topk(NUCLEUS_SECOND_K, dim=-1).values, log_norm[rows], top_p)
            threshold[rows[done]] = found[done]
            resolved[rows[done]] = True
            pending = (~resolved).nonzero().squeeze(-1)
    if pending.numel():
        ordered = torch.sort(flat[pending], dim=-1, descending=True).values
        threshold[pending] = _nucleus_threshold(ordered, log_norm[pending], top_p)[0]
    return scaled_logits.detach() >= threshold.view(*shape[:-1], 1)


def entropy_of_log_probs(log_q: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum q log q`` (nats) over the last dim of log-probabilities that may hold -inf.

    Differs from :func:`signals.entropy_from_log_probs` in its gradient: excluded tokens (log q =
    -inf) are replaced by 0 *before* the product, so backward never forms ``0 * -inf`` and the
    gradient w.r.t. the kept logits is finite.
    """
    return PolicyDistribution.from_log_probs(log_q).entropy


__all__ = ["ENTROPY_DTYPES", "PolicyDistribution", "SamplingPolicy", "entropy_of_log_probs", "nucleus_mask"]
