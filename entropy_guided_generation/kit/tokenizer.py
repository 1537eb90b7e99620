"""The kit tokenizer: a byte-level BPE trained with ``tokenizers`` on the kit corpus, saved in the
files torchtune's Qwen2.5 tokenizer loads (``vocab.json`` + ``merges.txt`` + ``tokenizer.json`` as
the special-tokens file) and that ``transformers.AutoTokenizer`` loads (``tokenizer.json`` +
``tokenizer_config.json``, with Qwen2.5's chat template and ``<|mask|>`` as ``mask_token``). Both
give the same ids, for plain text and for chats (the template renders torchtune's Qwen2.5 chat format).

Id layout: the BPE vocabulary (all 256 byte tokens first, so every text encodes), then
torchtune's ``QWEN2_5_SPECIAL_TOKENS`` in their canonical order, then ``<|conf_0|>`` ..
``<|conf_10|>``, then ``<|mask|>`` (masked-diffusion mask), ``<think>`` and ``</think>``
(thinking delimiters). Every added token is one id that no text splits.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from entropy_guided_generation.confidence import kit_confidence_tokens
from entropy_guided_generation.kit import data
from entropy_guided_generation.kit.cache import cached_folder

CONFIDENCE_TOKENS: list[str] = kit_confidence_tokens(11)
MASK_TOKEN = "<|mask|>"
THINK_START = "<think>"
THINK_END = "</think>"
EOS_TOKEN = "<|im_end|>"  # torchtune's Qwen2.5 default eos; the trained base ends responses with it
PAD_TOKEN = "<|endoftext|>"
BPE_VOCAB_SIZE = 512
MODEL_MAX_LENGTH = 2048
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

# Qwen2.5-Instruct's chat template (its tokenizer_config.json ``chat_template``), tools branch
# included (the kit has Qwen2.5's <tool_call> / </tool_call> tokens). Without a system message
# it inserts Qwen's default one; ``add_generation_prompt`` opens the assistant turn.
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_5_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Strings the kit's users put into prompts (budget forcing, markers, lm-eval's templates): in the
# corpus so that they become few tokens.
_EXTRA_CORPUS_LINES = (
    "Question: How many do you have now?\nAnswer: Let's think step by step.",
    "Wait, let me check that again.",
    "Wait",
    "So the answer is",
    "Final Answer: The final answer is",
    "<think>\nWait, I should check.\n</think>",
)


def _qwen2_5_special_tokens() -> list[str]:
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    return sorted(QWEN2_5_SPECIAL_TOKENS, key=QWEN2_5_SPECIAL_TOKENS.__getitem__)


def special_token_strings() -> list[str]:
    """All special tokens in id order: Qwen2.5's, the confidence tokens, then ``<|mask|>``."""
    return _qwen2_5_special_tokens() + CONFIDENCE_TOKENS + [MASK_TOKEN]


def added_token_strings() -> list[str]:
    """Every token appended after the BPE vocabulary, in id order (special ones, then the thinking delimiters)."""
    return special_token_strings() + [THINK_START, THINK_END]


def kit_corpus(num_problems: int = 4000, num_traces: int = 500) -> list[str]:
    """The tokenizer's training texts: kit word problems (train split, prompt + answer), BIG-Bench
    Mistake traces and a few prompt strings. Deterministic."""
    texts = [data.prompt_of(row["question"]) + row["answer"] for row in data.gsm8k_examples(num_problems, seed=0)]
    for row in data.bigbench_mistake_examples(num_traces, seed=0):
        texts.append("\n".join([row["input"], *row["steps"]]))
    return texts + list(_EXTRA_CORPUS_LINES)


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _add_kit_tokens(tokenizer) -> None:
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_token_strings()])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])


def _hf_tokenizer_config(tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers.AutoTokenizer`` (Qwen2 class, eos ``<|im_end|>``,
    mask ``<|mask|>``, Qwen2.5's chat template)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "mask_token": MASK_TOKEN,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "extra_special_tokens": CONFIDENCE_TOKENS + [MASK_TOKEN],
        "chat_template": QWEN2_5_CHAT_TEMPLATE,
    }


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    tokenizer = _train_bpe(kit_corpus(), vocab_size)
    tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    _add_kit_tokens(tokenizer)
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    config = _hf_tokenizer_config(tokenizer)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tokenizer(vocab_size: int = BPE_VOCAB_SIZE) -> Path:
    """Train (once, cached) the kit's byte-level BPE tokenizer and return its folder.

    Args:
        vocab_size: size of the BPE vocabulary before the added tokens (>= 256 + merges wanted).

    Returns:
        A folder with ``vocab.json``, ``merges.txt``, ``tokenizer.json`` (also torchtune's
        ``special_tokens_path``) and ``tokenizer_config.json``.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 256:
        raise ValueError(f"vocab_size must be an int above the 256 byte tokens, got {vocab_size!r}")
    sources = (Path(__file__), Path(data.__file__))
    return cached_folder("tokenizer", {"vocab_size": vocab_size}, lambda f: _write_tokenizer(f, vocab_size), sources)


def tokenizer_kwargs(folder: Optional[Path] = None) -> dict[str, str]:
    """Arguments of ``torchtune.models.qwen2_5.qwen2_5_tokenizer`` for a kit tokenizer folder
    (default: ``build_tokenizer()``): ``path``, ``merges_file``, ``special_tokens_path``."""
    folder = Path(folder) if folder is not None else build_tokenizer()
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a kit tokenizer folder: missing {', '.join(missing)}")
    return {
        "path": str(folder / "vocab.json"),
        "merges_file": str(folder / "merges.txt"),
        "special_tokens_path": str(folder / "tokenizer.json"),
    }


def load_tokenizer(max_seq_len: Optional[int] = None, folder: Optional[Path] = None, **kwargs: Any):
    """The kit tokenizer as torchtune's ``Qwen2_5Tokenizer`` (eos ``<|im_end|>``, pad ``<|endoftext|>``).

    Args:
        max_seq_len: truncation length passed to torchtune (None: no truncation).
        folder: a tokenizer folder (default: ``build_tokenizer()``; a kit checkpoint folder works too).
        **kwargs: more ``qwen2_5_tokenizer`` arguments (e.g. ``prompt_template``).
    """
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(max_seq_len=max_seq_len, **tokenizer_kwargs(folder), **kwargs)


HF_MODEL_TOKENIZER = "entropy_guided_generation.tokenizing.hf_model_tokenizer"


def tokenizer_section(folder: Path, max_seq_len: Optional[int] = None) -> dict[str, Any]:
    """The YAML ``tokenizer`` section for a model folder: torchtune's Qwen2.5 tokenizer when the folder
    holds Qwen2.5-format files (:data:`TOKENIZER_FILES`: the kit's models, Qwen2.5), else the HF model
    tokenizer over any Hugging Face tokenizer folder (SmolLM2, Mistral, ...)."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in TOKENIZER_FILES):
        return {"_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer", **tokenizer_kwargs(folder), "max_seq_len": max_seq_len}
    return {"_component_": HF_MODEL_TOKENIZER, "path": str(folder), "max_seq_len": max_seq_len}


def load_folder_tokenizer(folder: Path, max_seq_len: Optional[int] = None):
    """The tokenizer :func:`tokenizer_section` names for ``folder``, built."""
    from omegaconf import OmegaConf
    from torchtune import config

    return config.instantiate(OmegaConf.create(tokenizer_section(folder, max_seq_len)))


def vocab_size_of(folder: Optional[Path] = None) -> int:
    """Number of ids the tokenizer in ``folder`` can produce (BPE vocabulary + added tokens)."""
    tokenizer_json = json.loads((Path(folder or build_tokenizer()) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json["added_tokens"]]
    return max(ids) + 1


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    """Copy the tokenizer files (``TOKENIZER_FILES``) from ``source`` into ``destination``."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(source) / name, Path(destination) / name)
