"""Entropix-style adaptive sampling: the regimes, one vectorized sampling step, and the torchtune
decoder ``generate_entropix`` (registered as decoder ``"entropix"``).

A step reads the next-token logits and the last layer's attention of the current query
(:mod:`entropix_metrics`), picks a regime per row (see :class:`EntropixConfig`), sets that row's
temperature / top-k / top-p / min-p, and draws the token. The transformers front-end
(:class:`HookBasedEntropySampler`) runs the same :func:`entropix_step`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from entropy_guided_generation.confidence import encode_single_token
from entropy_guided_generation.generation import register_decoder
from entropy_guided_generation.generation.common import DecodeResult, check_prompt, decode
from entropy_guided_generation.sampling.entropix_config import EntropixConfig
from entropy_guided_generation.sampling.entropix_metrics import METRIC_NAMES, EntropixMetrics, entropix_metrics
from entropy_guided_generation.sessions import SESSION_ATTENTION_OBSERVER

REGIMES = ("argmax", "clarify", "careful", "explore", "resample", "adaptive")
"""Regime codes (index = code): low/low argmax; high entropy/low varentropy emits the clarifying
token (``clarify``) or, right after one, samples at a raised temperature (``careful``); low/high
``explore``; high/high ``resample``; otherwise ``adaptive``. -1 marks a row that had stopped."""
ARGMAX, CLARIFY, CAREFUL, EXPLORE, RESAMPLE, ADAPTIVE = range(len(REGIMES))
_MIN_TEMPERATURE = 1e-4  # floor for user coefficients that would drive a temperature to <= 0


@dataclass
class SamplingParams:
    """Per-row sampling parameters, each ``[b]``: temperature, top_k (long), top_p, min_p."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor


@dataclass
class EntropixDecision:
    """One step's outcome, each ``[b]``: the token, the regime code and the parameters used."""

    token: torch.Tensor
    regime: torch.Tensor
    params: SamplingParams


def choose_regime(
    metrics: EntropixMetrics, config: EntropixConfig, prev_token: torch.Tensor, clarifying_id: Optional[int]
) -> torch.Tensor:
    """Regime codes ``[b]`` (indices into :data:`REGIMES`) by entropix's rules.

    Entropy and varentropy are placed among their thresholds by :func:`threshold_cells` (a value
    exactly at a threshold has a cell of its own, since entropix compares strictly: it is neither
    below nor above), and a table maps each (entropy cell, varentropy cell) to the regime
    entropix's if/elif chain picks there (:func:`_regime_of_cells`).

    Args:
        metrics: the step's metrics (entropy bits, varentropy bits^2).
        prev_token: ``[b]`` each row's previous token (the clarifying token is never emitted twice
            in a row).
        clarifying_id: the clarifying token's id, or None (then high entropy/low varentropy is ``careful``).
    """
    tables = _tables(config, metrics.entropy.device)
    h_cell = threshold_cells(metrics.entropy, tables.ent_edges)
    v_cell = threshold_cells(metrics.varentropy, tables.vent_edges)
    regime = tables.regime_of_cells[h_cell * _VENT_CELLS + v_cell]
    if clarifying_id is None:
        return regime.masked_fill(regime == CLARIFY, CAREFUL)
    return regime.masked_fill((regime == CLARIFY) & (prev_token == clarifying_id), CAREFUL)


def threshold_cells(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Where each value lies among ascending ``edges`` ``[n]``: cell ``2 i`` strictly between edge
    ``i - 1`` and edge ``i``, cell ``2 i + 1`` exactly at edge ``i`` (2 n + 1 cells, long, shape of ``values``)."""
    return torch.bucketize(values, edges, right=False) + torch.bucketize(values, edges, right=True)


_ENT_CELLS, _VENT_CELLS = 7, 5  # cells of the 3 entropy and the 2 varentropy thresholds


def _regime_of_cells(h_cell: int, v_cell: int) -> int:
    """Entropix's if/elif chain, every comparison strict, on one (entropy cell, varentropy cell)
    of :func:`threshold_cells`. Entropy thresholds 0, 1, 2 = low, med, high; varentropy 0, 1 = low, high."""

    def below(cell: int, edge: int) -> bool:
        return cell < 2 * edge + 1

    def above(cell: int, edge: int) -> bool:
        return cell > 2 * edge + 1

    if below(h_cell, 0) and below(v_cell, 0):
        return ARGMAX
    if above(h_cell, 2) and below(v_cell, 0):
        return CLARIFY
    if below(h_cell, 2) and above(v_cell, 1):
        return EXPLORE
    if above(h_cell, 1) and above(v_cell, 1):
        return RESAMPLE
    return ADAPTIVE


def regime_parameters(regime: torch.Tensor, metrics: EntropixMetrics, config: EntropixConfig) -> SamplingParams:
    """Each row's temperature, top-k, top-p and min-p for its regime (entropix's formulas, see
    :func:`_parameter_formulas`), as one matmul of the metrics with the config's coefficients.
    ``top_k`` rounds half to even in ``adaptive`` (entropix's ``jnp.round``) and is floored
    elsewhere (entropix's ``int``)."""
    params, _ = _linear_outputs(regime, metrics, config)
    return params


def _parameter_formulas(c: EntropixConfig) -> dict[str, dict[int, tuple[dict[str, float], float, float]]]:
    """Entropix's per-regime formulas, each linear in the metrics before its clamp:
    ``{parameter: {regime: ({metric or "1": coefficient}, low, high)}}``; regimes not listed use the
    base value. ``top_k`` is then rounded (see :func:`regime_parameters`)."""
    inf = float("inf")
    t, k, p, mp = c.temp, float(c.top_k), c.top_p, c.min_p
    return {
        "temperature": {
            CAREFUL: ({"1": t * c.helv_attn_ent_offset, "attn_entropy": t * c.helv_attn_ent_coef},
                      _MIN_TEMPERATURE, c.helv_max_temp),
            EXPLORE: ({"1": t * c.lehv_interaction_strength_offset, "interaction_strength": t * c.lehv_interaction_strength_coef},
                      _MIN_TEMPERATURE, c.lehv_max_temp),
            RESAMPLE: ({"1": t * c.hehv_attn_vent_offset, "attn_varentropy": t * c.hehv_attn_vent_coef}, c.hehv_min_temp, inf),
            # temp * (1 + a_l (H + V) + a_a (H_attn + V_attn) - a_g agreement)
            ADAPTIVE: ({"1": t, "entropy": t * c.ada_temp_logits, "varentropy": t * c.ada_temp_logits,
                        "attn_entropy": t * c.ada_temp_attn, "attn_varentropy": t * c.ada_temp_attn,
                        "agreement": -t * c.ada_temp_agree}, _MIN_TEMPERATURE, inf),
        },
        "top_k": {
            # top_k * (1 + coef * (1 - agreement)), floored, at least lehv_min_top_k
            EXPLORE: ({"1": k * (1 + c.lehv_agreement_coef), "agreement": -k * c.lehv_agreement_coef}, c.lehv_min_top_k, inf),
            ADAPTIVE: ({"1": k, "interaction_strength": k * c.ada_top_k_int, "agreement": -k * c.ada_top_k_agree},
                       c.ada_top_k_min, c.ada_top_k_max),
        },
        "top_p": {
            RESAMPLE: ({"1": p, "attn_entropy": -c.hehv_attn_ent_coef}, c.hehv_min_top_p, inf),
            ADAPTIVE: ({"1": p, "attn_varentropy": p * c.ada_top_p}, c.ada_top_p_min, c.ada_top_p_max),
        },
        "min_p": {
            ADAPTIVE: ({"1": mp, "entropy": -mp * c.ada_min_p, "varentropy": -mp * c.ada_min_p}, c.ada_min_p_min, c.ada_min_p_max),
        },
    }


def _confidence_formula(c: EntropixConfig) -> dict[str, float]:
    """Entropix's adaptive candidate confidence, expanded: (1 - H) w_H + (1 - H_attn) w_Ha
    + (1 - V) w_V + (1 - V_attn) w_Va + agreement w_g + interaction w_i."""
    return {
        "1": c.ada_score_logits_ent + c.ada_score_attn_ent + c.ada_score_logits_vent + c.ada_score_attn_vent,
        "entropy": -c.ada_score_logits_ent, "attn_entropy": -c.ada_score_attn_ent,
        "varentropy": -c.ada_score_logits_vent, "attn_varentropy": -c.ada_score_attn_vent,
        "agreement": c.ada_score_agree, "interaction_strength": c.ada_score_int,
    }


PARAMETERS = ("temperature", "top_k", "top_p", "min_p")
_ROWS = METRIC_NAMES + ("1",)


@dataclass(frozen=True)
class _Tables:
    """A config as tensors: threshold edges, the regime of each (entropy cell, varentropy cell), and
    the affine map ``metrics @ weights + bias`` (float64, ``weights`` ``[6, 4 * R + 1]``: the six
    metrics -> each parameter under each regime, then the adaptive confidence) with clamps
    ``bounds`` ``[R, 2, 4]`` (low, high)."""

    ent_edges: torch.Tensor
    vent_edges: torch.Tensor
    regime_of_cells: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor
    bounds: torch.Tensor


@functools.lru_cache(maxsize=32)
def _tables(config: EntropixConfig, device: torch.device) -> _Tables:
    """Build (once per config and device) the tensors of :class:`_Tables`."""
    c, n_regimes = config, len(REGIMES)
    base = {"temperature": c.temp, "top_k": float(c.top_k), "top_p": c.top_p, "min_p": c.min_p}
    weights = torch.zeros(len(_ROWS), len(PARAMETERS), n_regimes, dtype=torch.float64)
    low = torch.full((n_regimes, len(PARAMETERS)), float("-inf"), dtype=torch.float64)
    high = torch.full((n_regimes, len(PARAMETERS)), float("inf"), dtype=torch.float64)
    weights[_ROWS.index("1")] = torch.tensor([base[name] for name in PARAMETERS], dtype=torch.float64).unsqueeze(-1)
    for j, (name, per_regime) in enumerate(_parameter_formulas(c).items()):
        for regime, (coefs, lo, hi) in per_regime.items():
            weights[:, j, regime] = 0.0
            for metric, value in coefs.items():
                weights[_ROWS.index(metric), j, regime] = value
            low[regime, j], high[regime, j] = lo, hi
    confidence = torch.tensor([_confidence_formula(c).get(metric, 0.0) for metric in _ROWS], dtype=torch.float64)
    regime_of_cells = [_regime_of_cells(h, v) for h in range(_ENT_CELLS) for v in range(_VENT_CELLS)]
    f32, f64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.float64, device=device)
    affine = torch.cat([weights.reshape(len(_ROWS), -1), confidence.unsqueeze(-1)], dim=1).to(**f64)
    return _Tables(
        ent_edges=torch.tensor([c.low_ent_thresh, c.med_ent_thresh, c.high_ent_thresh], **f32),
        vent_edges=torch.tensor([c.low_vent_thresh, c.high_vent_thresh], **f32),
        regime_of_cells=torch.tensor(regime_of_cells, dtype=torch.long, device=device),
        weights=affine[:-1].contiguous(), bias=affine[-1].contiguous(),
        bounds=torch.stack([low, high], dim=1).to(**f32),
    )


def _linear_outputs(regime: torch.Tensor, metrics: EntropixMetrics, config: EntropixConfig) -> tuple[SamplingParams, torch.Tensor]:
    """Sampling parameters of each row's regime and the adaptive confidence ``[b]``."""
    tables = _tables(config, metrics.entropy.device)
    m = metrics.as_dict()
    features = torch.stack([m[name] for name in METRIC_NAMES], dim=-1).double()  # [b, 6]
    # float64, then float32: entropix computes the adaptive top_k from Python floats (float64) and
    # rounds it as float32 (jnp.round), so a float32 sum here could move a value across a .5 tie.
    out = torch.addmm(tables.bias, features, tables.weights).float()  # [b, 4 * R + 1]
    per_regime = out[:, :-1].view(-1, len(PARAMETERS), len(REGIMES))
    chosen = per_regime.gather(2, regime.view(-1, 1, 1).expand(-1, len(PARAMETERS), 1)).squeeze(2)  # [b, 4]
    bounds = tables.bounds[regime]  # [b, 2, 4]
    chosen = torch.clamp(chosen, min=bounds[:, 0], max=bounds[:, 1])
    # bounds of top_k are integers, so rounding after the clamp equals entropix's clip(round(.))
    top_k = torch.where(regime == ADAPTIVE, chosen[:, 1].round(), chosen[:, 1].floor())  # round: half to even
    params = SamplingParams(temperature=chosen[:, 0], top_k=top_k.long(), top_p=chosen[:, 2], min_p=chosen[:, 3])
    return params, out[:, -1]


def filtered_probs(logits: torch.Tensor, params: SamplingParams, k_cap: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of each row, restricted to its ``k_cap`` largest logits.

    Order as entropix's ``_sample``: softmax(logits / temperature); min-p (drop tokens with
    p < min_p * p_max); top-k; top-p on the mass of the full distribution (keep a token while
    the mass before it, in descending order, is < top_p). The most likely token is always kept.
    (Entropix's torch ``_sample`` computes the min-p filter on a tensor it then ignores and sums
    top-p mass in ascending order; we apply both as intended.)

    Args:
        logits: ``[b, v]``.
        params: per-row parameters ``[b]``.
        k_cap: columns kept (default: the largest ``top_k``); a temperature > 0 keeps the order.

    Returns:
        ``weights`` ``[b, k]``: the kept probabilities times a per-row constant (the most likely
        token's weight is 1), 0 where dropped; and ``ids`` ``[b, k]``, the vocabulary ids of those
        columns, most likely first; k = min(v, k_cap).
    """
    k = min(k_cap if k_cap is not None else int(params.top_k.max()), logits.shape[-1])
    z = logits.float()
    inv_t = params.temperature.reciprocal().unsqueeze(-1)
    top, ids = torch.topk(z, k, dim=-1)
    # exp((z - max) / T): p times the row's normalizer, 1 at the most likely token; no overflow.
    peak = top[:, :1]
    weights = ((top - peak) * inv_t).exp()
    normalizer = ((z - peak) * inv_t).exp().sum(-1, keepdim=True)
    # Column 0 always passes all three tests (min_p < 1, top_k >= 1, top_p > 0 are validated).
    keep = weights >= params.min_p.unsqueeze(-1)
    keep &= torch.arange(k, device=z.device) < params.top_k.unsqueeze(-1)
    keep &= (weights.cumsum(-1) - weights) < params.top_p.unsqueeze(-1) * normalizer
    return weights * keep, ids


def sample_candidates(
    logits: torch.Tensor, params: SamplingParams, num_samples: int, rng: Optional[torch.Generator] = None,
    k_cap: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` independent draws per row in one batched call.

    Uses the exponential race (argmax of w / q, q ~ Exp(1)) as :func:`sample_next_token` does.
    ``k_cap``: columns considered (default: the largest ``top_k`` of the batch).

    Returns:
        ``candidates`` ``[b, num_samples]`` ids, and ``columns`` ``[b, num_samples]``, their
        positions among the row's ``k_cap`` largest logits (0 = the argmax).
    """
    weights, ids = filtered_probs(logits, params, k_cap)
    # q = -log U ~ Exp(1), drawn from rng's uniforms (cheaper on CPU than Tensor.exponential_)
    q = torch.rand(weights.shape[0], num_samples, weights.shape[1], device=weights.device, generator=rng).log_().neg_()
    columns = (weights.unsqueeze(1) / q).argmax(-1)
    return ids.gather(-1, columns), columns


def adaptive_confidence(metrics: EntropixMetrics, config: EntropixConfig) -> torch.Tensor:
    """Entropix's weighted confidence ``[b]`` added to each adaptive candidate's log-prob.

    It depends on the step's metrics only, so within a row it shifts every candidate equally:
    the pick is the most likely candidate, and the score it reports is log p + confidence."""
    regime = torch.zeros_like(metrics.entropy, dtype=torch.long)
    return _linear_outputs(regime, metrics, config)[1]


def entropix_step(
    logits: torch.Tensor,
    metrics: EntropixMetrics,
    config: EntropixConfig,
    prev_token: torch.Tensor,
    clarifying_id: Optional[int] = None,
    rng: Optional[torch.Generator] = None,
) -> EntropixDecision:
    """Pick each row's next token from ``logits`` ``[b, v]`` by its regime.

    All rows draw ``n_adaptive_samples`` candidates in one call; rows in ``adaptive`` keep the
    candidate with the highest log p + weighted confidence, other sampling regimes keep the first.

    Args:
        logits: ``[b, v]`` next-token logits (any token that must never be sampled at -inf).
        metrics: the step's :class:`EntropixMetrics`.
        prev_token: ``[b]`` each row's previous token.
        clarifying_id: id emitted by the ``clarify`` regime (None: never emitted).
        rng: generator for reproducible draws.
    """
    if clarifying_id is not None and not 0 <= clarifying_id < logits.shape[-1]:
        raise ValueError(f"clarifying token id {clarifying_id} lies outside the vocabulary [0, {logits.shape[-1]})")
    regime = choose_regime(metrics, config, prev_token, clarifying_id)
    params = regime_parameters(regime, metrics, config)
    candidates, _ = sample_candidates(logits, params, config.n_adaptive_samples, rng)  # [b, n]
    # Score = log p + confidence = logit - logsumexp(logits) + confidence: the two row constants
    # cannot change the pick, so the most likely candidate (largest logit) wins.
    best = logits.gather(-1, candidates).argmax(-1, keepdim=True)
    token = torch.where(regime == ADAPTIVE, candidates.gather(-1, best).squeeze(-1), candidates[:, 0])
    token = torch.where(regime == ARGMAX, logits.argmax(-1), token)
    if clarifying_id is not None:
        token = token.masked_fill(regime == CLARIFY, clarifying_id)
    return EntropixDecision(token=token, regime=regime, params=params)


def resolve_clarifying_token(text: Optional[str], tokenizer: Any) -> Optional[int]:
    """The one id of the clarifying-token string under ``tokenizer`` (None when none is configured).

    Raises:
        ValueError: a string without a tokenizer, or a string that is not exactly one token.
    """
    if text is None:
        return None
    if tokenizer is None:
        raise ValueError(f"clarifying_token {text!r} is a string; pass tokenizer=... to resolve it to a token id")
    try:
        return encode_single_token(text, tokenizer)
    except ValueError as err:
        raise ValueError(f"unknown clarifying_token {text!r}: it is not a single token of the tokenizer ({err})") from err


# ------------------------------------------------------------------ torchtune attention observer
class LastQueryAttention:
    """Observes a torchtune decoder's last attention layer: after each forward, ``scores``
    ``[b, h, L]`` (q . k / sqrt(d)) of each row's **last** input column against the layer's keys,
    and ``visible`` ``[b, L]`` (the mask row of that column).

    While attached, the layer's attention is observed where it is computed, with the rotated,
    normed q, k and the mask that the model itself attends with: in a KV session (the decoders')
    through the session's observer hook (:data:`~entropy_guided_generation.sessions.SESSION_ATTENTION_OBSERVER`,
    keys over the filled columns, grouped heads not expanded), in any other forward by wrapping
    torchtune's kernel call (``attn._attention_call``, head-expanded keys). The last query row is
    scored against those keys, so nothing is recomputed, the cost is O(L) per step, and no L x L
    map is built. The model's own kernel still does the attention.
    """

    def __init__(self, model: Any):
        layers = getattr(model, "layers", None)
        attn = getattr(layers[-1], "attn", None) if layers is not None and len(layers) else None
        needed = ("_attention_call", "head_dim", "kv_cache")
        if attn is None or not all(hasattr(attn, name) for name in needed):
            raise TypeError(
                f"cannot observe attention of {type(model).__name__}: expected a torchtune TransformerDecoder whose "
                "last layer has a MultiHeadAttention at .attn"
            )
        self.attn = attn
        self.scores: Optional[torch.Tensor] = None
        self.visible: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def attached(self) -> Iterator["LastQueryAttention"]:
        kernel = self.attn._attention_call

        def observed_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            mask = kwargs["mask"] if "mask" in kwargs else (args[0] if args else None)
            self._observe(q, k, mask)
            return kernel(q, k, v, *args, **kwargs)

        self.attn._attention_call = observed_kernel
        setattr(self.attn, SESSION_ATTENTION_OBSERVER, self._observe)
        try:
            yield self
        finally:
            self.attn._attention_call = kernel
            delattr(self.attn, SESSION_ATTENTION_OBSERVER)

    def _observe(self, q: torch.Tensor, k: torch.Tensor, mask: Any) -> None:
        """``q`` ``[b, h, s, d]`` and ``k`` ``[b, h_kv, L, d]`` (``h_kv`` divides ``h``: query head
        ``i`` reads key head ``i // (h / h_kv)``, torchtune's grouping)."""
        b, h, _, d = q.shape
        kv_heads = k.shape[1]
        query = q[:, :, -1].float().reshape(b, kv_heads, h // kv_heads, d) * d**-0.5
        self.scores = torch.matmul(query, k.float().transpose(2, 3)).reshape(b, h, -1)
        self.visible = self._visible(mask, q.shape[0], k.shape[2], q.device)

    def _visible(self, mask: Any, b: int, length: int, device: torch.device) -> torch.Tensor:
        if mask is None:  # no mask: causal without a cache (the last query sees every key), or every filled slot
            cache = self.attn.kv_cache if getattr(self.attn, "cache_enabled", True) else None
            filled = int(cache.size) if cache is not None else length
            return (torch.arange(length, device=device) < filled).expand(b, -1)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"entropix needs a boolean attention mask [b, s, L], got {type(mask).__name__}")
        return mask[:, -1, :length]


# ------------------------------------------------------------------ the torchtune decoder
class _EntropixLoop:
    """The per-step hook of :func:`decode`: metrics, regime, token; records every step."""

    def __init__(self, observer: LastQueryAttention, config: EntropixConfig, prompt: torch.Tensor,
                 clarifying_id: Optional[int], rng: Optional[torch.Generator]):
        self.observer, self.config, self.clarifying_id, self.rng = observer, config, clarifying_id, rng
        self.prev = prompt[:, -1].clone()  # left padding: the last column is each row's last real token
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, *, logits: torch.Tensor, step: int) -> torch.Tensor:
        metrics = entropix_metrics(logits, self.observer.scores, self.observer.visible, validate=False)
        decision = entropix_step(logits, metrics, self.config, self.prev, self.clarifying_id, self.rng)
        p = decision.params
        self.records.append({**metrics.as_dict(), "temperature": p.temperature, "top_p": p.top_p, "min_p": p.min_p,
                             "top_k": p.top_k, "regime": decision.regime})
        self.prev = decision.token
        return decision.token

    def extras(self, generated_lengths: torch.Tensor) -> dict[str, Any]:
        """Records as ``[b, T]`` tensors; NaN (floats) or -1 (ints) at steps after a row's stop
        token (``generated_lengths`` ``[b]``, stop token included, as the decode loop counts)."""
        stacked = {name: torch.stack([r[name] for r in self.records], dim=1) for name in self.records[0]}
        steps = torch.arange(len(self.records), device=generated_lengths.device)
        active = steps.unsqueeze(0) < generated_lengths.unsqueeze(1)
        for name, value in stacked.items():
            stacked[name] = value.masked_fill(~active, -1 if not value.is_floating_point() else float("nan"))
        return {**stacked, "regime_names": REGIMES, "sampler_config": self.config.to_dict()}


def generate_entropix(
    model: Any,
    prompt: torch.Tensor,
    *,
    sampler_config: Union[EntropixConfig, Mapping[str, Any], None] = None,
    tokenizer: Any = None,
    pad_id: int = 0,
    rng: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    **decoding: Any,
) -> DecodeResult:
    """Generate with the Entropix-style sampler (mode ``none``) on a torchtune decoder.

    Args:
        model: a torchtune ``TransformerDecoder`` (KV caches reused as :func:`generate_plain` does).
        prompt: ``[b, p]`` or ``[p]`` prompt ids, left-padded with ``pad_id``.
        sampler_config: :class:`EntropixConfig` or a mapping of its fields (None: the defaults).
        tokenizer: resolves ``sampler_config.clarifying_token`` (needed only when that is set).
        pad_id, rng: as :func:`~entropy_guided_generation.generation.decode` (the sampler draws with ``rng``).
        temperature, top_k, top_p: accepted so the decoder is a drop-in for the common decoder
            call; not used: the sampler sets each step's temperature, top-k and top-p from
            ``sampler_config``.
        **decoding: :func:`~entropy_guided_generation.generation.decode`'s other keywords of mode
            none (``max_generated_tokens``, ``stop_tokens``, ``codec``, ``progress``).

    Returns:
        :class:`DecodeResult`; ``extras`` holds ``[b, T]`` tensors ``entropy``, ``varentropy``,
        ``attn_entropy``, ``attn_varentropy``, ``agreement``, ``interaction_strength`` (NaN once a
        row stopped), ``temperature``, ``top_p``, ``min_p``, ``top_k`` and ``regime`` (codes into
        ``extras["regime_names"]``, -1 once stopped), and ``sampler_config``.

    Raises:
        ValueError: on an empty prompt row, or a prompt + generation longer than the model's
            ``max_seq_len`` (as :func:`decode`).
        FloatingPointError: on non-finite logits, naming the step and row.
    """
    config = EntropixConfig.coerce(sampler_config)
    clarifying_id = resolve_clarifying_token(config.clarifying_token, tokenizer)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    check_prompt(prompt, pad_id)  # before the loop reads each row's last token
    observer = LastQueryAttention(model)
    loop = _EntropixLoop(observer, config, prompt, clarifying_id, rng)
    with observer.attached():
        result = decode(model, prompt, interleaving="none", pad_id=pad_id, rng=rng, step_hook=loop, **decoding)
    result.extras.update(loop.extras(result.generated_lengths))
    return result


register_decoder("entropix", generate_entropix, extras=("sampler_config", "tokenizer"))

__all__ = [
    "ADAPTIVE",
    "ARGMAX",
    "CAREFUL",
    "CLARIFY",
    "EXPLORE",
    "METRIC_NAMES",
    "REGIMES",
    "RESAMPLE",
    "EntropixDecision",
    "LastQueryAttention",
    "SamplingParams",
    "adaptive_confidence",
    "choose_regime",
    "entropix_step",
    "filtered_probs",
    "generate_entropix",
    "regime_parameters",
    "resolve_clarifying_token",
    "sample_candidates",
    "threshold_cells",
]
