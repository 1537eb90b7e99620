"""Confidence tokens by name: the token presets (the kit's ``<|conf_k|>``, Llama 3 reserved tokens,
digits, SmolLM2's unused tokens) and resolving token strings to single ids through a tokenizer.
:mod:`~entropy_guided_generation.confidence` builds the codec over them.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


def kit_confidence_tokens(num_bins: int = 11) -> list[str]:
    """The kit tokenizer's confidence tokens ``<|conf_0|>`` .. ``<|conf_{K-1}|>``."""
    return [f"<|conf_{k}|>" for k in range(num_bins)]


# The public CaC code's confidence ids are Llama-3's last eleven reserved ids, 128245..128255. Their
# names differ between tokenizers, so the preset is the id range, resolved by trying each naming:
# the first reserved index at id 128245 in each (id = offset + index past the named specials).
LLAMA3_RESERVED_IDS = tuple(range(128245, 128256))
LLAMA3_RESERVED_NAMINGS = {
    "torchtune": 234,  # torchtune 0.6.1's llama3_tokenizer: reserved_k = 128011 + k, k = 2..244
    "huggingface_llama3_1": 237,  # HF tokenizer.json of Llama 3.1 / 3.2 / 3.3: reserved_k = 128008 + k
    "huggingface_llama3": 240,  # HF tokenizer.json of Meta-Llama-3 (3.0): reserved_k = 128005 + k
}


def llama3_reserved_names(naming: str) -> list[str]:
    """The names of ids 128245..128255 under one of :data:`LLAMA3_RESERVED_NAMINGS`."""
    first = LLAMA3_RESERVED_NAMINGS[naming]
    return [f"<|reserved_special_token_{first + k}|>" for k in range(len(LLAMA3_RESERVED_IDS))]


def llama3_reserved_confidence_tokens(tokenizer: Any) -> list[str]:
    """The names under which ``tokenizer`` holds Llama-3's reserved ids 128245..128255.

    Each naming of :data:`LLAMA3_RESERVED_NAMINGS` is tried; the one whose names resolve to exactly
    those ids wins (a name of another naming may exist at a different id, so ids decide, not names).

    Raises:
        ValueError: when no naming resolves to those ids, saying what each one resolved to.
    """
    tried = []
    for naming in LLAMA3_RESERVED_NAMINGS:
        names = llama3_reserved_names(naming)
        try:
            ids = [encode_single_token(name, tokenizer) for name in names]
        except ValueError as err:
            tried.append(f"{naming} ({names[0]}..{names[-1]}): {err}")
            continue
        if tuple(ids) == LLAMA3_RESERVED_IDS:
            return names
        tried.append(f"{naming} ({names[0]}..{names[-1]}): ids {ids[0]}..{ids[-1]}")
    raise ValueError(
        f"confidence.tokens.preset 'llama3_reserved' is Llama-3's reserved ids {LLAMA3_RESERVED_IDS[0]}..{LLAMA3_RESERVED_IDS[-1]}, "
        f"but this tokenizer holds them under none of the known namings: {'; '.join(tried)}. "
        "Give confidence.token_ids or a list of confidence.tokens instead"
    )


def digit_confidence_tokens() -> list[str]:
    """The digit strings "0".."9","10" used by the public CaC code's answer mode (ids 15..24, 605 in Llama-3)."""
    return [str(k) for k in range(11)]


def smollm2_unused_confidence_tokens() -> list[str]:
    """SmolLM2's unused special tokens ids 3..13 (``<repo_name>`` .. ``<jupyter_code>``: code-repository
    and notebook markers that chat and math text never use); their rows carry pretrained meanings."""
    return ["<repo_name>", "<reponame>", "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
            "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>"]  # fmt: skip


# preset name -> the token strings, given the tokenizer (llama3_reserved's names depend on it)
PRESET_TOKENS = {
    "kit": lambda tokenizer: kit_confidence_tokens(),
    "llama3_reserved": llama3_reserved_confidence_tokens,
    "digits": lambda tokenizer: digit_confidence_tokens(),
    "smollm2_unused": lambda tokenizer: smollm2_unused_confidence_tokens(),
}


def resolve_token_ids(strings: Sequence[str], tokenizer: Any, vocab_size: Optional[int] = None) -> list[int]:
    """Resolve token strings to single, distinct ids through ``tokenizer``.

    Special tokens are looked up in the tokenizer's special-token table (torchtune's
    ``special_tokens`` dict or a transformers tokenizer's added vocabulary); other strings are
    encoded without BOS/EOS and must encode to exactly one id.

    Raises:
        ValueError: naming the string and what it encodes to, an id outside ``vocab_size``, or
            two strings that share an id.
    """
    ids = [encode_single_token(s, tokenizer) for s in strings]
    if vocab_size is not None:
        for s, i in zip(strings, ids):
            if not 0 <= i < vocab_size:
                raise ValueError(f"confidence token {s!r} has id {i}, outside the model's vocabulary of {vocab_size} ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"confidence tokens {list(strings)} resolve to non-distinct ids {ids}")
    return ids


def encode_single_token(text: str, tokenizer: Any) -> int:
    """The one id of ``text`` under ``tokenizer`` (torchtune or transformers); error if not exactly one."""
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping) and text in special:
        return int(special[text])
    ids = encode_text(text, tokenizer)
    if len(ids) != 1:
        raise ValueError(f"token string {text!r} must encode to exactly one id, but it encodes to {ids}")
    return int(ids[0])


def encode_text(text: str, tokenizer: Any) -> list[int]:
    """Encode ``text`` without BOS/EOS with a torchtune or a transformers tokenizer."""
    try:
        return list(tokenizer.encode(text, add_bos=False, add_eos=False))
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=False))


__all__ = [
    "LLAMA3_RESERVED_IDS",
    "LLAMA3_RESERVED_NAMINGS",
    "PRESET_TOKENS",
    "digit_confidence_tokens",
    "encode_single_token",
    "encode_text",
    "kit_confidence_tokens",
    "llama3_reserved_confidence_tokens",
    "llama3_reserved_names",
    "resolve_token_ids",
    "smollm2_unused_confidence_tokens",
]
