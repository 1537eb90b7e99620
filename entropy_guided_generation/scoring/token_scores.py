"""Per-token scores of generated tokens from the logits that produced them.

Input is a batch's region logits ``[n, T, v]`` (column t produced generated token t) and the
generated tokens ``[n, T]`` with their lengths. Only real tokens (t < length) are scored: they are
gathered into one flat list in row-major order, so row i's tokens are contiguous and
``torch.split(values, lengths)`` gives each row's. The vocabulary math runs over chunks of that
list to bound memory ([chunk, v] intermediates), never over single tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from entropy_guided_generation.scoring.diagnostics import DistributionDiagnostics
from entropy_guided_generation.scoring.policy import PolicyDistribution, SamplingPolicy

BASELINE_FEATURES = (
    "rb_entropy",
    "rb_varentropy",
    "top1_prob",
    "top1_margin",
    "tail_mass",
    "log_nucleus_size",
    "position",
)
"""Per-step regression-baseline features: all depend on the prefix only (the distribution q_t and
the step index t), never on the token drawn at t, so a baseline built from them keeps a
score-function estimator unbiased."""

DEFAULT_CHUNK_ELEMENTS = 1 << 18
"""Logits per scoring chunk (1 MiB of float32): large enough that per-op overhead is amortized,
small enough that a chunk's [chunk, v] intermediates stay in cache (see bench/scoring.py)."""


@dataclass
class TokenScores:
    """Scores of a batch's real generated tokens, flat in row-major order (``[N]``, N = sum of lengths).

    Attributes:
        log_p: log p(x_t) under the model's own distribution softmax(z_t) (nats).
        log_q: log q(x_t) under the sampling policy (-inf for a token outside the nucleus).
        rb_entropy: H(q_t) in nats, or None when not asked for.
        baseline: ``[N, 7]`` features named by :data:`BASELINE_FEATURES` (no graph), or None.
        diagnostics: ``{field: [N]}`` per-step diagnostics (no graph), or None.
        lengths: ``[n]`` real tokens per row.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    rb_entropy: Optional[torch.Tensor]
    baseline: Optional[torch.Tensor]
    diagnostics: Optional[dict[str, torch.Tensor]]
    lengths: torch.Tensor

    def per_row(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split flat ``values`` ``[N, ...]`` into one tensor per row."""
        return torch.split(values, self.lengths.tolist())


def _baseline_features(policy: SamplingPolicy, z: torch.Tensor, dist: PolicyDistribution, position: torch.Tensor) -> torch.Tensor:
    first, second = dist.top2()
    columns = [
        dist.entropy,
        dist.varentropy(),
        first,
        first - second,
        1 - policy.head_mass(z, dist),
        dist.kept_count().to(dist.entropy.dtype).log(),
        position.to(dist.entropy.dtype),
    ]
    return torch.stack(columns, dim=-1)


def _score_chunk(
    z: torch.Tensor,
    targets: torch.Tensor,
    position: torch.Tensor,
    policy: SamplingPolicy,
    *,
    rb: bool,
    diagnostics: Optional[DistributionDiagnostics],
    baseline: bool,
) -> dict:
    statistics = rb or diagnostics is not None or baseline
    dist = policy.distribution(z, statistics=statistics)
    target = targets.unsqueeze(-1)
    out: dict = {"log_q": dist.token_log_q(targets)}
    if policy.is_plain_softmax:
        out["log_p"] = out["log_q"]
    else:
        z_math = z.to(policy.dtype)
        out["log_p"] = z_math.gather(-1, target).squeeze(-1) - log_normalizer(z_math)
    if not statistics:
        return out
    if rb:
        out["rb_entropy"] = dist.entropy
    with torch.no_grad():
        plain = dist.detach()
        if baseline:
            out["baseline"] = _baseline_features(policy, z.detach(), plain, position)
        if diagnostics is not None:
            out["diagnostics"] = diagnostics.step_statistics(z.detach(), targets, dist=plain)
    return out


def log_normalizer(z: torch.Tensor) -> torch.Tensor:
    """logsumexp(z) over the last dim, ``[...]``, for rows with a finite maximum (model logits).

    As max + log sum exp(z - max) written out: torch.logsumexp adds passes that handle infinite
    maxima, about twice the time on CPU. The gradient is softmax(z), as logsumexp's."""
    peak = z.detach().amax(-1, keepdim=True)
    return (peak + (z - peak).exp().sum(-1, keepdim=True).log()).squeeze(-1)


class RealTokens(NamedTuple):
    """The real generated tokens of some rows with the logits that produced them, flat in row-major
    order (N = sum of ``lengths``; row i's tokens are contiguous).

    Attributes:
        logits: ``[N, v]``; ``logits[k]`` produced ``tokens[k]``.
        tokens: ``[N]`` generated tokens.
        positions: ``[N]`` index t of each token within its row's generated region.
        lengths: ``[n]`` real tokens per row.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_region(cls, logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> "RealTokens":
        """From a batch's region logits ``[n, T, v]`` (column t produced ``tokens[:, t]``), tokens
        ``[n, T]`` and lengths ``[n]``: columns t >= length are dropped."""
        n, width, vocab = logits.shape
        lengths = lengths.to(logits.device)
        position = torch.arange(width, device=logits.device).expand(n, width)
        real = (position < lengths.unsqueeze(1)).view(-1).nonzero().squeeze(-1)  # row-major flat indices
        return cls(
            logits.reshape(n * width, vocab).index_select(0, real),
            tokens.to(logits.device).reshape(-1).index_select(0, real),
            real.remainder(width),
            lengths,
        )

    @classmethod
    def cat(cls, parts: list["RealTokens"]) -> "RealTokens":
        """The rows of ``parts`` one after another."""
        return parts[0] if len(parts) == 1 else cls(*(torch.cat(fields) for fields in zip(*parts)))


def score_generated_tokens(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    policy: SamplingPolicy,
    *,
    rb: bool = False,
    diagnostics: Optional[DistributionDiagnostics] = None,
    baseline: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> TokenScores:
    """Score the real generated tokens of a batch.

    Args:
        logits: ``[n, T, v]`` float logits; ``logits[i, t]`` produced ``tokens[i, t]``. Gradients
            flow into ``log_p``, ``log_q`` and ``rb_entropy`` when grad mode is on.
        tokens: ``[n, T]`` generated tokens.
        lengths: ``[n]`` real tokens per row (columns t >= length are ignored).
        policy: the sampling policy q.
        rb: compute H(q_t).
        diagnostics: compute per-step diagnostics with this (its policy must equal ``policy``).
        baseline: compute :data:`BASELINE_FEATURES`.
        chunk_elements: vocabulary math runs on ``chunk_elements // v`` tokens at a time.
    """
    return score_real_tokens(
        RealTokens.from_region(logits, tokens, lengths), policy,
        rb=rb, diagnostics=diagnostics, baseline=baseline, chunk_elements=chunk_elements,
    )


def score_real_tokens(
    real: RealTokens,
    policy: SamplingPolicy,
    *,
    rb: bool = False,
    diagnostics: Optional[DistributionDiagnostics] = None,
    baseline: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> TokenScores:
    """Score flat real tokens (see :func:`score_generated_tokens` for the options)."""
    if diagnostics is not None and diagnostics.policy != policy:
        raise ValueError(f"diagnostics use policy {diagnostics.policy}, but tokens are scored under {policy}")
    size = max(1, chunk_elements // real.logits.shape[-1])
    starts = range(0, real.logits.shape[0], size) or range(1)  # an all-empty batch still gets (empty) fields
    chunks = [
        _score_chunk(
            real.logits[i : i + size], real.tokens[i : i + size], real.positions[i : i + size], policy,
            rb=rb, diagnostics=diagnostics, baseline=baseline,
        )
        for i in starts
    ]

    def joined(key: str) -> Optional[torch.Tensor]:
        return torch.cat([c[key] for c in chunks]) if key in chunks[0] else None

    diag = None
    if diagnostics is not None:
        diag = {name: torch.cat([c["diagnostics"][name] for c in chunks]) for name in chunks[0]["diagnostics"]}
    return TokenScores(
        log_p=joined("log_p"),
        log_q=joined("log_q"),
        rb_entropy=joined("rb_entropy"),
        baseline=joined("baseline"),
        diagnostics=diag,
        lengths=real.lengths,
    )


__all__ = ["BASELINE_FEATURES", "RealTokens", "TokenScores", "score_generated_tokens", "score_real_tokens"]
