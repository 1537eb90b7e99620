"""Tokenizing one training example into ``tokens``, ``labels`` and the ``response_mask`` that the
interleaving layouts need.

``response_mask[i]`` is True where token i is response *content*: what a decoder generates after
the prompt (for chat data: the assistant message bodies, never the role header). ``labels`` follow
torchtune's convention: unshifted, ``labels[i]`` is the target id for token i or the ignore index.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

TokenizedSample = Dict[str, List[Any]]


def _encode(tokenizer: Any, text: str, *, add_bos: bool, add_eos: bool) -> List[int]:
    return list(tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos))


def _truncate(sample: TokenizedSample, max_seq_len: int | None, eos_id: int | None) -> TokenizedSample:
    """Cut every field to ``max_seq_len`` (torchtune's rule: the last kept token becomes EOS)."""
    if max_seq_len is None or len(sample["tokens"]) <= max_seq_len:
        return sample
    out = {key: list(values[:max_seq_len]) for key, values in sample.items()}
    if eos_id is not None:
        # The cut-off sequence did not really end here: EOS is fed but never a target.
        out["tokens"][-1] = eos_id
        out["labels"][-1] = CROSS_ENTROPY_IGNORE_IDX
    return out


def tokenize_prompt_response(
    prompt: str,
    response: str,
    tokenizer: Any,
    *,
    train_on_input: bool = False,
) -> TokenizedSample:
    """Plain-text example: ``[BOS] prompt response EOS``, prompt and response encoded separately.

    Encoding them separately is what decoding does (the prompt is encoded alone, the response is
    generated token by token), so training and decoding see the same ids.

    Returns:
        ``tokens``, ``labels`` (response tokens and EOS; the prompt too with ``train_on_input``,
        never BOS) and ``response_mask`` (response tokens and EOS).
    """
    prompt_ids = _encode(tokenizer, prompt, add_bos=True, add_eos=False)
    response_ids = _encode(tokenizer, response, add_bos=False, add_eos=True)
    if not response_ids:
        raise ValueError(f"the response {response!r} encodes to no tokens")
    bos = getattr(tokenizer, "bos_id", None)
    prompt_labels = [
        t if train_on_input and not (i == 0 and t == bos) else CROSS_ENTROPY_IGNORE_IDX
        for i, t in enumerate(prompt_ids)
    ]
    sample = {
        "tokens": prompt_ids + response_ids,
        "labels": prompt_labels + response_ids,
        "response_mask": [False] * len(prompt_ids) + [True] * len(response_ids),
    }
    return _truncate(sample, getattr(tokenizer, "max_seq_len", None), getattr(tokenizer, "eos_id", None))


def _find_subsequence(haystack: Sequence[int], needle: Sequence[int], start: int, allowed: Sequence[bool]) -> int:
    """First index >= start where ``needle`` (or, at the end of ``haystack``, its truncated head)
    occurs wholly on ``allowed`` positions; -1 if none."""
    n = len(haystack)
    for i in range(start, n):
        head = needle[: n - i]
        if head and list(haystack[i : i + len(head)]) == list(head) and all(allowed[i : i + len(head)]):
            return i
    return -1


def tokenize_messages_with_response(messages: Sequence[Message], tokenizer: Any) -> TokenizedSample:
    """Chat example through the tokenizer's own chat format (``tokenizer.tokenize_messages``).

    Labels come from the messages' ``masked`` flags exactly as in torchtune's ``SFTDataset``. The
    response mask marks the *body* of every assistant message: the tokenizer is run a second time
    with only assistant messages unmasked to find the assistant spans, and each body's ids are
    located inside its span (after the role header), so header and footer tokens count as prompt.

    Raises:
        ValueError: if an assistant body cannot be found in the tokenized conversation (a
            tokenizer whose template rewrites assistant text).
    """
    tokens, masked = tokenizer.tokenize_messages(list(messages))
    labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, masked)]
    by_role = [Message(m.role, m.content, masked=m.role != "assistant", ipython=m.ipython, eot=m.eot) for m in messages]
    tokens_again, not_assistant = tokenizer.tokenize_messages(by_role)
    if list(tokens_again) != list(tokens):
        raise ValueError("the tokenizer's ids depend on the messages' masked flags; cannot locate responses")
    assistant = [not m for m in not_assistant]
    response_mask = [False] * len(tokens)
    cursor = 0
    for message in messages:
        if message.role != "assistant":
            continue
        text = "".join(item["content"] for item in message.content if item["type"] == "text")
        # Some chat formats (Llama 3) strip the message text before encoding it.
        candidates = [ids for ids in (_encode(tokenizer, t, add_bos=False, add_eos=False) for t in (text, text.strip())) if ids]
        if not candidates:
            continue  # an empty assistant message has no content tokens
        start, found = -1, None
        for candidate in candidates:
            start = _find_subsequence(tokens, candidate, cursor, assistant)
            if start >= 0:
                found = candidate
                break
        if found is None:
            if cursor >= len(tokens):  # truncated away entirely
                break
            raise ValueError(f"assistant message {text[:60]!r} was not found in its tokenized conversation")
        end = min(start + len(found), len(tokens))
        response_mask[start:end] = [True] * (end - start)
        cursor = end
    return {"tokens": list(tokens), "labels": labels, "response_mask": response_mask}


__all__ = ["TokenizedSample", "tokenize_messages_with_response", "tokenize_prompt_response"]
