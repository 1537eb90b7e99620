"""LLaDA-style masked-diffusion decoding: fill ``gen_length`` mask tokens after a prompt.

The generated region is split into blocks decoded left to right (semi-autoregressive). Within a
block, each step runs the mask predictor on the whole sequence, predicts a token at every masked
position (argmax, or Gumbel-max sampling in float64 when ``temperature > 0``) and commits the
``k`` most confident predictions of the current block, ``k`` following a linear schedule; committed
tokens are never revisited; the mask token itself is never predicted. Optional classifier-free guidance contrasts the logits with those of
the prompt masked out. With ``threshold`` (Fast-dLLM), a step instead commits every prediction of
the block at least that confident (at least one per row) until the block is full.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

LLADA_MASK_ID = 126336  # [MASK] of GSAI-ML/LLaDA-8B-*; the kit's predictor uses its tokenizer's <|mask|>
REMASKING_STRATEGIES = ("low_confidence", "random")


def predictor_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[b, s, v]`` of a mask predictor called as ``model(tokens)``.

    The model may return the logits tensor itself or an object with ``.logits`` (Hugging Face).

    Raises:
        TypeError: if the output is neither.
        ValueError: if the logits are not ``[b, s, v]`` for tokens ``[b, s]``.
    """
    output = model(tokens)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"a mask predictor must return a logits tensor or an object with .logits, got {type(output).__name__}")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"mask predictor returned logits of shape {tuple(logits.shape)}; expected [b, s, v] with [b, s] = {tuple(tokens.shape)}")
    return logits.float()


def resolve_mask_id(model: Any, mask_id: Optional[int]) -> int:
    """The mask token id to decode with: ``mask_id`` when given, else the model's
    ``config.mask_token_id`` (LLaDA's configs and the kit's predictor carry one).

    Raises:
        ValueError: naming ``mask_id`` when neither is set; or when the id lies outside the
            model's ``config.vocab_size`` (checked before any forward, so no embedding lookup fails).
    """
    config = getattr(model, "config", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError(
                f"mask_id is required: the {type(model).__name__} has no config.mask_token_id to read it from; pass "
                f"mask_id=<the predictor's mask token id> (LLaDA-8B: {LLADA_MASK_ID}; the kit's predictor: "
                "load_mask_predictor()[2].mask_id)"
            )
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the predictor's vocabulary of {vocab_size} ids")
    return int(mask_id)


def check_mask_id(logits: torch.Tensor, mask_id: int) -> None:
    """Raise if ``mask_id`` is not an id of the predictor's vocabulary (``logits`` ``[..., v]``)."""
    if not 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"mask_id {mask_id} is outside the predictor's vocabulary of {logits.shape[-1]} ids")


def never_predict_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``logits`` with the mask token's logit at ``-inf``: a committed token is never the mask.

    LLaDA leaves it in (its trained predictor gives the mask ~0 probability); without this an
    untrained or weak predictor can "commit" a mask, which would stay a hole in the output.
    """
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def check_block_layout(steps: int, gen_length: int, block_length: int) -> int:
    """Validate the block layout and return the number of steps per block.

    Raises:
        ValueError: unless ``gen_length`` is a positive multiple of ``block_length`` and ``steps`` a
            positive multiple of the number of blocks.
    """
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks} (gen_length / block_length)")
    return steps // num_blocks


def masked_canvas(prompt: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    """``[b, p + gen_length]``: the prompt followed by ``gen_length`` mask tokens.

    Args:
        prompt: ``[b, p]`` token ids (batched prompts left-padded with a token the predictor ignores).

    Raises:
        ValueError: if the prompt is not a 2-D integer tensor or contains ``mask_id`` (decoding fills
            only the generated region; a mask in the prompt would be filled and counted nowhere).
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"prompt must be a [b, p] integer tensor, got {getattr(prompt, 'shape', prompt)!r} of {getattr(prompt, 'dtype', type(prompt))}")
    masked = (prompt == mask_id).nonzero()
    if len(masked):
        row, col = masked[0].tolist()
        raise ValueError(f"prompt row {row} holds the mask id {mask_id} at position {col}; the prompt must contain no mask token")
    canvas = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    canvas[:, : prompt.shape[1]] = prompt
    return canvas


def tokens_per_step(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each step of a block commits: ``[b, steps]`` long.

    LLaDA's linear schedule: the ``n`` masked tokens of row b are spread evenly, the first
    ``n % steps`` steps committing one more than the others.

    Args:
        masked: ``[b, block_length]`` True where the block is still masked.
    """
    count = masked.sum(dim=1, keepdim=True)
    extra = torch.arange(steps, device=masked.device).unsqueeze(0) < count % steps
    return count // steps + extra.long()


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A sample of softmax(logits / temperature) per position by the Gumbel-max trick, in float64.

    ``temperature == 0`` is the argmax (no noise drawn). Otherwise this is LLaDA's
    ``argmax(exp(l) / (-log u)^T)`` written in log space, ``argmax(l - T log(-log u))``, which picks
    the same token without overflowing ``exp`` (float64: low-precision Gumbel noise hurts
    masked-diffusion quality, arXiv:2409.02908).

    Args:
        logits: ``[..., v]``.
        temperature: T >= 0.
        generator: source of the uniform noise (default: torch's global generator).

    Returns:
        ``[...]`` long token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits.double() - temperature * torch.log(-torch.log(uniform))).argmax(dim=-1)


def prediction_confidence(
    logits: torch.Tensor, predicted: torch.Tensor, remasking: str, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The score that ranks predictions for commitment: ``[b, s]`` float64.

    ``low_confidence``: the float64 softmax probability of the predicted token (the least confident
    predictions stay masked). ``random``: a uniform draw per position (float32, as LLaDA).
    """
    if remasking == "low_confidence":
        probs = torch.softmax(logits.double(), dim=-1)
        return probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
    if remasking == "random":
        return torch.rand(predicted.shape, device=predicted.device, generator=generator).double()
    raise ValueError(f"unknown remasking {remasking!r}; expected one of {', '.join(REMASKING_STRATEGIES)}")


def top_k_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, s]``: True at the ``k[b]`` highest scores of each row.

    Args:
        scores: ``[b, s]``; ineligible positions hold ``-inf`` (``k[b]`` never exceeds a row's
            eligible positions in our callers).
        k: ``[b]`` long, 0 <= k[b] <= s.
    """
    k_max = int(k.max()) if k.numel() else 0
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k_max == 0:
        return chosen
    top = torch.topk(scores, k=k_max, dim=-1).indices
    keep = torch.arange(k_max, device=scores.device).unsqueeze(0) < k.unsqueeze(1)
    return chosen.scatter_(1, top, keep)


def guided_logits(model: Any, x: torch.Tensor, prompt_length: int, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Logits ``[b, s, v]`` for canvas ``x``, with unsupervised classifier-free guidance when ``cfg_scale > 0``.

    Guidance runs the conditional and the prompt-masked (unconditional) canvases as one forward of
    ``2b`` rows and returns ``u + (cfg_scale + 1) (c - u)``.
    """
    if cfg_scale <= 0:
        return predictor_logits(model, x)
    unconditional = x.clone()
    unconditional[:, :prompt_length] = mask_id
    conditional_logits, unconditional_logits = predictor_logits(model, torch.cat([x, unconditional])).chunk(2)
    return unconditional_logits + (cfg_scale + 1) * (conditional_logits - unconditional_logits)


def commit_by_schedule(confidence: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Positions to commit: the ``count[b]`` most confident of each row ``[b, s]`` (``-inf`` = not a candidate)."""
    return top_k_per_row(confidence, count)


def commit_by_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions to commit (Fast-dLLM): every candidate with confidence >= ``threshold``, and each
    row's most confident candidate in any case, so every row with a candidate progresses."""
    has_candidate = torch.isfinite(confidence).any(dim=-1)
    best = top_k_per_row(confidence, has_candidate.long())
    return best | (confidence >= threshold)


def _check_decoding_options(temperature: float, cfg_scale: float, remasking: str, threshold: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    if remasking not in REMASKING_STRATEGIES:
        raise ValueError(f"unknown remasking {remasking!r}; expected one of {', '.join(REMASKING_STRATEGIES)}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1] or be None, got {threshold!r}")


@torch.no_grad()
def generate(
    model: Any,
    prompt: torch.Tensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    *,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Decode ``gen_length`` tokens after ``prompt`` with LLaDA's masked-diffusion sampler.

    Args:
        model: mask predictor, ``model(tokens [b, s]) -> logits [b, s, v]`` (or ``.logits``),
            bidirectional, trained to predict ``mask_id`` positions.
        prompt: ``[b, p]`` token ids, no mask token; batched prompts left-padded with a token the
            predictor was trained to ignore (the kit's predictor: ``<|endoftext|>``).
        steps: total denoising steps, a multiple of the number of blocks; each block gets
            ``steps / num_blocks`` (ignored when ``threshold`` is set).
        gen_length: number of generated tokens, a multiple of ``block_length``.
        block_length: tokens per semi-autoregressive block (``gen_length``: one block).
        temperature: Gumbel-max sampling temperature (0: argmax).
        cfg_scale: unsupervised classifier-free guidance scale (0: off; > 0 doubles the forward rows).
        remasking: ``low_confidence`` (commit the most probable predictions first) or ``random``.
        mask_id: the predictor's mask token id (None: the model's ``config.mask_token_id``, see
            :func:`resolve_mask_id`).
        threshold: Fast-dLLM confidence-threshold commits instead of the fixed schedule.
        generator: source of Gumbel and ``random`` noise (default: torch's global generator).

    Returns:
        ``(tokens, logs)``: tokens ``[b, p + gen_length]`` (the prompt unchanged, then the
        generated tokens, none of them ``mask_id``); logs ``{"nfe": model evaluations per sequence
        (a guided step counts 2), "total_steps": denoising steps run}``.
    """
    steps_per_block = check_block_layout(steps, gen_length, block_length)
    _check_decoding_options(temperature, cfg_scale, remasking, threshold)
    mask_id = resolve_mask_id(model, mask_id)
    x = masked_canvas(prompt, gen_length, mask_id)
    step_options = dict(prompt_length=prompt.shape[1], temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, mask_id=mask_id, generator=generator)
    total_steps = 0
    for block_start in range(prompt.shape[1], x.shape[1], block_length):
        block_end = block_start + block_length
        if threshold is None:
            schedule = tokens_per_step(x[:, block_start:block_end] == mask_id, steps_per_block)
            for step in range(steps_per_block):
                x = denoise_step(model, x, block_end=block_end, count=schedule[:, step], **step_options)
                total_steps += 1
        else:
            while bool((x[:, block_start:block_end] == mask_id).any()):
                x = denoise_step(model, x, block_end=block_end, threshold=threshold, **step_options)
                total_steps += 1
    return x, {"nfe": total_steps * (2 if cfg_scale > 0 else 1), "total_steps": total_steps}


def denoise_step(
    model: Any,
    x: torch.Tensor,
    *,
    prompt_length: int,
    block_end: int,
    temperature: float,
    cfg_scale: float,
    remasking: str,
    mask_id: int,
    generator: Optional[torch.Generator],
    count: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """One forward and one commit: the canvas ``x`` ``[b, s]`` with some masked positions filled.

    Candidates are the masked positions before ``block_end`` (positions past the current block are
    never committed). ``count`` ``[b]`` commits that many per row (the schedule); otherwise
    ``threshold`` decides (``commit_by_threshold``).
    """
    logits = guided_logits(model, x, prompt_length, cfg_scale, mask_id)
    check_mask_id(logits, mask_id)
    logits = never_predict_mask(logits, mask_id)
    predicted = gumbel_argmax(logits, temperature, generator)
    confidence = prediction_confidence(logits, predicted, remasking, generator)
    positions = torch.arange(x.shape[1], device=x.device)
    candidates = (x == mask_id) & (positions < block_end)
    confidence = confidence.masked_fill(~candidates, float("-inf"))
    commit = commit_by_schedule(confidence, count) if count is not None else commit_by_threshold(confidence, threshold) & candidates
    return torch.where(commit, predicted, x)


__all__ = [
    "LLADA_MASK_ID",
    "REMASKING_STRATEGIES",
    "check_block_layout",
    "denoise_step",
    "generate",
    "gumbel_argmax",
    "masked_canvas",
    "never_predict_mask",
    "predictor_logits",
    "prediction_confidence",
    "resolve_mask_id",
    "tokens_per_step",
    "top_k_per_row",
]
