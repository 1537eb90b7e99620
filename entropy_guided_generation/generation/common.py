"""The decode loop shared by every mode: one short loop of small steps on a KV-cached session
(:mod:`~entropy_guided_generation.sessions`).

Each content step is one forward. A row that gets a confidence token this step feeds
``[x_t, c_t]``; a row that does not (mode none, marker after its marker, a stop token) feeds
``[x_t, pad]`` where the pad key is masked out and never advances positions, so every row of the
batch shares the same forward. Logits are computed only at the column each row uses.

Under ``confidence.context: plain`` (the codec's ``context``) each row has a plain twin on the same
session, rows ``b .. 2b``: it is fed the same content tokens and no confidence token, and c_t is the
bin of the twin's distribution. The twin's prompt forward also gives mode full's prompt bins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.generation.bin_ablations import ConfidenceOverride
from entropy_guided_generation.generation.prompt_bins import PromptBinsCache
from entropy_guided_generation.generation.token_sampling import sample_next_token
from entropy_guided_generation.fixed_point import compute_bins
from entropy_guided_generation.interleaved import interleave
from entropy_guided_generation.modes import Interleaving
from entropy_guided_generation.modeling import project_hidden
from entropy_guided_generation.positions import SEQUENTIAL
from entropy_guided_generation.sessions import KVSession, caches_set_aside, kv_session


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
    positions: Any = SEQUENTIAL,
    prompt_bins: Optional[PromptBinsCache] = None,
) -> DecodeResult:
    """Generate up to ``max_generated_tokens`` content tokens per row under ``interleaving``.

    The public per-mode decoders (:func:`~entropy_guided_generation.generation.decoders.generate_plain`,
    ``generate_answer_interleaved``, ...) are this function with ``interleaving`` bound to their mode.

    Args:
        model: a torchtune ``TransformerDecoder``. KV caches the caller set up are reused (batch
            size must match; they are reset first); otherwise caches are set up for this call.
        prompt: ``[b, p]`` or ``[p]`` prompt ids, left-padded with ``pad_id``.
        interleaving: an :class:`~entropy_guided_generation.modes.Interleaving` or a mode name, bound
            here to ``stop_tokens``, ``marker`` and ``positions`` (an Interleaving carries its own).
        max_generated_tokens: content tokens to generate at most (confidence tokens not counted).
        pad_id: padding id (prompt padding, and content after a row stopped).
        temperature: sampling temperature of content tokens; 0 means greedy.
        top_k, top_p: optional top-k / nucleus filters on content tokens.
        stop_tokens: ids that end a row (the stop token is kept; it gets no confidence token).
        rng: ``torch.Generator`` for reproducible sampling.
        codec: the confidence codec (from the checkpoint's ``confidence.json``); required by every
            mode but none, where it is optional: when given, confidence ids are never sampled and
            ``entropies`` use the codec's signal distribution (confidence ids masked, tau_H).
        marker: mode marker: the marker's token ids, e.g. the tokenized ``"####"``. A row is
            interleaved until its generated content ends with them; a row that never generates the
            marker stays interleaved throughout, as training interleaves a whole response without it.
        max_prompt_passes: mode full: cap on the prompt's fixed-point passes (default: exact).
        progress: show a progress bar over decode steps.
        step_hook: ``step_hook(logits=..., step=...)`` may return content token ids ``[b]`` to
            replace the built-in sampler (the entropix sampler uses it).
        confidence_override: replaces the bin fed back after each token (an ablation, see
            :mod:`~entropy_guided_generation.generation.bin_ablations`); ``bins`` then records the
            fed bins, ``signal`` and ``entropies`` stay the model's own.
        positions: the position rule the checkpoint was trained with (``interleaving.positions`` in
            its ``confidence.json``): a :class:`~entropy_guided_generation.positions.PositionRule` or
            its name.
        prompt_bins: mode full: a :class:`~entropy_guided_generation.generation.prompt_bins.PromptBinsCache`
            kept across calls on one model and codec: prompt prefixes seen before (few-shot
            exemplars) keep their exact bins instead of being recomputed.

    Returns:
        :class:`DecodeResult` (mode none: ``interleaved`` equals ``tokens``; ``bins`` are all -1).

    Raises:
        ValueError: on an empty prompt row, or a prompt + generation that could outgrow the model's
            ``max_seq_len`` (:func:`check_fits`, before any forward).
        FloatingPointError: on non-finite logits, naming the step and row.
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if not isinstance(interleaving, Interleaving):
        interleaving = Interleaving.of(interleaving, stop_ids=stop_tokens or (), marker_ids=marker, positions=positions)
    if max_generated_tokens < 1:
        raise ValueError(f"max_generated_tokens must be >= 1, got {max_generated_tokens}")
    if not interleaving.is_plain and codec is None:
        raise ValueError(f"mode {interleaving.name!r} needs a confidence codec (codec=...)")
    b, device = prompt.shape[0], prompt.device
    stops = torch.tensor(list(stop_tokens or []), dtype=torch.long, device=device)
    prompt_valid = check_prompt(prompt, pad_id)
    check_fits(model, prompt, prompt_valid, interleaving, max_generated_tokens)
    twin = has_plain_twin(codec, interleaving)
    gets_confidence = interleaving.step_policy(b, device)

    records: list[ContentStep] = []
    active = torch.ones(b, dtype=torch.bool, device=device)
    if twin:  # the twin's prompt forward gives the prompt's bins: the prefill is built in the session
        prefill_width = _prefill_width(prompt, prompt_valid, interleaving)
    else:
        prefill_tokens, prefill_valid, prefill_conf = _prefill_sequence(
            model, prompt, prompt_valid, interleaving, codec=codec, pad_id=pad_id, max_passes=max_prompt_passes,
            override=confidence_override, prompt_bins=prompt_bins,
        )
        prefill_width = prefill_tokens.shape[1]
    cache_len = prefill_width + interleaving.columns_per_content_token * max_generated_tokens
    with kv_session(model, 2 * b if twin else b, cache_len) as session:
        if twin:
            prefill_tokens, prefill_valid, logits, signal_logits = _prefill_with_twin(
                session, prompt, prompt_valid, interleaving, codec=codec, pad_id=pad_id, override=confidence_override
            )
        else:
            last_col = torch.full((b,), prefill_width - 1, dtype=torch.long, device=device)
            logits = session.feed(
                prefill_tokens, prefill_valid, last_col, advances=interleaving.advances_position(prefill_valid, prefill_conf)
            )
            signal_logits = None
        steps = tqdm(range(max_generated_tokens), desc=f"decode[{interleaving.name}]", disable=not progress, leave=False)
        for step in steps:
            out = _content_step(
                logits, codec, gets_confidence, active, pad_id,
                temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, step_hook=step_hook, step=step,
                override=confidence_override, signal_logits=signal_logits,
            )
            records.append(out)
            active = active & ~torch.isin(out.token, stops)
            if not bool(active.any()) or step == max_generated_tokens - 1:
                break
            if twin:
                logits, signal_logits = _feed_step(session, _with_twin(out, pad_id), active.repeat(2), interleaving).split(b)
            else:
                logits = _feed_step(session, out, active, interleaving)
    return _assemble(prompt, prefill_tokens, prefill_valid, records, pad_id)


def has_plain_twin(codec: Optional[ConfidenceCodec], interleaving: Interleaving) -> bool:
    """Whether a decode keeps a plain twin of each row: an interleaving mode whose codec reads the
    signal over the plain prefix (``confidence.context: plain``)."""
    return codec is not None and codec.context == "plain" and not interleaving.is_plain


def check_prompt(prompt: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``[b, p]`` True on the real tokens of the left-padded ``prompt`` ``[b, p]``.

    Raises:
        ValueError: naming the first row that holds no token but ``pad_id`` (or the empty prompt).
    """
    valid = prompt != pad_id
    empty = ~valid.any(1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise ValueError(
            f"prompt row {row} is empty ({prompt.shape[1]} columns, none but pad_id {pad_id}); every prompt row "
            "needs at least one token"
        )
    return valid


def check_fits(
    model: Any, prompt: torch.Tensor, prompt_valid: torch.Tensor, interleaving: Interleaving, max_generated_tokens: int
) -> None:
    """Refuse, before any forward, a decode whose sequence could outgrow the model's ``max_seq_len``
    (a torchtune decoder's rotary position table): per row, the prompt's positions (interleaved in
    a prompt-interleaving mode) plus ``max_generated_tokens`` x the positions a content token takes
    with its confidence token. Models without ``max_seq_len`` are not checked.

    Raises:
        ValueError: naming the row, the numbers, and the largest ``max_generated_tokens`` that fits.
    """
    max_seq_len = getattr(model, "max_seq_len", None)
    if not isinstance(max_seq_len, int):
        return
    prompt_positions = interleaving.prompt_positions(prompt, prompt_valid)
    per_token = interleaving.positions_per_content_token
    needed = prompt_positions + per_token * max_generated_tokens
    if not bool((needed > max_seq_len).any()):
        return
    row = int(needed.argmax())
    used = int(prompt_positions[row])
    prompt_part = f"{used} for the prompt" + (" (interleaved)" if interleaving.interleaves_prompt else "")
    per = f" x {per_token} (content + confidence token)" if per_token > 1 else ""
    fits = (max_seq_len - used) // per_token
    fix = f"lower max_generated_tokens to at most {fits} or shorten the prompt" if fits >= 1 else "shorten the prompt"
    raise ValueError(
        f"prompt row {row} needs {int(needed[row])} positions in mode {interleaving.name!r}: {prompt_part} + "
        f"max_generated_tokens {max_generated_tokens}{per}, more than the model's max_seq_len {max_seq_len}; {fix}"
    )


def _prefill_width(prompt: torch.Tensor, prompt_valid: torch.Tensor, interleaving: Interleaving) -> int:
    """Columns of the left-padded prefill: the prompt's, or its interleaved layout's (each row's
    tokens and slots) when the mode interleaves prompts."""
    if not interleaving.interleaves_prompt:
        return prompt.shape[1]
    slots = interleaving.slots(prompt, valid_mask=prompt_valid)
    return int((prompt_valid.sum(1) + slots.sum(1)).max())


def _prefill_with_twin(
    session: KVSession,
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    interleaving: Interleaving,
    *,
    codec: ConfidenceCodec,
    pad_id: int,
    override: Optional[ConfidenceOverride] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill a session of ``2b`` rows: the plain twins (rows ``b..2b``) read the prompt, whose
    hidden states give the prompt's bins in a prompt-interleaving mode (each slot's from the plain
    prefix, as training's under ``confidence.context: plain``); then rows ``0..b`` read the prompt as
    the mode lays it out. One forward per block, each at its own width.

    Returns:
        ``(tokens, valid, logits, twin_logits)``: the rows' prefill sequence ``[b, P]`` and its
        real-token mask, and the logits ``[b, v]`` after the last column of each block.
    """
    b = prompt.shape[0]
    model = session.model
    twin_hidden = session.feed_rows(slice(b, 2 * b), prompt, prompt_valid)
    if interleaving.interleaves_prompt:
        slots = interleaving.slots(prompt, valid_mask=prompt_valid)
        bins = plain_prefix_bins(model, twin_hidden, slots, codec)
        layout = _prompt_layout(prompt, prompt_valid, slots, bins, codec, pad_id, override)
        tokens, valid, is_conf = layout.tokens, layout.valid_mask, layout.is_confidence
    else:
        tokens, valid, is_conf = prompt, prompt_valid, torch.zeros_like(prompt_valid)
    hidden = session.feed_rows(slice(0, b), tokens, valid, interleaving.advances_position(valid, is_conf))
    session.end_row_blocks()
    return tokens, valid, project_hidden(model, hidden[:, -1]), project_hidden(model, twin_hidden[:, -1])


# Slot signals projected at once from a plain prompt's hidden states ([positions, vocabulary] floats each).
_PLAIN_BINS_POSITIONS = 256


def plain_prefix_bins(model: Any, hidden: torch.Tensor, slots: torch.Tensor, codec: ConfidenceCodec) -> torch.Tensor:
    """``[b, n]`` the bin of each slot (-1 elsewhere) from the plain sequence's last-layer output
    ``hidden`` ``[b, n, d]``: slot t's bin is that of the distribution at column t - 1, the one that
    produced x_t over the plain prefix."""
    rows, cols = slots.nonzero(as_tuple=True)
    bins = torch.full(slots.shape, -1, dtype=torch.long, device=slots.device)
    for start in range(0, rows.numel(), _PLAIN_BINS_POSITIONS):
        r, t = rows[start : start + _PLAIN_BINS_POSITIONS], cols[start : start + _PLAIN_BINS_POSITIONS]
        logits = project_hidden(model, hidden[r, t - 1])
        signals.assert_finite(logits, "plain-prefix logits", rows=r, positions=t)
        bins[r, t] = codec.bins_from_signal(codec.signal_from_logits(logits))
    return bins


def _prompt_layout(
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    slots: torch.Tensor,
    bins: torch.Tensor,
    codec: ConfidenceCodec,
    pad_id: int,
    override: Optional[ConfidenceOverride],
) -> Any:
    """The left-padded prompt interleaved with ``bins`` (or with the bins an ``override`` makes of them)."""
    if override is not None:
        bins = override.prompt_bins(bins, slots)
    conf = codec.token_ids_for_bins(bins.clamp(min=0))
    return interleave(prompt, slots, conf, pad_id=pad_id, valid_mask=prompt_valid, left_pad=True)


def _with_twin(step: "ContentStep", pad_id: int) -> "ContentStep":
    """``step`` for ``2b`` rows: the rows as they are, then their plain twins (the same content
    token, no confidence token)."""
    none = torch.zeros_like(step.has_conf)
    return ContentStep(
        step.token.repeat(2), torch.cat([step.has_conf, none]), torch.cat([step.conf, torch.full_like(step.conf, pad_id)]),
        step.bin.repeat(2), step.signal.repeat(2), step.entropy.repeat(2), step.logprob.repeat(2), step.active.repeat(2),
    )


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
    prompt_bins: Optional[PromptBinsCache] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, valid, is_confidence)``, each ``[b, P]``: the left-padded sequence the prefill
    feeds, i.e. the prompt, interleaved with exact bins when the mode interleaves prompts, by the
    same functions the training layout uses (the decode session's caches set aside meanwhile), or
    with the bins an ``override`` makes of them. With ``prompt_bins`` the bins of a prefix seen
    before are reused (exact) and this prompt's are remembered (only when the passes were not capped)."""
    if not interleaving.interleaves_prompt:
        return prompt, prompt_valid, torch.zeros_like(prompt_valid)
    slots = interleaving.slots(prompt, valid_mask=prompt_valid)
    known_bins, known_signal = prompt_bins.known(prompt, prompt_valid, slots) if prompt_bins is not None else (None, None)
    with caches_set_aside(model):
        fixed = compute_bins(
            model, prompt, codec=codec, slots=slots, valid_mask=prompt_valid, pad_id=pad_id, max_passes=max_passes,
            left_pad=True, positions=interleaving.positions, known_bins=known_bins, known_signal=known_signal,
        )
    if prompt_bins is not None and fixed.converged:
        prompt_bins.add(prompt, prompt_valid, fixed.bins, fixed.signal)
    layout = fixed.interleaved if override is None else _prompt_layout(prompt, prompt_valid, slots, fixed.bins, codec, pad_id, override)
    return layout.tokens, layout.valid_mask, layout.is_confidence


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
    signal_logits: Optional[torch.Tensor] = None,
) -> ContentStep:
    """Pick x_t from the logits that produce it and, where the interleaving's step policy
    (``gets_confidence``) says so, its c_t: the bin of those logits' distribution, or of
    ``signal_logits`` ``[b, v]`` when given (the plain twin's, under ``confidence.context: plain``).

    Rows that already stopped emit ``pad_id`` and no confidence token.

    Raises:
        FloatingPointError: on non-finite ``logits``, naming ``step`` and the row (one ``isfinite``
            reduction per step; its host sync joins the one the loop makes to stop finished rows).
    """
    # One softmax serves the content token's entropy and log-prob and the confidence signal: the
    # codec's distribution (tau_H, confidence ids masked), the one training bins read. Computed
    # first: it refuses non-finite logits (naming the step and row) before anything samples them.
    what = f"decode step {step} logits"
    logp_all = codec.log_probs(logits, what=what) if codec is not None else signals.log_probs(logits, what=what)
    content_logits = codec.mask_confidence_logits(logits) if codec is not None else logits
    token = step_hook(logits=content_logits, step=step) if step_hook is not None else None
    if token is None:
        token = sample_next_token(content_logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
    token = torch.where(active, token, torch.full_like(token, pad_id))
    step_entropy = signals.entropy_from_log_probs(logp_all)
    logp = logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    nan = torch.full_like(step_entropy, float("nan"))
    entropy, logp = torch.where(active, step_entropy, nan), torch.where(active, logp, nan)

    has_conf = gets_confidence(token, active)
    no_bin = torch.full_like(token, -1)
    if codec is None or not bool(has_conf.any()):
        return ContentStep(token, has_conf, torch.full_like(token, pad_id), no_bin, nan, entropy, logp, active)
    if signal_logits is not None:
        signal = codec.signal_from_log_probs(codec.log_probs(signal_logits, what=f"decode step {step} plain-twin logits"))
    else:
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


def _feed_step(session: KVSession, step: ContentStep, active: torch.Tensor, interleaving: Interleaving) -> torch.Tensor:
    """One forward: ``[x_t, c_t]`` (or ``[x_t, pad]``) per row when a confidence token may follow
    content tokens, ``[x_t]`` otherwise; logits after the last real token, positions by the
    interleaving's rule.

    ``active`` is after this step (a row whose x_t was a stop token feeds nothing real)."""
    if interleaving.columns_per_content_token == 1:
        return session.feed(step.token.unsqueeze(1), active.unsqueeze(1), torch.zeros_like(step.token))
    pair = torch.stack([step.token, step.conf], dim=1)
    valid = torch.stack([active, step.has_conf & active], dim=1)
    is_conf = torch.stack([torch.zeros_like(active), torch.ones_like(active)], dim=1)
    advances = interleaving.advances_position(valid, is_conf)
    return session.feed(pair, valid, (step.has_conf & active).long(), advances=advances)


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
