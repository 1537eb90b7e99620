"""Map-style SFT datasets that keep the response mask: each row becomes ``tokens``, ``labels`` and
``response_mask`` (see :mod:`entropy_guided_generation.data.tokenize`).

``instruct_dataset`` and ``chat_dataset`` take torchtune's arguments of the same names, so a config
switches ``_component_: torchtune.datasets.instruct_dataset`` to
``entropy_guided_generation.data.instruct_dataset`` and nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from datasets import load_dataset
from torch.utils.data import Dataset
from torchtune.data import InputOutputToMessages, OpenAIToMessages, ShareGPTToMessages

from entropy_guided_generation.data.tokenize import TokenizedSample, tokenize_messages_with_response

CONVERSATION_STYLES = ("sharegpt", "openai")


class ResponseMaskedDataset(Dataset):
    """Rows of a Hugging Face dataset (or any indexable of mappings), tokenized on access.

    Args:
        rows: the raw rows.
        to_sample: row -> :data:`TokenizedSample` (``tokens``, ``labels``, ``response_mask``).
    """

    def __init__(self, rows: Any, to_sample: Callable[[Mapping[str, Any]], TokenizedSample]):
        self._rows = rows
        self._to_sample = to_sample

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> TokenizedSample:
        return self._to_sample(self._rows[index])


def local_data_files(data_files: Any) -> List[str]:
    """The paths ``data_files`` names (a path, a list of them, or a split -> path(s) mapping)."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, Path)):
        return [str(data_files)]
    if isinstance(data_files, Mapping):
        return [path for value in data_files.values() for path in local_data_files(value)]
    return [str(path) for path in data_files]


def _is_blank(path: Path, probe: int = 1 << 16) -> bool:
    """True for an existing file holding nothing but whitespace (only small files are read whole)."""
    if not path.is_file() or path.stat().st_size > probe:
        return False
    return not path.read_bytes().strip()


def load_rows(source: str, *, split: str, filter_fn: Optional[Callable] = None, **load_dataset_kwargs: Any) -> Any:
    """``datasets.load_dataset(source, split=split, **kwargs)``, optionally filtered (local JSON:
    ``source="json", data_files=...``).

    Raises:
        ValueError: naming the file(s) when a local data file is empty, or when no row is left
            (after ``split`` and ``filter_fn``); ``datasets`` itself would raise a bare StopIteration.
    """
    files = local_data_files(load_dataset_kwargs.get("data_files"))
    blank = [path for path in files if _is_blank(Path(path))]
    if blank:
        named = f"data file {blank[0]} is" if len(blank) == 1 else f"data files {', '.join(blank)} are"
        raise ValueError(f"{named} empty: a {source!r} dataset needs at least one row")
    try:
        rows = load_dataset(source, split=split, **load_dataset_kwargs)
    except StopIteration as err:  # datasets' JSON reader on a file without rows
        raise ValueError(f"dataset {source!r} (data_files {files or None}) yielded no rows: is a data file empty?") from err
    if filter_fn is not None:
        rows = rows.filter(filter_fn)
    if len(rows) == 0:
        raise ValueError(
            f"dataset {source!r} (data_files {files or None}, split {split!r}) has no rows"
            + (" after filter_fn" if filter_fn is not None else "")
        )
    return rows


def reject_packing(packed: bool) -> None:
    """Raise when a dataset is asked to pack examples (confidence tokens are inserted per example)."""
    if packed:
        raise ValueError(
            "packed=True is not supported: interleaving inserts confidence tokens per example, "
            "so examples cannot share a row; set packed: False"
        )


def messages_dataset(
    tokenizer: Any, rows: Any, message_transform: Callable[[Mapping[str, Any]], Dict[str, Any]]
) -> ResponseMaskedDataset:
    """Rows -> messages (a torchtune message transform) -> tokens through the tokenizer's chat format."""

    def to_sample(row: Mapping[str, Any]) -> TokenizedSample:
        return tokenize_messages_with_response(message_transform(row)["messages"], tokenizer)

    return ResponseMaskedDataset(rows, to_sample)


def instruct_dataset(
    tokenizer: Any,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> ResponseMaskedDataset:
    """torchtune's ``instruct_dataset`` (``input``/``output`` columns, renamed by ``column_map``)
    with a response mask on the output's tokens."""
    reject_packing(packed)
    rows = load_rows(source, split=split, filter_fn=filter_fn, **load_dataset_kwargs)
    transform = InputOutputToMessages(
        train_on_input=train_on_input, column_map=column_map, new_system_prompt=new_system_prompt
    )
    return messages_dataset(tokenizer, rows, transform)


def chat_dataset(
    tokenizer: Any,
    *,
    source: str,
    conversation_column: str,
    conversation_style: str,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    packed: bool = False,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> ResponseMaskedDataset:
    """torchtune's ``chat_dataset`` (``sharegpt`` or ``openai`` conversations) with a response mask
    on every assistant message's body."""
    reject_packing(packed)
    if conversation_style not in CONVERSATION_STYLES:
        raise ValueError(
            f"unknown conversation_style {conversation_style!r}; expected one of {', '.join(CONVERSATION_STYLES)}"
        )
    rows = load_rows(source, split=split, filter_fn=filter_fn, **load_dataset_kwargs)
    style = ShareGPTToMessages if conversation_style == "sharegpt" else OpenAIToMessages
    column = "conversations" if conversation_style == "sharegpt" else "messages"
    transform = style(
        train_on_input=train_on_input, column_map={column: conversation_column}, new_system_prompt=new_system_prompt
    )
    return messages_dataset(tokenizer, rows, transform)


__all__ = [
    "CONVERSATION_STYLES",
    "ResponseMaskedDataset",
    "chat_dataset",
    "instruct_dataset",
    "load_rows",
    "local_data_files",
    "messages_dataset",
]
