"""The decode loop shared by every mode: a KV-cached session and one short loop of small steps.

Each content step is one forward. A row that gets a confidence token this step feeds
``[x_t, c_t]``; a row that does not (mode none, marker after its marker, a stop token) feeds
``[x_t, pad]`` where the pad key is masked out and never advances positions, so every row of the
batch shares the same forward. Logits are computed only at the column each row uses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torchtune.modules.common_utils import disable_kv_cache, local_kv_cache
from tqdm.auto import tqdm

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation.overrides import ConfidenceOverride
from entropy_guided_generation.generation.sampling import sample_next_token
from entropy_guided_generation.layout import Interleaving, compute_bins, interleave
from entropy_guided_generation.modeling import is_torchtune_decoder, logits_at


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


class KVSession:
    """A torchtune decoder's static KV cache, filled column by column.

    ``key_valid[b, j]`` says whether cache column j holds a real token of row b; ``next_pos[b]``
    is the position id the row's next real token gets (positions count real tokens only, so
    training's right-padded layout and left-padded decoding see the same positions).
    """

    def __init__(self, model: Any, batch_size: int, cache_len: int, device: torch.device):
        self.model = model
        self.cache_len = cache_len
        self.key_valid = torch.zeros(batch_size, cache_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = 0
        self._cols = torch.arange(cache_len, device=device)

    def _mask(self, k: int) -> torch.Tensor:
        """``[b, k, cache_len]``: query column ``filled + i`` sees the real keys at or before it."""
        query_cols = self.filled + self._cols[:k]
        causal = self._cols.unsqueeze(0) <= query_cols.unsqueeze(1)  # [k, cache_len]
        # A padding query still sees itself, so no attention row is empty.
        itself = self._cols.unsqueeze(0) == query_cols.unsqueeze(1)
        return (self.key_valid.unsqueeze(1) & causal.unsqueeze(0)) | itself.unsqueeze(0)

    def feed(self, tokens: torch.Tensor, valid: torch.Tensor, use_col: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[b, k]`` (``valid`` marks real ones) and return the logits ``[b, v]``
        at column ``use_col[b]`` of this feed."""
        k = tokens.shape[1]
        if self.filled + k > self.cache_len:
            raise RuntimeError(f"KV cache of {self.cache_len} columns is full ({self.filled} used, {k} more asked)")
        self.key_valid[:, self.filled : self.filled + k] = valid
        if k == 1:
            pos = self.next_pos.unsqueeze(1)
        else:
            pos = self.next_pos.unsqueeze(1) + (valid.long().cumsum(1) - 1).clamp(min=0)
        logits = logits_at(self.model, tokens, use_col, mask=self._mask(k), input_pos=pos)
        self.next_pos += valid.long().sum(1)
        self.filled += k
        return logits


@contextlib.contextmanager
def kv_session(model: Any, batch_size: int, cache_len: int) -> Iterator[KVSession]:
    """A :class:`KVSession` over ``model``'s caches: reuses caches the caller set up (same batch
    size, long enough; reset first), else sets them up for this call and deletes them after."""
    if not is_torchtune_decoder(model):
        raise TypeError(
            f"decoders need a torchtune TransformerDecoder (with setup_caches), got {type(model).__name__}"
        )
    param = next(model.parameters())
    if model.caches_are_setup():
        cache = model.layers[0].attn.kv_cache
        have_len = int(cache.k_cache.shape[2])
        if cache.batch_size != batch_size or have_len < cache_len:
            raise ValueError(
                f"the model's KV caches are set up for batch {cache.batch_size} x {have_len} positions, but this "
                f"call needs batch {batch_size} x {cache_len}; pad the batch or set up larger caches"
            )
        model.reset_caches()
        yield KVSession(model, batch_size, have_len, param.device)
        return
    with local_kv_cache(
        model, batch_size=batch_size, device=param.device, dtype=param.dtype, decoder_max_seq_len=cache_len
    ):
        yield KVSession(model, batch_size, cache_len, param.device)


# ------------------------------------------------------------------ the loop
@torch.no_grad()
def decode(
    model: Any,
    prompt: torch.Tensor,
    *,
    interleaving: Any,
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
    confidence_override: Optional[ConfidenceOverride] = None,
) -> DecodeResult:
    """Generate up to ``max_generated_tokens`` content tokens per row under ``interleaving``.

    The public per-mode functions (:func:`generate_plain`, :func:`generate_answer_interleaved`, ...)
    call this; see them for the arguments. ``interleaving`` is an :class:`~entropy_guided_generation.layout.Interleaving`
    or a mode name, bound here to ``stop_tokens`` and ``marker`` (token ids). ``step_hook(logits=..., step=...)``
    may return content token ids ``[b]`` to replace the built-in sampler (the entropix sampler uses it).
    ``confidence_override`` (see :mod:`~entropy_guided_generation.generation.overrides`) replaces the
    bin fed back after each token (an ablation); ``bins`` then records the fed bins, ``signal`` and
    ``entropies`` stay the model's own.
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if not isinstance(interleaving, Interleaving):
        interleaving = Interleaving.of(interleaving, stop_ids=stop_tokens or (), marker_ids=marker)
    if max_generated_tokens < 1:
        raise ValueError(f"max_generated_tokens must be >= 1, got {max_generated_tokens}")
    if not interleaving.is_plain and codec is None:
        raise ValueError(f"mode {interleaving.name!r} needs a confidence codec (codec=...)")
    b, device = prompt.shape[0], prompt.device
    stops = torch.tensor(list(stop_tokens or []), dtype=torch.long, device=device)
    prompt_valid = prompt != pad_id
    if not bool(prompt_valid.any(1).all()):
        raise ValueError("every prompt row needs at least one non-pad token")

    prefill_tokens, prefill_valid = _prefill_sequence(
        model, prompt, prompt_valid, interleaving, codec=codec, pad_id=pad_id, max_passes=max_prompt_passes,
        override=confidence_override,
    )
    cache_len = prefill_tokens.shape[1] + interleaving.columns_per_content_token * max_generated_tokens
    gets_confidence = interleaving.step_policy(b, device)

    records: list[ContentStep] = []
    active = torch.ones(b, dtype=torch.bool, device=device)
    with kv_session(model, b, cache_len) as session:
        last_col = torch.full((b,), prefill_tokens.shape[1] - 1, dtype=torch.long, device=device)
        logits = session.feed(prefill_tokens, prefill_valid, last_col)
        steps = tqdm(range(max_generated_tokens), desc=f"decode[{interleaving.name}]", disable=not progress, leave=False)
        for step in steps:
            out = _content_step(
                logits, codec, gets_confidence, active, pad_id,
                temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, step_hook=step_hook, step=step,
                override=confidence_override,
            )
            records.append(out)
            active = active & ~torch.isin(out.token, stops)
            if not bool(active.any()) or step == max_generated_tokens - 1:
                break
            logits = _feed_step(session, out, active, columns=interleaving.columns_per_content_token)
    return _assemble(prompt, prefill_tokens, prefill_valid, records, pad_id)


def _prefill_sequence(
    model: Any,
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    interleaving: Interleaving,
    *,
    codec: Optional[ConfidenceCodec],
    pad_id: int,
    max_passes: Optional[int],
    override: Optional[ConfidenceOverride] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded sequence the prefill feeds: the prompt, interleaved with exact bins when the
    mode interleaves prompts, by the same functions the training layout uses (or with the bins an
    ``override`` makes of them)."""
    if not interleaving.interleaves_prompt:
        return prompt, prompt_valid
    slots = interleaving.slots(prompt, valid_mask=prompt_valid)
    passes = max_passes if max_passes is not None else int(slots.sum(1).max()) + 1
    ctx = disable_kv_cache(model) if model.caches_are_setup() else contextlib.nullcontext()
    with ctx:
        fixed = compute_bins(
            model, prompt, codec=codec, slots=slots, valid_mask=prompt_valid, pad_id=pad_id, max_passes=passes, left_pad=True
        )
    layout = fixed.interleaved
    if override is not None:
        conf = codec.token_ids_for_bins(override.prompt_bins(fixed.bins, slots).clamp(min=0))
        layout = interleave(prompt, slots, conf, pad_id=pad_id, valid_mask=prompt_valid, left_pad=True)
    return layout.tokens, layout.valid_mask


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
    gets_confidence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    active: torch.Tensor,
    pad_id: int,
    *,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    rng: Optional[torch.Generator],
    step_hook: Optional[Callable[..., Any]],
    step: int,
    override: Optional[ConfidenceOverride] = None,
) -> ContentStep:
    """Pick x_t from the logits that produce it and, where the interleaving's step policy
    (``gets_confidence``) says so, its c_t.

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

    has_conf = gets_confidence(token, active)
    no_bin = torch.full_like(token, -1)
    if codec is None or not bool(has_conf.any()):
        return ContentStep(token, has_conf, torch.full_like(token, pad_id), no_bin, nan, entropy, logp, active)
    signal = step_entropy if codec.signal == "entropy" else codec.signal_from_log_probs(logp_all)
    every_bin = codec.bins_from_signal(signal)  # in [0, K) for every row
    if override is not None:
        every_bin = override.step_bins(every_bin, step)
    # An override's bins are checked against [0, K) (an error naming the range); the codec's own are in range.
    conf_ids = codec.token_ids_for_bins(every_bin) if override is not None else codec.token_ids.to(token.device)[every_bin]
    bins = torch.where(has_conf, every_bin, no_bin)
    conf = torch.where(has_conf, conf_ids, torch.full_like(token, pad_id))
    signal = torch.where(has_conf, signal.to(entropy.dtype), nan)
    return ContentStep(token, has_conf, conf, bins, signal, entropy, logp, active)


def _feed_step(session: KVSession, step: ContentStep, active: torch.Tensor, columns: int) -> torch.Tensor:
    """One forward: ``[x_t, c_t]`` (or ``[x_t, pad]``) per row when content tokens take ``columns``
    2, ``[x_t]`` when 1; logits after the last real token.

    ``active`` is after this step (a row whose x_t was a stop token feeds nothing real)."""
    if columns == 1:
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
