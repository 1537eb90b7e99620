"""Tiny Hugging Face checkpoints written by ``transformers`` and their torchtune twins.

``build_tiny_checkpoint`` saves a randomly initialised ``Qwen2ForCausalLM`` or ``LlamaForCausalLM``
(with the kit tokenizer's files beside it, so ``AutoTokenizer`` and lm-eval's ``hf`` model load the
folder). ``torchtune_model_config`` reads any such ``config.json`` (the kit's or a real Qwen2 /
Llama 3.x one) into the matching torchtune builder and its arguments, since torchtune's builders
never read ``config.json`` themselves; ``load_torchtune_model`` then loads the weights through
torchtune's ``FullModelHFCheckpointer``.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from entropy_guided_generation.kit import tokenizer as kit_tokenizer
from entropy_guided_generation.kit.cache import cached_folder

ARCHS = ("qwen2", "llama")
PathLike = Union[str, Path]

_DEFAULT_SIZES: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "max_seq_len": 512,
    "tie_word_embeddings": True,
    "init_std": 0.02,
}
_ARCH_DEFAULTS = {"qwen2": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}, "llama": {"rope_theta": 500_000.0, "rms_norm_eps": 1e-5}}
# torchtune's Llama3ScaledRoPE has these fixed; a config asking for others cannot be matched.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def tiny_sizes(arch: str = "qwen2", **sizes: Any) -> dict[str, Any]:
    """The complete size settings of a tiny checkpoint: defaults overridden by ``sizes``.

    Keys: num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size, max_seq_len,
    tie_word_embeddings, init_std (normal init std of the weights), rope_theta, rms_norm_eps.
    """
    _check_arch(arch)
    settings = {**_DEFAULT_SIZES, **_ARCH_DEFAULTS[arch]}
    unknown = sorted(set(sizes) - set(settings))
    if unknown:
        raise ValueError(f"unknown size settings {unknown}; expected some of {', '.join(sorted(settings))}")
    settings.update(sizes)
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {settings[key]!r}")
    if settings["hidden_size"] % settings["num_heads"]:
        raise ValueError(f"hidden_size {settings['hidden_size']} is not divisible by num_heads {settings['num_heads']}")
    if settings["num_heads"] % settings["num_kv_heads"]:
        raise ValueError(f"num_heads {settings['num_heads']} is not divisible by num_kv_heads {settings['num_kv_heads']}")
    return settings


def hf_config(arch: str, vocab_size: int, eos_id: int, pad_id: int, **sizes: Any):
    """A ``transformers`` config (``Qwen2Config`` or ``LlamaConfig``) for a tiny model.

    Args:
        arch: ``"qwen2"`` or ``"llama"`` (Llama 3.2 style: plain RoPE unless a real config says otherwise).
        vocab_size: number of token ids (the tokenizer's, added tokens included).
        eos_id: end-of-sequence id written into the config.
        pad_id: padding id written into the config.
        **sizes: see ``tiny_sizes``.
    """
    from transformers import LlamaConfig, Qwen2Config

    s = tiny_sizes(arch, **sizes)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=s["max_seq_len"],
        initializer_range=s["init_std"],
        rms_norm_eps=s["rms_norm_eps"],
        tie_word_embeddings=s["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def _write_tiny_checkpoint(folder: Path, arch: str, seed: int, sizes: dict[str, Any]) -> None:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    tokenizer_dir = kit_tokenizer.build_tokenizer()
    tok = kit_tokenizer.load_tokenizer(folder=tokenizer_dir)
    config = hf_config(arch, kit_tokenizer.vocab_size_of(tokenizer_dir), tok.eos_id, tok.pad_id, **sizes)
    torch.manual_seed(seed)
    model_class = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    model = model_class(config).to(torch.float32)
    model.generation_config.eos_token_id = [tok.eos_id, tok.pad_id]
    model.generation_config.pad_token_id = tok.pad_id
    model.save_pretrained(folder, safe_serialization=True)
    kit_tokenizer.copy_tokenizer_files(tokenizer_dir, folder)


def build_tiny_checkpoint(arch: str = "qwen2", seed: int = 0, **sizes: Any) -> Path:
    """Write (once, cached) a randomly initialised tiny HF checkpoint with ``transformers`` itself.

    Args:
        arch: ``"qwen2"`` (``Qwen2ForCausalLM``) or ``"llama"`` (``LlamaForCausalLM``).
        seed: ``torch.manual_seed`` before the model's own init; same seed, same weights.
        **sizes: overrides of ``tiny_sizes`` (defaults: 2 layers, hidden 64, 4 heads, 2 kv heads,
            intermediate 128, max_seq_len 512, tied embeddings, init std 0.02).

    Returns:
        A folder with ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32)
        and the kit tokenizer's files; vocab size = the tokenizer's.
    """
    settings = tiny_sizes(arch, **sizes)
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    tokenizer_dir = kit_tokenizer.build_tokenizer()
    spec = {"arch": arch, "seed": seed, "sizes": settings, "tokenizer": tokenizer_dir.name}
    return cached_folder("ckpt", spec, lambda f: _write_tiny_checkpoint(f, arch, seed, settings), (Path(__file__),))


# ---------------------------------------------------------------- config.json -> torchtune


def read_hf_config(checkpoint_dir: PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint folder as a dict."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a Hugging Face checkpoint folder: no config.json")
    return json.loads(path.read_text())


def _rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``{"rope_type", "rope_theta", ...}`` from transformers 5's ``rope_parameters`` or 4.x's
    ``rope_theta`` + ``rope_scaling``."""
    if "rope_parameters" in config and config["rope_parameters"] is not None:
        rope = dict(config["rope_parameters"])
    else:
        rope = dict(config.get("rope_scaling") or {})
        rope["rope_theta"] = config.get("rope_theta", 10_000.0)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def _llama_scale_factor(rope: dict[str, Any]) -> float:
    if rope["rope_type"] == "default":
        return 1  # Llama3ScaledRoPE with scale_factor 1 is plain RoPE
    if rope["rope_type"] != "llama3":
        raise ValueError(f"unsupported Llama rope_type {rope['rope_type']!r}; expected default or llama3")
    for key, value in _LLAMA3_ROPE_FIXED.items():
        if float(rope.get(key, value)) != value:
            raise ValueError(f"rope_parameters.{key}={rope[key]!r} cannot be matched by torchtune's Llama3ScaledRoPE (fixed at {value})")
    return rope["factor"]


def torchtune_model_config(checkpoint_dir: PathLike, max_seq_len: Optional[int] = None) -> dict[str, Any]:
    """The torchtune builder (``_component_``) and its arguments that match an HF checkpoint.

    Qwen2 -> ``torchtune.models.qwen2.qwen2``; Llama with tied embeddings ->
    ``torchtune.models.llama3_2.llama3_2``; untied -> ``torchtune.models.llama3_1.llama3_1``.
    Every size, ``rope_base``, ``norm_eps`` and (for Llama) the RoPE scale factor come from
    ``config.json``; the dict can be passed to ``torchtune.config.instantiate`` or written to YAML.

    Args:
        checkpoint_dir: folder with ``config.json``.
        max_seq_len: torchtune's ``max_seq_len`` (RoPE and KV-cache length); default
            ``max_position_embeddings``.
    """
    config = read_hf_config(checkpoint_dir)
    model_type = config.get("model_type")
    rope = _rope_settings(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", hidden // heads) != hidden // heads:
        raise ValueError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = {hidden // heads}; torchtune's builders derive it")
    kwargs: dict[str, Any] = {
        "vocab_size": config["vocab_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "embed_dim": hidden,
        "intermediate_dim": config["intermediate_size"],
        "max_seq_len": max_seq_len or config["max_position_embeddings"],
        "norm_eps": config["rms_norm_eps"],
        "rope_base": rope["rope_theta"],
    }
    tied = bool(config.get("tie_word_embeddings", False))
    if model_type == "qwen2":
        if rope["rope_type"] != "default":
            raise ValueError(f"unsupported Qwen2 rope_type {rope['rope_type']!r}; expected default")
        return {"_component_": "torchtune.models.qwen2.qwen2", **kwargs, "tie_word_embeddings": tied}
    if model_type == "llama":
        scale = _llama_scale_factor(rope)
        if tied:
            return {"_component_": "torchtune.models.llama3_2.llama3_2", **kwargs, "scale_factor": scale, "tie_word_embeddings": True}
        return {"_component_": "torchtune.models.llama3_1.llama3_1", **kwargs, "scale_factor": scale}
    raise ValueError(f"unsupported model_type {model_type!r} in {checkpoint_dir}/config.json; expected qwen2 or llama")


def torchtune_model_type(checkpoint_dir: PathLike) -> str:
    """The ``model_type`` argument of ``FullModelHFCheckpointer`` for an HF checkpoint folder."""
    component = torchtune_model_config(checkpoint_dir)["_component_"]
    return {"qwen2": "QWEN2", "llama3_2": "LLAMA3_2", "llama3_1": "LLAMA3"}[component.rsplit(".", 1)[1]]


def checkpoint_files(checkpoint_dir: PathLike) -> list[str]:
    """The ``*.safetensors`` weight files of an HF checkpoint folder, sorted."""
    files = sorted(p.name for p in Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight file in {checkpoint_dir}")
    return files


def checkpointer_config(checkpoint_dir: PathLike, output_dir: PathLike) -> dict[str, Any]:
    """A ``FullModelHFCheckpointer`` config (``_component_`` + arguments) for an HF checkpoint folder."""
    return {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(checkpoint_dir),
        "checkpoint_files": checkpoint_files(checkpoint_dir),
        "model_type": torchtune_model_type(checkpoint_dir),
        "output_dir": str(output_dir),
    }


def decoder_from_hf_config(checkpoint_dir: PathLike, max_seq_len: Optional[int] = None):
    """A freshly initialised torchtune ``TransformerDecoder`` shaped like an HF checkpoint (no weights
    loaded). YAML: ``model: {_component_: entropy_guided_generation.kit.decoder_from_hf_config,
    checkpoint_dir: ...}``; the recipe's checkpointer then loads the weights."""
    kwargs = torchtune_model_config(checkpoint_dir, max_seq_len)
    module_name, builder_name = kwargs.pop("_component_").rsplit(".", 1)
    return getattr(importlib.import_module(module_name), builder_name)(**kwargs)


def load_torchtune_model(checkpoint_dir: PathLike, *, max_seq_len: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """An HF checkpoint folder as a torchtune ``TransformerDecoder``, weights loaded through
    ``FullModelHFCheckpointer`` (strict: every weight must match), in eval mode.

    Args:
        checkpoint_dir: HF folder (``config.json`` + ``*.safetensors``), e.g. ``build_tiny_checkpoint()``.
        max_seq_len: torchtune ``max_seq_len`` (default: ``max_position_embeddings``).
        dtype: parameter dtype of the returned model.
    """
    from torchtune import training

    model = decoder_from_hf_config(checkpoint_dir, max_seq_len)
    with tempfile.TemporaryDirectory(prefix="egg-kit-load-") as scratch:
        checkpointer = training.FullModelHFCheckpointer(**{k: v for k, v in checkpointer_config(checkpoint_dir, scratch).items() if k != "_component_"})
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state_dict, strict=True)
    return model.to(dtype).eval()
