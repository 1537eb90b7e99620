"""A Llama-3-shaped stand-in for the real-model configs (``configs/entropy_intl/``,
``configs/bigbench_mistake/``): the files of a Hugging Face Llama 3.x download, with the real
vocabulary and tiny random weights, so that every key of those configs but the model's size runs offline.

- ``original/tokenizer.model``: a tiktoken BPE file of Llama 3's 128,000 regular ranks (torchtune's
  ``llama3_tokenizer`` adds the 256 special tokens, 128000..128255, itself): the 256 single bytes,
  then printable ASCII pairs, then printable triples. Every text encodes; no text encodes to a
  special id, so the configs' confidence ids 128245..128255 stay reserved.
- a ``LlamaForCausalLM`` with ``vocab_size`` 128,256 and tiny dims, bf16, ``config.json`` in the
  hub's keys (``rope_scaling`` of type llama3, ``rope_theta``, ``torch_dtype``), laid out as
  ``Llama-3.2-1B-Instruct`` (tied embeddings, one ``model.safetensors``) or
  ``Meta-Llama-3.1-8B-Instruct`` (untied, four ``model-0000N-of-00004.safetensors`` and their index).

:func:`size_overrides` gives the ``key=value`` overrides that swap only the model's size into a config.
"""
from __future__ import annotations

import base64
import json
import string
from itertools import product
from pathlib import Path
from typing import Any

import torch

from entropy_guided_generation.kit.cache import cached_folder

REGULAR_TOKENS = 128_000  # torchtune's llama3_tokenizer asserts exactly this many ranks
VOCAB_SIZE = 128_256  # regular + 256 special tokens
SIZES = {"num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 128}
MAX_SEQ_LEN = 131_072

# name -> what the download looks like and the torchtune builder its configs use
LAYOUTS: dict[str, dict[str, Any]] = {
    "llama3_2_1b": {"tied": True, "shards": 1, "rope_factor": 32.0, "builder": "torchtune.models.llama3_2.llama3_2"},
    "llama3_1_8b": {"tied": False, "shards": 4, "rope_factor": 8.0, "builder": "torchtune.models.llama3_1.llama3_1"},
}


def _check_layout(layout: str) -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown stand-in layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def tiktoken_ranks() -> list[bytes]:
    """The 128,000 regular tokens in rank order: single bytes, printable pairs, printable triples.

    Each multi-byte token splits into two lower-ranked tokens, so tiktoken's merges reach it.
    """
    printable = [c.encode() for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    ranks = [bytes([b]) for b in range(256)]
    ranks += [a + b for a, b in product(printable, repeat=2)]
    for a, b, c in product(printable, repeat=3):
        if len(ranks) == REGULAR_TOKENS:
            break
        ranks.append(a + b + c)
    return ranks


def write_tiktoken_file(path: Path) -> None:
    """``base64(token) rank`` per line, the format of Llama 3's ``original/tokenizer.model``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tiktoken_ranks()))
    path.write_text("".join(lines))


def hub_config(layout: str) -> dict[str, Any]:
    """``config.json`` in the keys the hub's Llama 3.x files use (torchtune's checkpointer reads them)."""
    spec = _check_layout(layout)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": SIZES["embed_dim"] // SIZES["num_heads"],
        "hidden_act": "silu",
        "hidden_size": SIZES["embed_dim"],
        "initializer_range": 0.02,
        "intermediate_size": SIZES["intermediate_dim"],
        "max_position_embeddings": MAX_SEQ_LEN,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": SIZES["num_heads"],
        "num_hidden_layers": SIZES["num_layers"],
        "num_key_value_heads": SIZES["num_kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": spec["rope_factor"], "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": spec["tied"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def _state_dict(layout: str, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised ``LlamaForCausalLM``'s weights in bf16 (``lm_head`` left out when tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in hub_config(layout).items() if k not in ("rope_scaling", "rope_theta", "torch_dtype", "architectures")}
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **hub_config(layout)["rope_scaling"]}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    if _check_layout(layout)["tied"]:
        weights.pop("lm_head.weight")
    return weights


def _write_standin(folder: Path, layout: str, seed: int) -> None:
    from safetensors.torch import save_file

    spec = _check_layout(layout)
    write_tiktoken_file(folder / "original" / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps(hub_config(layout), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9}, indent=2
    ))
    weights = _state_dict(layout, seed)
    if spec["shards"] == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    per_shard = -(-len(names) // spec["shards"])
    weight_map = {}
    for index in range(spec["shards"]):
        file = f"model-{index + 1:05d}-of-{spec['shards']:05d}.safetensors"
        chunk = names[index * per_shard : (index + 1) * per_shard]
        save_file({name: weights[name] for name in chunk}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in chunk})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def llama3_standin(layout: str = "llama3_2_1b", seed: int = 0) -> Path:
    """Build (once, cached) the stand-in download for ``layout`` (``llama3_2_1b`` | ``llama3_1_8b``).

    Returns:
        The folder: ``original/tokenizer.model``, ``config.json``, ``generation_config.json`` and the
        weights (``model.safetensors``, or four shards plus ``model.safetensors.index.json``).
    """
    _check_layout(layout)
    spec = {"layout": layout, "seed": seed, "sizes": SIZES, "vocab": VOCAB_SIZE}
    return cached_folder(f"llama3_standin_{layout}", spec, lambda f: _write_standin(f, layout, seed), (Path(__file__),))


def size_overrides(layout: str) -> list[str]:
    """``key=value`` overrides that swap the stand-in's size into a config naming the real model's builder."""
    spec = _check_layout(layout)
    sizes = {f"model.{k}": v for k, v in SIZES.items()}
    return [f"model._component_={spec['builder']}", f"model.vocab_size={VOCAB_SIZE}", f"model.max_seq_len={MAX_SEQ_LEN}"] + [
        f"{k}={v}" for k, v in sizes.items()
    ]


__all__ = ["LAYOUTS", "REGULAR_TOKENS", "VOCAB_SIZE", "hub_config", "llama3_standin", "size_overrides", "tiktoken_ranks", "write_tiktoken_file"]
