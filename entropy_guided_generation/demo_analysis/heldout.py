"""Held-out problems decoded and scored outside lm-eval, exactly as the demo's eval task scores them,
so that the same problems can be decoded again with the confidence tokens overridden.

A :class:`HeldOutTask` says how a row becomes a prompt, a reference response (for teacher-forced
content loss) and a target, and how an answer is extracted (lm-eval's ``strict-match`` regex and
``exact_match`` normalization of the task YAML). :func:`decode_heldout` decodes prompts in batches
through :func:`~entropy_guided_generation.generation.decode` (greedy, as the eval task) and keeps
what every later measurement reads: the text lm-eval would get, the content tokens it covers and
their bins, signals and log-probs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.data.bigbench_mistake import trace_response
from entropy_guided_generation.generation.gen_kwargs import cut_at_stop, tokens_covering
from entropy_guided_generation.eval.teacher_forcing import score_continuations
from entropy_guided_generation.generation import ConfidenceOverride, decode, left_pad
from entropy_guided_generation.modes import Interleaving


@dataclass(frozen=True)
class HeldOutTask:
    """How the demo's eval task prompts, answers and scores a row.

    Attributes:
        name: the lm-eval task it mirrors.
        prompt: row -> prompt text (the task's ``doc_to_text``).
        response: row -> the reference response the finetune trained on (without EOS).
        target: row -> the string exact_match compares with (after ``ignore`` substitutions).
        answer_regex: the ``strict-match`` filter: the first group of its first match is the answer.
        ignore: exact_match's ``regexes_to_ignore``, applied to answer and target alike.
        until: the task's stop strings (the text ends before the first).
    """

    name: str
    prompt: Callable[[dict], str]
    response: Callable[[dict], str]
    target: Callable[[dict], str]
    answer_regex: str
    ignore: tuple[str, ...]
    until: tuple[str, ...]

    def extract(self, text: str) -> str:
        """The answer lm-eval's filter takes from ``text`` (``[invalid]`` when there is none)."""
        match = re.search(self.answer_regex, text)
        return match.group(1) if match else "[invalid]"

    def normalize(self, text: str) -> str:
        for pattern in self.ignore:
            text = re.sub(pattern, "", text)
        return text.lower()

    def is_correct(self, text: str, row: dict) -> bool:
        """exact_match of the extracted answer against the target (ignore_case, ``ignore`` removed)."""
        return self.normalize(self.extract(text)) == self.normalize(self.target(row))


GSM8K = HeldOutTask(
    name="kit_gsm8k",
    prompt=lambda row: row["question"] + "\n",
    response=lambda row: row["answer"],
    target=lambda row: row["answer"],
    answer_regex=r"#### (\-?[0-9\.\,]+)",
    ignore=(",", r"\$", r"(?s).*#### ", r"\.$"),
    until=("Question:", "</s>", "<|im_end|>"),
)


def bigbench_mistake_task(marker: str) -> HeldOutTask:
    """The kit's BIG-Bench-Mistake task: thoughts, ``marker``, answer; scored against ``target``."""
    return HeldOutTask(
        name="kit_bigbench_mistake",
        prompt=lambda row: row["input"] + "\n",
        response=lambda row: trace_response(row["steps"], row["answer"], marker),
        target=lambda row: row["target"],
        answer_regex=re.escape(marker) + r" *(\-?[0-9\.\,]+)",
        ignore=(",", r"\.$"),
        until=("<|im_end|>",),
    )


@dataclass
class DecodedSample:
    """One held-out row decoded greedily.

    Attributes:
        text: the answer text lm-eval would score (cut before the first stop string).
        correct: exact_match of that text.
        tokens: content token ids the text covers (confidence tokens removed).
        pieces: each token's text.
        bins: ``[T]`` bin of the confidence token fed after each token (-1 where none).
        signal: ``[T]`` the model's own confidence signal behind each token's distribution (NaN
            where no confidence token was fed).
        entropies: ``[T]`` entropy (nats) of the distribution that produced each token.
        logprobs: ``[T]`` log p of each token under that distribution.
        prompt_ids: the prompt's token ids.
        content_ids: every generated content id (stop token included), beyond the text too.
        interleaved: the real tokens of the sequence the model saw (prompt included).
    """

    text: str
    correct: bool
    tokens: list[int]
    pieces: list[str]
    bins: torch.Tensor
    signal: torch.Tensor
    entropies: torch.Tensor
    logprobs: torch.Tensor
    prompt_ids: list[int]
    content_ids: list[int]
    interleaved: list[int] = field(repr=False)

    @property
    def sequence_confidence(self) -> float:
        """exp(mean content-token log-prob) over the text's tokens (the eval recipe's confidence)."""
        return float(self.logprobs.double().mean().exp())


OverrideFor = Callable[[int, int], Optional[ConfidenceOverride]]
"""``(first_row, rows) -> override`` of one decode batch (None: the real bins)."""


@torch.no_grad()
def decode_heldout(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    task: HeldOutTask,
    *,
    interleaving: Interleaving,
    codec: Optional[ConfidenceCodec],
    max_gen_toks: int,
    batch_size: int = 32,
    override_for: Optional[OverrideFor] = None,
    desc: str = "decode",
) -> list[DecodedSample]:
    """Decode every row's prompt greedily (batches of ``batch_size``, in order) and score it.

    Args:
        model: torchtune decoder in eval mode.
        tokenizer: its torchtune tokenizer.
        rows: held-out rows of ``task``.
        interleaving: the mode bound to the tokenizer (``Interleaving.for_tokenizer``).
        codec: the checkpoint's codec (None in mode none: the codec-free plain decode).
        override_for: the confidence override of each batch (an ablation), None for the real bins.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[DecodedSample] = []
    eos_text = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False)
    until = tuple(dict.fromkeys((*task.until, eos_text)))
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer.encode(task.prompt(row), add_bos=False, add_eos=False) for row in chunk]
        override = override_for(start, len(chunk)) if override_for is not None else None
        result = decode(
            model, left_pad(prompts, tokenizer.pad_id), interleaving=interleaving, max_generated_tokens=max_gen_toks,
            pad_id=tokenizer.pad_id, temperature=0.0, stop_tokens=list(interleaving.stop_ids), codec=codec,
            marker=interleaving.marker_ids, confidence_override=override,
        )
        for i, row in enumerate(chunk):
            out.append(_sample(result, i, row, prompts[i], tokenizer, task, until))
    return out


def _sample(result: Any, i: int, row: dict, prompt_ids: list[int], tokenizer: Any, task: HeldOutTask, until: tuple) -> DecodedSample:
    n = int(result.generated_lengths[i])
    content = result.content[i, :n].tolist()
    text = cut_at_stop(tokenizer.decode(content), list(until))
    covered = tokens_covering(len(text), content, tokenizer.decode)
    interleaved = result.interleaved[i][result.interleaved_valid[i]].tolist()
    return DecodedSample(
        text=text,
        correct=task.is_correct(text, row),
        tokens=content[:covered],
        pieces=[tokenizer.decode([t], skip_special_tokens=False) for t in content[:covered]],
        bins=result.bins[i, :covered].clone(),
        signal=result.signal[i, :covered].clone(),
        entropies=result.entropies[i, :covered].clone(),
        logprobs=result.token_logprobs[i, :covered].clone(),
        prompt_ids=prompt_ids,
        content_ids=content,
        interleaved=interleaved,
    )


def reference_bins(samples: Sequence[DecodedSample], first: int, rows: int) -> torch.Tensor:
    """``[rows, T]`` bins fed in a reference decode of ``samples[first : first + rows]`` (-1 padded):
    what :class:`~entropy_guided_generation.generation.ShuffledBins` permutes."""
    chunk = samples[first : first + rows]
    width = max(1, max(len(s.bins) for s in chunk))
    out = torch.full((len(chunk), width), -1, dtype=torch.long)
    for r, sample in enumerate(chunk):
        out[r, : len(sample.bins)] = sample.bins
    return out


def reference_batch(tokenizer: Any, rows: Sequence[dict], task: HeldOutTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training layout of ``rows``: prompt + reference response + EOS, right-padded.

    Returns:
        ``tokens``, ``response`` (True on the response and its EOS) and ``valid`` (True on real
        tokens), each ``[len(rows), n]``.
    """
    pairs = [
        (tokenizer.encode(task.prompt(row), add_bos=False, add_eos=False),
         tokenizer.encode(task.response(row), add_bos=False, add_eos=False) + [tokenizer.eos_id])
        for row in rows
    ]
    width = max(len(p) + len(r) for p, r in pairs)
    tokens = torch.full((len(pairs), width), tokenizer.pad_id, dtype=torch.long)
    response = torch.zeros_like(tokens, dtype=torch.bool)
    valid = torch.zeros_like(response)
    for r, (p, x) in enumerate(pairs):
        tokens[r, : len(p) + len(x)] = torch.tensor(p + x)
        response[r, len(p) : len(p) + len(x)] = True
        valid[r, : len(p) + len(x)] = True
    return tokens, response, valid


@torch.no_grad()
def heldout_content_loss(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    task: HeldOutTask,
    *,
    interleaving: Interleaving,
    codec: Optional[ConfidenceCodec],
    max_passes: Optional[int] = None,
    batch_size: int = 32,
) -> float:
    """Mean content-token NLL (nats) of the reference responses (+ EOS) given their prompts, under
    interleaved teacher forcing with fixed-point bins (the loss training minimizes, on held-out rows)."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="held-out loss", leave=False):
        tokens, response, valid = reference_batch(tokenizer, rows[start : start + batch_size], task)
        scores = score_continuations(
            model, tokens, response, interleaving=interleaving, codec=codec, valid_mask=valid,
            pad_id=tokenizer.pad_id, max_passes=max_passes,
        )
        total -= float(scores.logprob.sum())
        count += int(response.sum())
    return total / count


__all__ = [
    "GSM8K",
    "DecodedSample",
    "HeldOutTask",
    "bigbench_mistake_task",
    "decode_heldout",
    "heldout_content_loss",
    "reference_batch",
    "reference_bins",
]
