"""Prompt sources for generation: explicit lists, or named datasets in a registry.

A dataset loader maps a split name to a list of :class:`PromptExample`. Built in:

- ``kit_gsm8k``: the kit's synthetic GSM8K-format word problems (train / test splits), prompted
  in the kit base model's format (``question + "\\n"``).

GSM8K-format JSONL files (``{"question", "answer"}`` rows, the answer ending in ``#### n``) are
registered under a name of the user's choice with :func:`register_gsm8k_jsonl`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from entropy_guided_generation.kit import data as kit_data

PathLike = Union[str, Path]
GSM8K_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
KIT_GSM8K_POOL_SIZE = 500


@dataclass(frozen=True)
class PromptExample:
    """One prompt and what a reward needs to judge its responses.

    Attributes:
        prompt: the text the model continues.
        answer: the reference solution (GSM8K: ending in ``#### n``), or None when unknown.
        meta: anything else the source knows (e.g. the raw question).
    """

    prompt: str
    answer: Optional[str] = None
    meta: Mapping[str, Any] = field(default_factory=dict)


DatasetLoader = Callable[[str], list[PromptExample]]
DATASET_REGISTRY: dict[str, DatasetLoader] = {}


def register_prompt_dataset(name: str, loader: DatasetLoader, *, overwrite: bool = False) -> None:
    """Make ``loader(split) -> list[PromptExample]`` available as ``dataset_name=name``.

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is False.
    """
    if name in DATASET_REGISTRY and not overwrite and DATASET_REGISTRY[name] is not loader:
        raise ValueError(f"a prompt dataset named {name!r} is already registered (pass overwrite=True to replace it)")
    DATASET_REGISTRY[name] = loader


def load_prompt_dataset(name: str, split: str) -> list[PromptExample]:
    """All examples of ``split`` of the registered dataset ``name``.

    Raises:
        ValueError: for an unknown name (listing the registered ones) or an empty split.
    """
    if name not in DATASET_REGISTRY:
        raise ValueError(f"unknown prompt dataset {name!r}; registered: {', '.join(sorted(DATASET_REGISTRY))}")
    examples = DATASET_REGISTRY[name](split)
    if not examples:
        raise ValueError(f"prompt dataset {name!r} has no examples in split {split!r}")
    return examples


def sample_prompts(dataset_name: str, split: str, num_prompts: int, seed: Optional[int] = None) -> list[PromptExample]:
    """``num_prompts`` distinct examples drawn uniformly without replacement (``random.Random(seed)``).

    Raises:
        ValueError: if the split holds fewer than ``num_prompts`` examples.
    """
    pool = load_prompt_dataset(dataset_name, split)
    if not isinstance(num_prompts, int) or not 1 <= num_prompts <= len(pool):
        raise ValueError(f"num_prompts must be an int in [1, {len(pool)}] for {dataset_name}/{split}, got {num_prompts!r}")
    return random.Random(seed).sample(pool, num_prompts)


def sample_with_replacement(pool: Sequence[PromptExample], count: int, seed: Optional[int] = None) -> list[PromptExample]:
    """``count`` examples drawn uniformly with replacement from ``pool`` (``random.Random(seed)``)."""
    if not pool:
        raise ValueError("cannot sample from an empty prompt pool")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    return random.Random(seed).choices(list(pool), k=count)


def gsm8k_examples_from_rows(rows: Sequence[Mapping[str, Any]], prompt_template: str = GSM8K_PROMPT_TEMPLATE) -> list[PromptExample]:
    """GSM8K rows ``{"question", "answer"}`` as prompts: ``prompt_template`` with its ``{question}``
    placeholder replaced by the row's question (other braces are kept as they are).

    Raises:
        ValueError: naming the first row without a ``question`` or ``answer``.
    """
    if "{question}" not in prompt_template:
        raise ValueError(f"prompt_template must contain a {{question}} placeholder, got {prompt_template!r}")
    examples = []
    for index, row in enumerate(rows):
        missing = [key for key in ("question", "answer") if key not in row]
        if missing:
            raise ValueError(f"GSM8K row {index} lacks {', '.join(missing)}; it has {sorted(row)}")
        prompt = prompt_template.replace("{question}", row["question"])
        examples.append(PromptExample(prompt=prompt, answer=row["answer"], meta={"question": row["question"]}))
    return examples


def read_gsm8k_jsonl(path: PathLike, prompt_template: str = GSM8K_PROMPT_TEMPLATE) -> list[PromptExample]:
    """The examples of a GSM8K-format JSONL file (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return gsm8k_examples_from_rows([json.loads(line) for line in lines if line.strip()], prompt_template)


def register_gsm8k_jsonl(
    name: str,
    files: Mapping[str, PathLike],
    *,
    prompt_template: str = GSM8K_PROMPT_TEMPLATE,
    overwrite: bool = False,
) -> None:
    """Register GSM8K-format JSONL files as the dataset ``name``.

    Args:
        name: the ``dataset_name`` to use.
        files: ``{split: path}``, e.g. ``{"train": ".../train.jsonl", "test": ".../test.jsonl"}``.
        prompt_template: formats each ``question`` (default: lm-eval's gsm8k ``Question: ...\\nAnswer:``).
    """
    files = {split: Path(path) for split, path in files.items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"GSM8K JSONL file(s) not found: {', '.join(missing)}")

    def load(split: str) -> list[PromptExample]:
        if split not in files:
            raise ValueError(f"prompt dataset {name!r} has no split {split!r}; it has {', '.join(files)}")
        return read_gsm8k_jsonl(files[split], prompt_template)

    register_prompt_dataset(name, load, overwrite=overwrite)


def kit_gsm8k(split: str) -> list[PromptExample]:
    """The kit's GSM8K-format problems of ``split`` (a fixed pool of 500), in the kit model's prompt format."""
    rows = kit_data.gsm8k_examples(KIT_GSM8K_POOL_SIZE, seed=0, split=split)
    return gsm8k_examples_from_rows(rows, prompt_template=kit_data.prompt_of("{question}"))


register_prompt_dataset("kit_gsm8k", kit_gsm8k)

__all__ = [
    "DATASET_REGISTRY",
    "GSM8K_PROMPT_TEMPLATE",
    "PromptExample",
    "gsm8k_examples_from_rows",
    "kit_gsm8k",
    "load_prompt_dataset",
    "read_gsm8k_jsonl",
    "register_gsm8k_jsonl",
    "register_prompt_dataset",
    "sample_prompts",
    "sample_with_replacement",
]
