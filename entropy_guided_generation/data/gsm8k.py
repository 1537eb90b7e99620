"""GSM8K (``question`` / ``answer`` rows, the answer ending in ``#### <number>``) as SFT examples.

The response is the worked solution; its final ``####`` line is the marker that mode ``marker``
splits reasoning from answer on. The default prompt is lm-eval's ``gsm8k`` task format
(``Question: ...\\nAnswer:`` and the target after a space), so a finetuned model is evaluated on
the layout it was trained on.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from torchtune.data import Message

from entropy_guided_generation.data.sft import ResponseMaskedDataset, reject_packing, load_rows
from entropy_guided_generation.data.tokenize import (
    TokenizedSample,
    tokenize_messages_with_response,
    tokenize_prompt_response,
)

GSM8K_MARKER = "####"


def gsm8k_response(answer: str, marker: str = GSM8K_MARKER) -> str:
    """The solution text with its ``####`` line introduced by ``marker`` instead.

    Raises:
        ValueError: if the answer has no ``####`` line (not a GSM8K solution).
    """
    head, sep, final = answer.rpartition(GSM8K_MARKER)
    if not sep:
        raise ValueError(f"GSM8K answer has no {GSM8K_MARKER!r} line: {answer[-80:]!r}")
    return f"{head}{marker}{final}"


def gsm8k_dataset(
    tokenizer: Any,
    *,
    source: str = "json",
    data_files: Any = None,
    split: str = "train",
    prompt_template: str = "Question: {question}\nAnswer:",
    response_template: str = " {answer}",
    marker: str = GSM8K_MARKER,
    chat: bool = False,
    train_on_input: bool = False,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
    **load_dataset_kwargs: Any,
) -> ResponseMaskedDataset:
    """GSM8K rows as (prompt, response) examples.

    Args:
        tokenizer: a torchtune tokenizer.
        source, data_files, split: passed to ``datasets.load_dataset`` (local JSONL: ``source="json"``).
        prompt_template: formats a row's ``question`` into the prompt.
        response_template: formats the (marker-substituted) ``answer`` into the response.
        marker: the string that replaces ``####`` (use the config's ``interleaving.marker``).
        chat: render as a user/assistant conversation through the tokenizer's chat format instead
            of plain text.
        train_on_input: also train on the prompt tokens.
    """
    reject_packing(packed)
    kwargs = dict(load_dataset_kwargs)
    if data_files is not None:
        kwargs["data_files"] = data_files
    rows = load_rows(source, split=split, filter_fn=filter_fn, **kwargs)

    def to_sample(row: Mapping[str, Any]) -> TokenizedSample:
        prompt = prompt_template.format(question=row["question"])
        response = response_template.format(answer=gsm8k_response(row["answer"], marker))
        if not chat:
            return tokenize_prompt_response(prompt, response, tokenizer, train_on_input=train_on_input)
        messages = [
            Message(role="user", content=prompt, masked=not train_on_input),
            Message(role="assistant", content=response.strip(), masked=False),
        ]
        return tokenize_messages_with_response(messages, tokenizer)

    return ResponseMaskedDataset(rows, to_sample)


__all__ = ["GSM8K_MARKER", "gsm8k_dataset", "gsm8k_response"]
