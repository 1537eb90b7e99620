"""BIG-Bench Mistake reasoning traces as SFT examples for mode ``marker``.

Each task file (``<task>.jsonl``, rows ``input``, ``steps`` [list of str], ``answer`` (the trace's
own conclusion), ``target`` (the correct answer), ``mistake_index`` (first wrong step or null))
becomes: prompt = the input; response = one ``Thought N: <step>`` line per step, then the marker,
then the answer. Reasoning (up to and including the marker) is interleaved, the answer is plain.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from torchtune.data import Message

from entropy_guided_generation.data.sft import ResponseMaskedDataset, reject_packing, load_rows
from entropy_guided_generation.data.tokenize import (
    TokenizedSample,
    tokenize_messages_with_response,
    tokenize_prompt_response,
)

BIGBENCH_MISTAKE_TASKS = (
    "dyck_languages",
    "logical_deduction",
    "multistep_arithmetic",
    "tracking_shuffled_objects",
    "word_sorting",
)
ANSWER_FIELDS = ("answer", "target")
DEFAULT_MARKER = "So the answer is:"


def trace_response(steps: Sequence[str], answer: str, marker: str) -> str:
    """``Thought 1: ...\\nThought 2: ...\\n<marker> <answer>``.

    Raises:
        ValueError: on a trace without steps.
    """
    if not steps:
        raise ValueError("a BIG-Bench Mistake row needs at least one step")
    thoughts = "\n".join(f"Thought {i}: {step.strip()}" for i, step in enumerate(steps, start=1))
    return f"{thoughts}\n{marker} {answer.strip()}"


def bigbench_mistake_files(data_dir: str | Path, tasks: Optional[Sequence[str]] = None) -> list[str]:
    """The task files ``<data_dir>/<task>.jsonl`` (all five tasks by default).

    Raises:
        ValueError: on an unknown task name. FileNotFoundError: on a missing file.
    """
    tasks = list(tasks) if tasks is not None else list(BIGBENCH_MISTAKE_TASKS)
    unknown = [t for t in tasks if t not in BIGBENCH_MISTAKE_TASKS]
    if unknown:
        raise ValueError(f"unknown BIG-Bench Mistake tasks {unknown}; expected some of {', '.join(BIGBENCH_MISTAKE_TASKS)}")
    files = [Path(data_dir) / f"{task}.jsonl" for task in tasks]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"BIG-Bench Mistake task files not found: {missing}")
    return [str(f) for f in files]


def bigbench_mistake_dataset(
    tokenizer: Any,
    *,
    data_dir: str,
    tasks: Optional[Sequence[str]] = None,
    split: str = "train",
    answer_field: str = "answer",
    marker: str = DEFAULT_MARKER,
    prompt_template: str = "{input}\n",
    chat: bool = False,
    train_on_input: bool = False,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
) -> ResponseMaskedDataset:
    """BIG-Bench Mistake traces from the task files in ``data_dir``.

    Args:
        tokenizer: a torchtune tokenizer.
        data_dir: folder holding ``<task>.jsonl`` files (the layout of ``shared/data/bigbench_mistake``).
        tasks: which task files to read (default: all five).
        split: a ``datasets`` split over the concatenated rows, e.g. ``train[:90%]``.
        answer_field: ``answer`` (the trace's own conclusion, consistent with its steps) or
            ``target`` (the correct answer).
        marker: the string between the thoughts and the answer (use ``interleaving.marker``).
        prompt_template: formats a row's ``input`` into the prompt.
        chat: render as a user/assistant conversation through the tokenizer's chat format.
    """
    reject_packing(packed)
    if answer_field not in ANSWER_FIELDS:
        raise ValueError(f"unknown answer_field {answer_field!r}; expected one of {', '.join(ANSWER_FIELDS)}")
    rows = load_rows("json", split=split, filter_fn=filter_fn, data_files=bigbench_mistake_files(data_dir, tasks))

    def to_sample(row: Mapping[str, Any]) -> TokenizedSample:
        prompt = prompt_template.format(input=row["input"])
        response = trace_response(row["steps"], row[answer_field], marker)
        if not chat:
            return tokenize_prompt_response(prompt, response, tokenizer, train_on_input=train_on_input)
        messages = [
            Message(role="user", content=prompt.strip(), masked=not train_on_input),
            Message(role="assistant", content=response, masked=False),
        ]
        return tokenize_messages_with_response(messages, tokenizer)

    return ResponseMaskedDataset(rows, to_sample)


__all__ = [
    "ANSWER_FIELDS",
    "BIGBENCH_MISTAKE_TASKS",
    "DEFAULT_MARKER",
    "bigbench_mistake_dataset",
    "bigbench_mistake_files",
    "trace_response",
]
