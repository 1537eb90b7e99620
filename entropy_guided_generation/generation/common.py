"""The decode loop shared by every mode: one short loop of small steps on a KV-cached session
(:mod:`~entropy_guided_generation.generation.session`).

Each content step is one forward. A row that gets a confidence token this step feeds
``[x_t, c_t]``; a row that does not (mode none, marker after its marker, a stop token) feeds
``[x_t, pad]`` where the pad key is masked out and never advances positions, so every row of the
batch shares the same forward. Logits are computed only at the column each row uses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation.sampling import sample_next_token
from entropy_guided_generation.generation.session import KVSession, kv_session
from entropy_guided_generation.layout import compute_bins, confidence_slots, interleave


@dataclass
class DecodeResult:
    """What a decoder returns.

    Attributes:
        tokens: ``[b, p + T]`` the left-padded prompt followed by the content tokens (confidence
            tokens removed); after a row's stop token, ``pad_id``.
        interleaved: ``[b, L]`` exactly the sequence the model saw: the (interleaved, in mode full)
            prompt, then content and confidence tokens; right-padded with ``pad_id``.
        interleaved_valid: ``[b, L]`` True on real tokens of ``interleaved``.
        signal: ``[b, T]`` the confidence signal behind each confidence token (NaN where none).
        bins: ``[b, T]`` the bin of the confidence token after content token t (-1 where none).
        entropies: ``[b, T]`` entropy (nats) of the distribution that produced each content token
            (confidence ids masked, tau_H), NaN after the row stopped.
        token_logprobs: ``[b, T]`` log p of each content token under that distribution.
        generated_lengths: ``[b]`` content tokens generated per row, stop token included.
        prompt_length: p, the padded prompt width.
        extras: decoder-specific per-step records (e.g. a sampler's metrics).
    """

    tokens: torch.Tensor
    interleaved: torch.Tensor
    interleaved_valid: torch.Tensor
    signal: torch.Tensor
    bins: torch.Tensor
    entropies: torch.Tensor
    token_logprobs: torch.Tensor
    generated_lengths: torch.Tensor
    prompt_length: int
    extras: dict = field(default_factory=dict)

    @property
    def content(self) -> torch.Tensor:
        """``[b, T]`` the generated content tokens only."""
        return self.tokens[:, self.prompt_length :]


# ------------------------------------------------------------------ per-mode policy
ConfidencePolicy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(content token ids [b], step index) -> [b] bool: does the token just generated get a confidence token?"""


class MarkerTracker:
    """Mode marker: interleave until the row's generated content ends with the marker ids."""

    def __init__(self, marker_ids: Sequence[int], batch_size: int, device: torch.device):
        if len(marker_ids) == 0:
            raise ValueError("the marker must tokenize to at least one id; got an empty marker")
        self.marker = torch.tensor(list(marker_ids), dtype=torch.long, device=device)
        self.recent = torch.full((batch_size, len(marker_ids)), -1, dtype=torch.long, device=device)
        self.interleaving = torch.ones(batch_size, dtype=torch.bool, device=device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whether ``tokens`` ``[b]`` get a confidence token; then update the marker state."""
        wants = self.interleaving.clone()
        self.recent = torch.cat([self.recent[:, 1:], tokens.unsqueeze(1)], dim=1)
        # The marker's last token still gets its confidence token (training interleaves "up to and
        # including" the marker); everything after is plain.
        self.interleaving &= ~(self.recent == self.marker).all(-1)
        return wants


# ------------------------------------------------------------------ the loop
@torch.no_grad()
def decode(
    model: Any,
    prompt: torch.Tensor,
    *,
    mode: str,
    max_generated_tokens: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    rng: Optional[torch.Generator] = None,
    codec: Optional[ConfidenceCodec] = None,
    marker: Optional[Sequence[int]] = None,
    max_prompt_passes: Optional[int] = None,
    progress: bool = False,
    step_hook: Optional[Callable[..., Any]] = None,
) -> DecodeResult:
    """Generate up to ``max_generated_tokens`` content tokens per row in ``mode``.

    The public per-mode functions (:func:`generate_plain`, :func:`generate_answer_interleaved`, ...)
    call this; see them for the arguments. ``step_hook(logits=..., step=...)`` may return
    content token ids ``[b]`` to replace the built-in sampler (the entropix sampler uses it).
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if max_generated_tokens < 1:
        raise ValueError(f"max_generated_tokens must be >= 1, got {max_generated_tokens}")
    if mode != "none" and codec is None:
        raise ValueError(f"mode {mode!r} needs a confidence codec (codec=...)")
    b, device = prompt.shape[0], prompt.device
    stops = torch.tensor(list(stop_tokens or []), dtype=torch.long, device=device)
    prompt_valid = prompt != pad_id
    if not bool(prompt_valid.any(1).all()):
        raise ValueError("every prompt row needs at least one non-pad token")

    prefill_tokens, prefill_valid = _prefill_sequence(
        model, prompt, prompt_valid, mode=mode, codec=codec, pad_id=pad_id, stops=stops, max_passes=max_prompt_passes
    )
    steps_cols = 2 if mode != "none" else 1
    cache_len = prefill_tokens.shape[1] + steps_cols * max_generated_tokens
    marker_state = MarkerTracker(marker, b, device) if mode == "marker" else None
    if mode == "marker" and marker is None:
        raise ValueError("mode 'marker' needs marker=... (the marker's token ids)")

    records: list[ContentStep] = []
    active = torch.ones(b, dtype=torch.bool, device=device)
    with kv_session(model, b, cache_len) as session:
        last_col = torch.full((b,), prefill_tokens.shape[1] - 1, dtype=torch.long, device=device)
        logits = session.feed(prefill_tokens, prefill_valid, last_col)
        steps = tqdm(range(max_generated_tokens), desc=f"decode[{mode}]", disable=not progress, leave=False)
        for step in steps:
            out = _content_step(
                logits, codec, mode, marker_state, active, stops, pad_id,
                temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, step_hook=step_hook, step=step,
            )
            records.append(out)
            active = active & ~torch.isin(out.token, stops)
            if not bool(active.any()) or step == max_generated_tokens - 1:
                break
            logits = _feed_step(session, out, active, pad_id, any_conf=mode != "none")
    return _assemble(prompt, prefill_tokens, prefill_valid, records, pad_id)


def _prefill_sequence(
    model: Any,
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    *,
    mode: str,
    codec: Optional[ConfidenceCodec],
    pad_id: int,
    stops: torch.Tensor,
    max_passes: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded sequence the prefill feeds: the prompt, interleaved with exact bins in mode
    full by the same functions the training layout uses."""
    if mode != "full":
        return prompt, prompt_valid
    slots = confidence_slots(prompt, mode="full", valid_mask=prompt_valid, stop_ids=stops.tolist())
    passes = max_passes if max_passes is not None else int(slots.sum(1).max()) + 1
    from torchtune.modules.common_utils import disable_kv_cache

    ctx = disable_kv_cache(model) if model.caches_are_setup() else contextlib.nullcontext()
    with ctx:
        fixed = compute_bins(
            model, prompt, codec=codec, slots=slots, valid_mask=prompt_valid, pad_id=pad_id, max_passes=passes, left_pad=True
        )
    return fixed.interleaved.tokens, fixed.interleaved.valid_mask


@dataclass
class ContentStep:
    """One content step, each field ``[b]``: the token x_t, whether it gets a confidence token,
    that token c_t (pad where none) and its bin (-1), the signal (NaN where none), and the
    entropy (nats) and log-prob of x_t under the distribution that produced it (NaN once stopped).
    ``active`` says which rows were still generating."""

    token: torch.Tensor
    has_conf: torch.Tensor
    conf: torch.Tensor
    bin: torch.Tensor
    signal: torch.Tensor
    entropy: torch.Tensor
    logprob: torch.Tensor
    active: torch.Tensor


def _content_step(
    logits: torch.Tensor,
    codec: Optional[ConfidenceCodec],
    mode: str,
    marker_state: Optional[MarkerTracker],
    active: torch.Tensor,
    stops: torch.Tensor,
    pad_id: int,
    *,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    rng: Optional[torch.Generator],
    step_hook: Optional[Callable[..., Any]],
    step: int,
) -> ContentStep:
    """Pick x_t from the logits that produce it and, where the mode says so, its c_t.

    Rows that already stopped emit ``pad_id`` and no confidence token.
    """
    content_logits = codec.mask_confidence_logits(logits) if codec is not None else logits
    token = step_hook(logits=content_logits, step=step) if step_hook is not None else None
    if token is None:
        token = sample_next_token(content_logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
    token = torch.where(active, token, torch.full_like(token, pad_id))
    # One softmax serves the content token's entropy and log-prob and the confidence signal: the
    # codec's distribution (tau_H, confidence ids masked), the one training bins read.
    logp_all = codec.log_probs(logits) if codec is not None else signals.log_probs(logits)
    step_entropy = signals.entropy_from_log_probs(logp_all)
    logp = logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    nan = torch.full_like(step_entropy, float("nan"))
    entropy, logp = torch.where(active, step_entropy, nan), torch.where(active, logp, nan)

    has_conf = active & ~torch.isin(token, stops) if mode != "none" else torch.zeros_like(active)
    if marker_state is not None:
        has_conf &= marker_state(token)
    no_bin = torch.full_like(token, -1)
    if codec is None or not bool(has_conf.any()):
        return ContentStep(token, has_conf, torch.full_like(token, pad_id), no_bin, nan, entropy, logp, active)
    signal = step_entropy if codec.signal == "entropy" else codec.signal_from_log_probs(logp_all)
    every_bin = codec.bins_from_signal(signal)  # in [0, K) for every row
    bins = torch.where(has_conf, every_bin, no_bin)
    conf = torch.where(has_conf, codec.token_ids.to(token.device)[every_bin], torch.full_like(token, pad_id))
    signal = torch.where(has_conf, signal.to(entropy.dtype), nan)
    return ContentStep(token, has_conf, conf, bins, signal, entropy, logp, active)


def _feed_step(session: KVSession, step: ContentStep, active: torch.Tensor, pad_id: int, any_conf: bool) -> torch.Tensor:
    """One forward: ``[x_t, c_t]`` (or ``[x_t, pad]``) per row; logits after the last real token.

    ``active`` is after this step (a row whose x_t was a stop token feeds nothing real)."""
    if not any_conf:
        return session.feed(step.token.unsqueeze(1), active.unsqueeze(1), torch.zeros_like(step.token))
    pair = torch.stack([step.token, step.conf], dim=1)
    valid = torch.stack([active, step.has_conf & active], dim=1)
    return session.feed(pair, valid, (step.has_conf & active).long())


def _assemble(
    prompt: torch.Tensor,
    prefill_tokens: torch.Tensor,
    prefill_valid: torch.Tensor,
    records: list[ContentStep],
    pad_id: int,
) -> DecodeResult:
    """Stack per-step records ``[b]`` into ``[b, T]`` tensors and build the result."""

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(r, name) for r in records], dim=1)

    content, active, has_conf = stack("token"), stack("active"), stack("has_conf")
    generated = interleave(content, has_conf, stack("conf"), pad_id=pad_id, valid_mask=active)
    return DecodeResult(
        tokens=torch.cat([prompt, content], dim=1),
        interleaved=torch.cat([prefill_tokens, generated.tokens], dim=1),
        interleaved_valid=torch.cat([prefill_valid, generated.valid_mask], dim=1),
        signal=stack("signal"),
        bins=stack("bin"),
        entropies=stack("entropy"),
        token_logprobs=stack("logprob"),
        generated_lengths=active.long().sum(1),
        prompt_length=prompt.shape[1],
    )
