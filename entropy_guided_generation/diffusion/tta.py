"""Test-time-augmentation (TTA) uncertainty remasking for masked-diffusion decoding (seed 004).

Each step looks at the canvas through K perturbed views, commits masked positions as LLaDA's
``low_confidence`` schedule does (with the views' consensus), then *revisits* committed tokens:
the most uncertain ones are masked again and re-predicted at the next step. Per generated position,

    uncertainty = alpha * H(mean of the views' distributions)     (nats)
                + beta  * disagreement (share of views whose sample differs from the consensus)
                + gamma * constraint violation (``constraint_fn`` on the drafted sequence)
                - lambda * flip rate (flips in the freeze window / window length)

The flip-rate term is a penalty on remasking tokens that recently changed, and the freeze
window stops a token that flipped ``freeze_threshold`` times within ``freeze_window`` steps from
being remasked for ``freeze_duration`` steps; both fight oscillation.

Perturbations come in two kinds. Sampling temperatures change nothing before the logits, so the
K views of a temperature-only run share one forward. Dropout (``tta_use_dropout``) and input
re-masking (``tta_mask_ratio``) change the forward; their K copies run as one forward of K x B rows.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from entropy_guided_generation.diffusion.decoding import (
    check_block_layout,
    check_mask_id,
    masked_canvas,
    never_predict_mask,
    predictor_logits,
    resolve_mask_id,
    tokens_per_step,
    top_k_per_row,
)

ConstraintFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class TTAOptions:
    """Every knob of ``generate_with_tta_uncertainty`` except the block layout (see its docstring)."""

    tta_k: int = 5
    tta_temperature_range: tuple[float, float] = (0.0, 0.3)
    tta_use_dropout: bool = False
    tta_mask_ratio: float = 0.0
    alpha_entropy: float = 1.0
    beta_disagreement: float = 0.5
    gamma_violation: float = 0.3
    lambda_change: float = 0.2
    remask_top_k: Optional[int] = None
    remask_top_pct: float = 0.1
    freeze_window: int = 5
    freeze_threshold: int = 3
    freeze_duration: int = 3

    def __post_init__(self) -> None:
        _check_positive_int("tta_k", self.tta_k)
        low, high = _as_range(self.tta_temperature_range)
        if not 0.0 <= low <= high or not math.isfinite(high):
            raise ValueError(f"tta_temperature_range must be (low, high) with 0 <= low <= high, got {self.tta_temperature_range!r}")
        if not 0.0 <= self.tta_mask_ratio < 1.0:
            raise ValueError(f"tta_mask_ratio must lie in [0, 1), got {self.tta_mask_ratio!r}")
        for name in ("alpha_entropy", "beta_disagreement", "gamma_violation", "lambda_change"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.remask_top_k is not None and (not isinstance(self.remask_top_k, int) or self.remask_top_k < 0):
            raise ValueError(f"remask_top_k must be None or an int >= 0, got {self.remask_top_k!r}")
        if not 0.0 <= self.remask_top_pct <= 1.0:
            raise ValueError(f"remask_top_pct must lie in [0, 1], got {self.remask_top_pct!r}")
        _check_positive_int("freeze_window", self.freeze_window)
        _check_positive_int("freeze_threshold", self.freeze_threshold)
        if not isinstance(self.freeze_duration, int) or self.freeze_duration < 0:
            raise ValueError(f"freeze_duration must be an int >= 0, got {self.freeze_duration!r}")

    @property
    def perturbs_forward(self) -> bool:
        """True when the views need their own forwards (dropout or input re-masking)."""
        return self.tta_use_dropout or self.tta_mask_ratio > 0

    def temperatures(self) -> torch.Tensor:
        """``[k]`` sampling temperatures, evenly spaced over ``tta_temperature_range`` (float64)."""
        low, high = _as_range(self.tta_temperature_range)
        return torch.linspace(low, high, self.tta_k, dtype=torch.float64) if self.tta_k > 1 else torch.tensor([low], dtype=torch.float64)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _as_range(pair: Any) -> tuple[float, float]:
    try:
        low, high = pair
        return float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"tta_temperature_range must be a pair (low, high), got {pair!r}") from None


# ---------------------------------------------------------------- perturbed views


@contextlib.contextmanager
def dropout_in_train_mode(model: Any) -> Iterator[None]:
    """Put every dropout module of ``model`` (p > 0) in train mode; restore each one's mode after.

    Raises:
        ValueError: if ``model`` has no dropout module with p > 0 (the K passes would be identical).
    """
    modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0] if isinstance(model, nn.Module) else []
    if not modules:
        raise ValueError(
            f"tta_use_dropout=True but the model ({type(model).__name__}) has no torch.nn dropout module with p > 0; "
            "its K passes would be identical (use tta_mask_ratio or temperatures instead)"
        )
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.train()
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def remask_fraction(tokens: torch.Tensor, eligible: torch.Tensor, ratio: float, mask_id: int) -> torch.Tensor:
    """``tokens`` ``[r, s]`` with ``round(ratio * n_r)`` of each row's ``n_r`` eligible positions,
    drawn uniformly at random (torch's global generator), replaced by ``mask_id``."""
    count = torch.round(ratio * eligible.sum(dim=1).double()).long()
    scores = torch.rand(tokens.shape, device=tokens.device).masked_fill(~eligible, float("-inf"))
    return tokens.masked_fill(top_k_per_row(scores, count), mask_id)


def view_logits(model: Any, x: torch.Tensor, committed: torch.Tensor, options: TTAOptions, mask_id: int) -> torch.Tensor:
    """Logits of the K views: ``[1, b, s, v]`` (shared by all views) when only temperatures vary,
    else ``[k, b, s, v]`` from one forward of the K x B perturbed copies (row ``i * b + j`` is view
    i of sequence j).

    Args:
        x: ``[b, s]`` canvas.
        committed: ``[b, s]`` True at committed generated tokens (the ones input re-masking may hide).
    """
    if not options.perturbs_forward:
        return predictor_logits(model, x).unsqueeze(0)
    k = options.tta_k
    copies = x.repeat(k, 1)
    if options.tta_mask_ratio > 0:
        copies = remask_fraction(copies, committed.repeat(k, 1), options.tta_mask_ratio, mask_id)
    with dropout_in_train_mode(model) if options.tta_use_dropout else contextlib.nullcontext():
        logits = predictor_logits(model, copies)
    return logits.view(k, *x.shape, logits.shape[-1])


@dataclass
class ViewSummary:
    """What the K views say about each position of the scored columns ``[b, n]``.

    Attributes:
        consensus: ``[b, n]`` long, the token most views sampled (ties: higher mean probability).
        consensus_prob: ``[b, n]`` mean probability of the consensus token over the views.
        entropy: ``[b, n]`` nats, entropy of the views' mean distribution.
        disagreement: ``[b, n]`` in [0, 1), share of views whose sample is not the consensus.
    """

    consensus: torch.Tensor
    consensus_prob: torch.Tensor
    entropy: torch.Tensor
    disagreement: torch.Tensor


def sample_views(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """One token per view and position: ``[k, b, n]`` long.

    View i draws from ``softmax(logits_i / T_i)`` by the inverse CDF (one float32 uniform per
    position, torch's global generator); views with ``T_i = 0`` take the argmax, computed once when
    the views share their logits. (``generate`` keeps LLaDA's float64 Gumbel-max; here one draw per position
    instead of one per vocabulary entry keeps the K views of a temperature-only step cheap next to
    its single forward.)

    Args:
        logits: ``[k or 1, b, n, v]`` per-view logits (1: shared by all views).
        temperatures: ``[k]`` sampling temperature of each view (>= 0).
    """
    k = temperatures.shape[0]
    views = logits.expand(k, *logits.shape[1:])
    temps = temperatures.to(device=logits.device, dtype=logits.dtype)
    samples = torch.empty(views.shape[:-1], dtype=torch.long, device=logits.device)
    greedy = temps == 0
    if bool(greedy.any()):
        argmax = logits.argmax(dim=-1).expand(k, *logits.shape[1:-1])
        samples[greedy] = argmax[greedy]
    hot = (~greedy).nonzero().flatten()
    if hot.numel():
        # Shared logits broadcast against the K temperatures: one division pass, no copy first.
        view_logits = logits if logits.shape[0] == 1 else logits[hot]
        cdf = torch.softmax(view_logits / temps[hot].view(-1, 1, 1, 1), dim=-1).cumsum_(dim=-1)
        # Inverse CDF: the first id whose cumulative probability exceeds u (zero-probability ids never).
        u = torch.rand(cdf.shape[:-1], device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
        samples[hot] = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return samples


def summarize_views(logits: torch.Tensor, temperatures: torch.Tensor) -> ViewSummary:
    """Sample one token per view (``sample_views``) and summarize the views.

    Args:
        logits: ``[k or 1, b, n, v]`` per-view logits (1: shared by all views).
        temperatures: ``[k]`` sampling temperature of each view.
    """
    samples = sample_views(logits, temperatures)  # [k, b, n]
    probs = torch.softmax(logits, dim=-1)
    mean_probs = probs[0] if probs.shape[0] == 1 else probs.mean(dim=0)  # [b, n, v]
    # Votes of each view's own sample, counted among the k samples (no [b, n, v] tally): every
    # token with a vote is a sample, and a token without one cannot win.
    votes = (samples.unsqueeze(0) == samples.unsqueeze(1)).sum(dim=1).to(mean_probs.dtype)  # [k, b, n]
    sample_probs = mean_probs.gather(-1, samples.permute(1, 2, 0)).permute(2, 0, 1)  # [k, b, n]
    # Vote counts are integers and mean probabilities lie in [0, 1]: half of one breaks ties only.
    winner = (votes + 0.5 * sample_probs).argmax(dim=0, keepdim=True)  # [1, b, n]
    consensus = samples.gather(0, winner).squeeze(0)
    log_mean = mean_probs.log()
    return ViewSummary(
        consensus=consensus,
        consensus_prob=sample_probs.gather(0, winner).squeeze(0),
        entropy=-torch.where(mean_probs > 0, mean_probs * log_mean, torch.zeros_like(log_mean)).sum(-1),
        disagreement=1.0 - (samples == consensus.unsqueeze(0)).float().mean(dim=0),
    )


# ---------------------------------------------------------------- anti-oscillation


class FreezeWindow:
    """Flip history of every generated position and the freezes it triggers.

    A *flip* is a commit that gives a position a token different from the one it held before it
    was remasked. A position with ``threshold`` flips within the last ``window`` steps is frozen
    (cannot be remasked) for the next ``duration`` steps.
    """

    def __init__(self, shape: tuple[int, int], window: int, threshold: int, duration: int, device: torch.device):
        self.window, self.threshold, self.duration = window, threshold, duration
        self.flips = torch.zeros(window, *shape, dtype=torch.bool, device=device)  # ring buffer over steps
        self.last_token = torch.full(shape, -1, dtype=torch.long, device=device)
        self.frozen_until = torch.full(shape, -1, dtype=torch.long, device=device)  # first step no longer frozen

    def record_commits(self, step: int, committed_now: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record step ``step``'s commits and freeze positions that reach the threshold.

        Args:
            committed_now: ``[b, n]`` True where this step committed, for the first n generated
                columns (later columns are past the current block: nothing is committed there).
            tokens: ``[b, n]`` the committed tokens (read where ``committed_now``).
        """
        n = committed_now.shape[1]
        last = self.last_token[:, :n]
        flipped = committed_now & (last >= 0) & (tokens != last)
        self.flips[step % self.window] = False
        self.flips[step % self.window, :, :n] = flipped
        self.last_token[:, :n] = torch.where(committed_now, tokens, last)
        freeze = flipped & (self.flips[:, :, :n].sum(dim=0) >= self.threshold)
        self.frozen_until[:, :n].masked_fill_(freeze, step + self.duration)

    def frozen(self, step: int) -> torch.Tensor:
        """``[b, n]`` True where remasking is blocked at ``step``: a freeze recorded at step s blocks
        steps s .. s + duration - 1."""
        return self.frozen_until > step

    def flip_rate(self) -> torch.Tensor:
        """``[b, n]`` flips within the window divided by the window length, in [0, 1]."""
        return self.flips.sum(dim=0).float() / self.window


# ---------------------------------------------------------------- scoring and remasking


def check_violation_scores(scores: Any, shape: tuple[int, int]) -> torch.Tensor:
    """Return ``scores`` if it is a finite float32 tensor of ``shape``; raise naming what is wrong.

    Raises:
        TypeError: if the constraint function returned no tensor or one of the wrong dtype.
        ValueError: on a wrong shape or non-finite values.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"constraint_fn must return a torch.Tensor of shape {tuple(shape)} and dtype torch.float32, got {type(scores).__name__}")
    if tuple(scores.shape) != tuple(shape) or scores.dtype != torch.float32:
        raise ValueError(
            f"constraint_fn returned shape {tuple(scores.shape)} and dtype {scores.dtype}; "
            f"expected shape {tuple(shape)} ([batch, seq_len] of the tokens it was given) and dtype torch.float32"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("constraint_fn returned non-finite violation scores; expected finite penalties (higher = worse)")
    return scores


def uncertainty_scores(views: ViewSummary, violation: torch.Tensor, flip_rate: torch.Tensor, options: TTAOptions) -> torch.Tensor:
    """``[b, n]`` alpha H + beta disagreement + gamma violation - lambda flip rate (see the module docstring)."""
    return (
        options.alpha_entropy * views.entropy
        + options.beta_disagreement * views.disagreement
        + options.gamma_violation * violation
        - options.lambda_change * flip_rate
    )


def remask_counts(eligible: torch.Tensor, options: TTAOptions) -> torch.Tensor:
    """``[b]`` tokens to remask per row: ``remask_top_k`` if set, else floor(``remask_top_pct`` x
    eligible), never more than the row's eligible tokens."""
    available = eligible.sum(dim=1)
    if options.remask_top_k is not None:
        wanted = torch.full_like(available, options.remask_top_k)
    else:
        wanted = torch.floor(options.remask_top_pct * available.double()).long()
    return torch.minimum(wanted, available)


@dataclass
class TTAStats:
    """Per-step averages over the batch (lists of floats, one entry per step)."""

    avg_entropy_per_step: list[float] = field(default_factory=list)
    avg_disagreement_per_step: list[float] = field(default_factory=list)
    remask_ratio_per_step: list[float] = field(default_factory=list)
    frozen_ratio_per_step: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in vars(self).items()}


# ---------------------------------------------------------------- the decoder


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Run with torch's RNG seeded by ``seed`` (dropout included), leaving the caller's RNG state as it was."""
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_with_tta_uncertainty(
    model: Any,
    prompt: torch.Tensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: Optional[int] = None,
    tta_k: int = 5,
    tta_temperature_range: tuple[float, float] = (0.0, 0.3),
    tta_use_dropout: bool = False,
    alpha_entropy: float = 1.0,
    beta_disagreement: float = 0.5,
    gamma_violation: float = 0.3,
    lambda_change: float = 0.2,
    remask_top_k: Optional[int] = None,
    remask_top_pct: float = 0.1,
    freeze_window: int = 5,
    freeze_threshold: int = 3,
    freeze_duration: int = 3,
    constraint_fn: Optional[ConstraintFn] = None,
    seed: Optional[int] = None,
    mask_id: Optional[int] = None,
    tta_mask_ratio: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masked-diffusion decoding that revisits committed tokens by TTA uncertainty.

    The block layout and the per-step commit schedule are LLaDA's (``generate``); each step commits
    enough masked positions of the generated region up to the current block's end to keep the
    schedule (remasked tokens are committed again on top of it), choosing the consensus tokens with
    the highest mean probability. Then, except at a block's last step, up to ``remask_top_k`` (or
    floor(``remask_top_pct`` x eligible)) of the most uncertain eligible tokens are masked again.
    Eligible: generated, committed before this step, not frozen. The prompt is never changed, and
    every block ends fully committed, so no mask token remains.

    Args:
        model: mask predictor ``model(tokens [b, s]) -> logits [b, s, v]`` (or ``.logits``).
        prompt: ``[b, p]`` token ids without the mask token (left-padded batches).
        steps, gen_length: as in ``generate``.
        block_length: tokens per block (default: ``gen_length``, one block).
        tta_k: number of views K.
        tta_temperature_range: (low, high); view i samples at the i-th of K evenly spaced temperatures.
        tta_use_dropout: run the K views with the model's dropout modules in train mode (restored after).
        alpha_entropy, beta_disagreement, gamma_violation, lambda_change: uncertainty weights.
        remask_top_k: tokens to remask per row and step; overrides ``remask_top_pct``.
        remask_top_pct: share of the eligible tokens to remask per row and step (floored).
        freeze_window, freeze_threshold, freeze_duration: a token that flips ``freeze_threshold``
            times within ``freeze_window`` steps cannot be remasked for ``freeze_duration`` steps.
        constraint_fn: ``tokens [b, s] -> violations [b, s] float32`` (higher = worse), called each
            step on the draft: the canvas with masked positions up to the block end filled by the
            consensus (masks after the block remain ``mask_id``).
        seed: seeds every random draw (view samples, dropout, re-masking) without touching the
            caller's RNG state; None draws from torch's global generator.
        mask_id: the predictor's mask token id (None: the model's ``config.mask_token_id``; an
            error naming ``mask_id`` when it has none).
        tta_mask_ratio: share of the committed generated tokens masked at random in each view's copy
            (0: none); > 0 makes the views run as K x B forward rows.

    Returns:
        ``(tokens [b, p + gen_length], logs)`` with ``logs["total_steps"]``; ``logs["nfe"]``: model
        evaluations per sequence actually run, 1 per step when only temperatures vary (the views
        share one forward) and K per step with dropout or input re-masking. (The seed's code counts
        K per step even when its K passes are identical.) ``logs["tta_stats"]``:
        ``avg_entropy_per_step`` (nats) and ``avg_disagreement_per_step`` (mean over the generated
        positions up to the block end), ``remask_ratio_per_step`` and ``frozen_ratio_per_step``
        (share of the ``gen_length`` generated positions).
    """
    block_length = gen_length if block_length is None else block_length
    steps_per_block = check_block_layout(steps, gen_length, block_length)
    options = TTAOptions(
        tta_k, tuple(tta_temperature_range), tta_use_dropout, tta_mask_ratio, alpha_entropy, beta_disagreement,
        gamma_violation, lambda_change, remask_top_k, remask_top_pct, freeze_window, freeze_threshold, freeze_duration,
    )
    mask_id = resolve_mask_id(model, mask_id)
    x = masked_canvas(prompt, gen_length, mask_id)
    with _seeded(seed, x.device):
        return _TTADecoder(model, options, constraint_fn, mask_id, prompt.shape[1], x).decode(x, block_length, steps_per_block)


class _TTADecoder:
    """The state of one ``generate_with_tta_uncertainty`` call: model, options, freeze window, stats."""

    def __init__(self, model: Any, options: TTAOptions, constraint_fn: Optional[ConstraintFn], mask_id: int, prompt_length: int, x: torch.Tensor):
        self.model, self.options, self.constraint_fn, self.mask_id = model, options, constraint_fn, mask_id
        self.prompt_length = prompt_length
        self.gen_length = x.shape[1] - prompt_length
        self.temperatures = options.temperatures()
        self.freeze = FreezeWindow((x.shape[0], self.gen_length), options.freeze_window, options.freeze_threshold, options.freeze_duration, x.device)
        self.stats = TTAStats()
        self.steps_run = 0

    def decode(self, x: torch.Tensor, block_length: int, steps_per_block: int) -> tuple[torch.Tensor, dict[str, Any]]:
        for block_end in range(self.prompt_length + block_length, x.shape[1] + 1, block_length):
            schedule = tokens_per_step(x[:, block_end - block_length : block_end] == self.mask_id, steps_per_block)
            for block_step in range(steps_per_block):
                still_scheduled = schedule[:, block_step + 1 :].sum(dim=1)
                x = self.step(x, block_end, still_scheduled, may_remask=block_step < steps_per_block - 1)
        nfe_per_step = self.options.tta_k if self.options.perturbs_forward else 1
        return x, {"total_steps": self.steps_run, "nfe": self.steps_run * nfe_per_step, "tta_stats": self.stats.as_dict()}

    def step(self, x: torch.Tensor, block_end: int, still_scheduled: torch.Tensor, may_remask: bool) -> torch.Tensor:
        """Views -> commits -> constraint -> remasking, on the generated columns up to ``block_end``.

        Args:
            x: ``[b, s]`` canvas.
            still_scheduled: ``[b]`` commits the block's later steps will make; this step commits the
                rest of the masked positions in scope.
            may_remask: False at a block's last step (the block must end fully committed).
        """
        scope = slice(self.prompt_length, block_end)
        committed_before = x[:, scope] != self.mask_id
        committed_columns = torch.zeros_like(x, dtype=torch.bool)
        committed_columns[:, scope] = committed_before
        logits = view_logits(self.model, x, committed_columns, self.options, self.mask_id)
        check_mask_id(logits, self.mask_id)
        views = summarize_views(never_predict_mask(logits[:, :, scope], self.mask_id), self.temperatures)

        count = (~committed_before).sum(dim=1) - still_scheduled
        commit = top_k_per_row(views.consensus_prob.masked_fill(committed_before, float("-inf")), count)
        generated = torch.where(commit, views.consensus, x[:, scope])
        self.freeze.record_commits(self.steps_run, commit, views.consensus)

        frozen = self.freeze.frozen(self.steps_run)[:, : generated.shape[1]]
        eligible = committed_before & ~frozen if may_remask else torch.zeros_like(committed_before)
        violation = self.violation(x, generated, views.consensus, scope)
        scores = uncertainty_scores(views, violation, self.freeze.flip_rate()[:, : generated.shape[1]], self.options)
        remask = top_k_per_row(scores.masked_fill(~eligible, float("-inf")), remask_counts(eligible, self.options))
        generated = generated.masked_fill(remask, self.mask_id)

        self.record_stats(views, remask, frozen & (generated != self.mask_id))
        self.steps_run += 1
        out = x.clone()
        out[:, scope] = generated
        return out

    def violation(self, x: torch.Tensor, generated: torch.Tensor, consensus: torch.Tensor, scope: slice) -> torch.Tensor:
        """``[b, n]`` constraint violations of the scope columns, from ``constraint_fn`` on the draft
        (masked scope positions filled with the consensus); zeros without a constraint."""
        if self.constraint_fn is None:
            return torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
        draft = x.clone()
        draft[:, scope] = torch.where(generated == self.mask_id, consensus, generated)
        return check_violation_scores(self.constraint_fn(draft), tuple(x.shape))[:, scope]

    def record_stats(self, views: ViewSummary, remask: torch.Tensor, frozen: torch.Tensor) -> None:
        generated_positions = remask.shape[0] * self.gen_length
        self.stats.avg_entropy_per_step.append(float(views.entropy.mean()))
        self.stats.avg_disagreement_per_step.append(float(views.disagreement.mean()))
        self.stats.remask_ratio_per_step.append(float(remask.sum()) / generated_positions)
        self.stats.frozen_ratio_per_step.append(float(frozen.sum()) / generated_positions)


__all__ = [
    "FreezeWindow",
    "TTAOptions",
    "TTAStats",
    "ViewSummary",
    "check_violation_scores",
    "dropout_in_train_mode",
    "generate_with_tta_uncertainty",
    "remask_counts",
    "remask_fraction",
    "sample_views",
    "summarize_views",
    "uncertainty_scores",
    "view_logits",
]
