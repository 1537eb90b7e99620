"""Any Hugging Face tokenizer folder as a torchtune model tokenizer: ids from the folder's
``tokenizer.json``, chats rendered by the model's own chat template, and the ids torchtune's
interface names (``bos_id``, ``eos_id``, ``pad_id``, ``stop_tokens``) chosen once, by rules stated here.

``hf_model_tokenizer(path, max_seq_len=..., pad_token=...)`` is the ``_component_`` YAML configs name;
datasets, decoders and the eval adapter use the :class:`HFModelTokenizer` it returns like torchtune's
own tokenizers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jinja2
from tokenizers import AddedToken
from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

# Tried in order when the tokenizer's own pad token is unusable (see ``choose_pad_id``).
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>")
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Probe conversations whose renderings show which ids a chat template writes around messages.
_PROBE_REPLY = "Zq"
_PROBES = (
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": _PROBE_REPLY}, {"role": "user", "content": "Why"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}, {"role": "user", "content": "Why"}],
)  # fmt: skip


# Errors a chat template raises on a conversation it does not support (``raise_exception``, a role it
# rejects, a missing field).
_TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError)


def _existing_id(hf: Any, token: str) -> Optional[int]:
    """The id of ``token`` when the vocabulary holds it as one token (None otherwise)."""
    token_id = hf.convert_tokens_to_ids(token)
    if token_id is None or hf.convert_ids_to_tokens(int(token_id)) != token:
        return None
    return int(token_id)


def _prepended_bos_id(hf: Any) -> Optional[int]:
    """The BOS id when the tokenizer's own convention starts a text with it (``tok("a")`` does), else None."""
    bos = hf.bos_token_id
    ids = hf("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and ids and ids[0] == bos else None


def _render(hf: Any, turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return hf.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)


def _chat_prompt_ids(hf: Any) -> set[int]:
    """Every id in the probe conversations rendered by the chat template with the generation prompt
    (empty without a template): the header, separator and end-of-turn ids a chat prompt can hold."""
    if not getattr(hf, "chat_template", None):
        return set()
    ids: set[int] = set()
    for turns in _PROBES:
        try:
            ids.update(hf.encode(_render(hf, turns, True), add_special_tokens=False))
        except _TEMPLATE_ERRORS:
            continue  # e.g. a template that rejects system messages
    return ids


def _end_of_turn_id(hf: Any) -> Optional[int]:
    """The id the chat template writes right after an assistant message's text (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``) when that is one special token; None otherwise."""
    if not getattr(hf, "chat_template", None):
        return None
    for turns in _PROBES:
        try:
            rendered = _render(hf, turns[:-1], False)  # ends with the assistant's reply
        except _TEMPLATE_ERRORS:
            continue
        if _PROBE_REPLY not in rendered:
            continue
        after = hf.encode(rendered.rsplit(_PROBE_REPLY, 1)[1], add_special_tokens=False)
        added = hf.added_tokens_decoder.get(after[0]) if after else None
        return int(after[0]) if added is not None and added.special else None
    return None


def _generation_eos_ids(folder: Path) -> List[int]:
    """``eos_token_id`` of the folder's ``generation_config.json`` (an int or a list), [] without one."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return []
    value = json.loads(path.read_text()).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if v is not None]


def choose_pad_id(
    hf: Any, pad_token: Optional[str], stop_ids: Sequence[int], prompt_ids: set[int]
) -> int:
    """The padding id. Decoders find a left-padded prompt's real tokens as ``prompt != pad_id``, so the
    pad id must never occur in a prompt: never an id of ``prompt_ids`` (BOS and what the chat template
    writes: ``<|im_start|>``, ``<|im_end|>``, ...).

    Rule: ``pad_token`` when given (one existing token, not in ``prompt_ids``). Otherwise, from the
    tokenizer's own pad token followed by :data:`PAD_CANDIDATES`, the existing ones not in
    ``prompt_ids``: the first that is not a stop token, else the first one (a stop token that no prompt
    holds, such as SmolLM2's ``<|endoftext|>``; a row that stopped is padded with it too).

    Raises:
        ValueError: naming ``pad_token`` when it is not one existing token or occurs in chat prompts,
            or when no candidate fits (pass ``pad_token=``).
    """
    if pad_token is not None:
        token_id = _existing_id(hf, pad_token)
        if token_id is None:
            raise ValueError(f"pad_token {pad_token!r} is not a token of this vocabulary; pass one existing token")
        if token_id in prompt_ids:
            raise ValueError(
                f"pad_token {pad_token!r} (id {token_id}) occurs in chat prompts (BOS or the chat template writes it), "
                "so left-padded prompts would lose it; pass a token no prompt holds"
            )
        return token_id
    names = ([hf.pad_token] if hf.pad_token else []) + list(PAD_CANDIDATES)
    usable = [i for i in (_existing_id(hf, n) for n in names) if i is not None and i not in prompt_ids]
    if not usable:
        raise ValueError(
            f"no pad token fits: the tokenizer's pad token {hf.pad_token!r} and {', '.join(PAD_CANDIDATES)} are "
            "absent or occur in chat prompts; pass pad_token=<a token no prompt holds>"
        )
    not_stops = [i for i in usable if i not in set(stop_ids)]
    return (not_stops or usable)[0]


def _text_of(message: Message, index: int) -> str:
    parts = []
    for item in message.content:
        if item["type"] != "text":
            raise ValueError(f"message {index} holds {item['type']!r} content; HFModelTokenizer renders text only")
        parts.append(item["content"])
    return "".join(parts)


class HFModelTokenizer(ModelTokenizer, Transform):
    """A Hugging Face tokenizer behind torchtune's ``ModelTokenizer`` + ``Transform`` interface.

    Ids: ``encode`` never lets a post-processor or chat template add anything but the BOS and EOS it is
    asked for. Chats go through the model's own chat template (``tokenize_messages``), so training
    sees exactly the prompts a served model sees.

    Attributes:
        hf: the wrapped ``transformers`` tokenizer (its ``pad_token`` set to ``pad_id``'s token).
        max_seq_len: ``tokenize_messages`` truncates to it (None: never).
        bos_id: the one BOS ``encode(add_bos=True)`` prepends; None when the tokenizer's convention adds
            none (SmolLM2, Qwen).
        eos_id: the tokenizer's EOS, which ``encode(add_eos=True)`` appends.
        end_of_turn_id: the single special token the chat template ends an assistant turn with (None if
            it ends with text or several tokens).
        stop_tokens: sorted ids that end a response: EOS, ``generation_config.json``'s ``eos_token_id``
            and the end-of-turn id.
        pad_id: padding, an id no prompt holds (rule: :func:`choose_pad_id`).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        max_seq_len: Optional[int] = None,
        pad_token: Optional[str] = None,
        generation_eos_ids: Sequence[int] = (),
        source: Optional[Path] = None,
    ) -> None:
        """Args:
            hf_tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``).
            max_seq_len: truncation length of ``tokenize_messages`` (None: no truncation).
            pad_token: the padding token's string (default: chosen by :func:`choose_pad_id`).
            generation_eos_ids: more ids that end a response (a ``generation_config.json``'s ``eos_token_id``).
            source: the folder it was loaded from (``save_pretrained`` copies its ``generation_config.json``).

        Raises:
            ValueError: for a ``max_seq_len`` that is not a positive int, a tokenizer without an EOS
                token, or no usable pad token (see :func:`choose_pad_id`).
        """
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer from {source} has no eos_token; set eos_token in its tokenizer_config.json")
        self.hf = hf_tokenizer
        self.max_seq_len = max_seq_len
        self.source = source
        self.bos_id = _prepended_bos_id(hf_tokenizer)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.end_of_turn_id = _end_of_turn_id(hf_tokenizer)
        stops = {self.eos_id, *(int(i) for i in generation_eos_ids)}
        self.stop_tokens = sorted(stops | ({self.end_of_turn_id} if self.end_of_turn_id is not None else set()))
        prompt_ids = _chat_prompt_ids(hf_tokenizer) | ({self.bos_id} if self.bos_id is not None else set())
        self.pad_id = choose_pad_id(hf_tokenizer, pad_token, self.stop_tokens, prompt_ids)
        # Saved with the files, so transformers (and a reload) pad with the same id.
        self.hf.pad_token = self.hf.convert_ids_to_tokens(self.pad_id)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids: the base vocabulary plus every added token (``len`` of the HF tokenizer)."""
        return len(self.hf)

    @property
    def special_tokens(self) -> Dict[str, int]:
        """String -> id of every added token and every special token (BOS, EOS, pad, unk, ...)."""
        tokens = {str(t): int(i) for t, i in zip(self.hf.all_special_tokens, self.hf.all_special_ids)}
        tokens.update({str(t): int(i) for t, i in self.hf.get_added_vocab().items()})
        return tokens

    def add_special_tokens(self, tokens: Sequence[str]) -> List[int]:
        """Make each string one special token and return the ids, in order. A string that already
        encodes to one id keeps it (the text it stands for still encodes as before); the others are
        appended as special added tokens, so :attr:`vocab_size` grows by their number.

        Raises:
            ValueError: for an empty or non-string entry.
        """
        bad = [t for t in tokens if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f"special tokens must be non-empty strings, got {bad!r}")
        new = [t for t in dict.fromkeys(tokens) if len(self.hf.encode(t, add_special_tokens=False)) != 1]
        if new:
            self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        ids = []
        for token in tokens:
            encoded = self.hf.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"special token {token!r} still encodes to {encoded} after adding it")
            ids.append(int(encoded[0]))
        return ids

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the tokenizer files (``tokenizer.json`` with the added tokens, ``tokenizer_config.json``
        with the pad token, the chat template) into ``folder``, and the source folder's
        ``generation_config.json`` when ``folder`` has none (it adds stop tokens). ``hf_model_tokenizer``
        and ``transformers.AutoTokenizer`` then load the same vocabulary, ids and pad.

        Returns:
            ``folder``.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        source_config = self.source / GENERATION_CONFIG if self.source is not None else None
        if source_config is not None and source_config.is_file() and not (folder / GENERATION_CONFIG).exists():
            shutil.copyfile(source_config, folder / GENERATION_CONFIG)
        return folder

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Ids of ``text`` (no special tokens), ``bos_id`` first when ``add_bos`` and the tokenizer has
        one, ``eos_id`` last when ``add_eos``."""
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` (a list or a 1-d tensor); special tokens dropped when ``skip_special_tokens``."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chats
    def _chat_ids(self, turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> List[int]:
        return list(self.hf.encode(_render(self.hf, turns, generation_prompt), add_special_tokens=False))

    def tokenize_messages(self, messages: Sequence[Message], *, add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        """Tokens of the conversation as the model's chat template renders it, and the mask
        (True = not trained on).

        Each message owns the tokens that rendering the conversation up to it adds to the rendering up
        to the previous one, masked as ``message.masked`` says; what the template writes before the
        first message (SmolLM2's and Qwen's default system prompt) belongs to the first message, the
        system or user prompt. An assistant message's header (the template's generation prompt, which
        a decoder is given) and whatever follows its end-of-turn token (a newline) are always masked,
        so its unmasked tokens are exactly what decoding generates: text, then end of turn.

        Args:
            messages: torchtune messages with text content.
            add_end_tokens: False for an inference prompt: the conversation then ends with the
                generation prompt (after a last user message), or with a last assistant message's text
                without its end of turn (a prefill).

        Returns:
            ``(tokens, mask)``, equal lengths; longer than ``max_seq_len`` they are cut to it, the last
            token becoming ``eos_id`` (masked) when ``add_end_tokens``, as torchtune's tokenizers do.

        Raises:
            ValueError: without messages, without a chat template, for non-text content, or when the
                template is not prefix-stable (rendering a later message changes earlier tokens).
        """
        if not messages:
            raise ValueError("tokenize_messages needs at least one message, got none")
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(
                f"the tokenizer from {self.source} has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); use plain-text data (e.g. gsm8k_dataset chat=False)"
            )
        turns = [{"role": m.role, "content": _text_of(m, i)} for i, m in enumerate(messages)]
        tokens: List[int] = []
        mask: List[bool] = []
        last = len(messages) - 1
        for i, message in enumerate(messages):
            is_assistant = message.role == "assistant"
            if is_assistant and i > 0:
                self._extend(tokens, mask, self._chat_ids(turns[:i], True), True, i, turns)
            start = len(tokens)
            if i == last and not add_end_tokens:
                if is_assistant:
                    if i == 0:
                        raise ValueError("an inference prompt ending in an assistant message needs a message before it")
                    prefill = _render(self.hf, turns[:i], True) + turns[i]["content"]
                    self._extend(tokens, mask, list(self.hf.encode(prefill, add_special_tokens=False)), message.masked, i, turns)
                else:
                    self._extend(tokens, mask, self._chat_ids(turns, False), message.masked, i, turns)
                    self._extend(tokens, mask, self._chat_ids(turns, True), True, i, turns)
            else:
                self._extend(tokens, mask, self._chat_ids(turns[: i + 1], False), message.masked, i, turns)
                if is_assistant and not message.masked:
                    self._mask_after_end_of_turn(tokens, mask, start)
            if self.max_seq_len is not None and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
            if add_end_tokens:
                tokens[-1], mask[-1] = self.eos_id, True
        return tokens, mask

    @staticmethod
    def _extend(
        tokens: List[int], mask: List[bool], ids: List[int], masked: bool, index: int, turns: Sequence[Mapping[str, str]]
    ) -> None:
        """Append the ids a longer rendering adds beyond ``tokens`` (which must be its prefix)."""
        if ids[: len(tokens)] != tokens:
            differ = next((k for k, (a, b) in enumerate(zip(ids, tokens)) if a != b), min(len(ids), len(tokens)))
            raise ValueError(
                f"the chat template is not prefix-stable: rendering up to message {index} ({turns[index]['role']}) "
                f"changes the tokens of the conversation before it (first difference at token {differ}); "
                "HFModelTokenizer needs a template that renders each message after the earlier ones unchanged"
            )
        added = ids[len(tokens) :]
        tokens.extend(added)
        mask.extend([masked] * len(added))

    def _mask_after_end_of_turn(self, tokens: List[int], mask: List[bool], start: int) -> None:
        """Mask what an assistant message's span holds after its last end-of-turn token (the template's
        separator, never generated: decoding stops at the end of turn)."""
        if self.end_of_turn_id is None:
            return
        span = tokens[start:]
        if self.end_of_turn_id in span:
            end = start + len(span) - span[::-1].index(self.end_of_turn_id)
            mask[end:] = [True] * (len(tokens) - end)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """torchtune's ``Transform``: pop ``messages`` (a list of ``Message``), add ``tokens`` and
        ``mask`` (``tokenize_messages``; an inference prompt without end tokens when ``inference``)."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def hf_model_tokenizer(
    path: str | Path, max_seq_len: Optional[int] = None, pad_token: Optional[str] = None
) -> HFModelTokenizer:
    """The tokenizer of a Hugging Face folder as an :class:`HFModelTokenizer` (the YAML ``_component_``).

    Args:
        path: a local folder with ``tokenizer.json`` and/or ``tokenizer_config.json`` (the chat template
            from ``tokenizer_config.json`` or ``chat_template.jinja``); a ``generation_config.json``
            beside them adds its ``eos_token_id`` to the stop tokens. A model checkpoint folder works.
        max_seq_len: truncation length of ``tokenize_messages`` and the datasets (None: no truncation).
        pad_token: the padding token's string (default: the rule of :func:`choose_pad_id`).

    Raises:
        FileNotFoundError: naming ``path`` when it is not a folder or holds no tokenizer files.
        ValueError: see :class:`HFModelTokenizer`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} is not a folder; expected a Hugging Face tokenizer folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer files; expected {' and/or '.join(TOKENIZER_FILES)} (a Hugging Face tokenizer folder)"
        )
    # transformers takes seconds to import; the flavour functions of this package must not pay for it.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return HFModelTokenizer(
        hf, max_seq_len=max_seq_len, pad_token=pad_token, generation_eos_ids=_generation_eos_ids(folder), source=folder
    )


__all__ = ["PAD_CANDIDATES", "HFModelTokenizer", "choose_pad_id", "hf_model_tokenizer"]
