"""The Entropix-style sampler as a transformers ``LogitsProcessor`` (seed 001's
``HookBasedEntropySampler``), for decoder-only transformers models with rotary attention at
``model.layers[-1].self_attn`` (tested: Llama, Qwen2; built the same way: Mistral, Qwen3, ...).

A forward hook on the last decoder layer's ``self_attn`` recomputes the current query (the last
input position) from the layer's input and scores it against the layer's cached keys, so the
attention of that one query is observed in O(L) with the model's own attention implementation
(sdpa stays sdpa; nothing is switched to eager).
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, Union

import torch
from transformers import LogitsProcessor

from entropy_guided_generation.confidence import encode_single_token
from entropy_guided_generation.sampling.entropix import REGIMES, entropix_step, resolve_clarifying_token
from entropy_guided_generation.sampling.entropix_config import EntropixConfig
from entropy_guided_generation.sampling.entropix_metrics import entropix_metrics


def _decoder_layers(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    return layers


class HFLastQueryAttention:
    """Forward hook on a transformers model's last ``self_attn``: after each forward, ``scores``
    ``[b, h, L]`` (q . k * scaling of the last input position against every cached key) and
    ``visible`` ``[b, L]`` (that query's row of the attention mask; None when the model passes no
    mask: the query sees every key)."""

    def __init__(self, model: Any):
        layers = _decoder_layers(model)
        attn = getattr(layers[-1], "self_attn", None) if layers is not None and len(layers) else None
        rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) if attn is not None else None
        needed = ("q_proj", "k_proj", "head_dim", "scaling", "layer_idx")
        if attn is None or rope is None or not all(hasattr(attn, name) for name in needed):
            raise TypeError(
                f"HookBasedEntropySampler cannot observe the attention of {type(model).__name__}: expected a "
                "decoder-only transformers model with rotary attention at model.layers[-1].self_attn "
                "(q_proj, k_proj, head_dim, scaling), e.g. LlamaForCausalLM or Qwen2ForCausalLM"
            )
        self.attn, self.rope = attn, rope
        self.scores: Optional[torch.Tensor] = None
        self.visible: Optional[torch.Tensor] = None
        self.handle = attn.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def _project(self, module: Any, proj: Any, norm_name: str, hidden: torch.Tensor) -> torch.Tensor:
        b, s = hidden.shape[:2]
        t = proj(hidden).view(b, s, -1, module.head_dim)
        norm = getattr(module, norm_name, None)
        return (norm(t) if norm is not None else t).transpose(1, 2)  # [b, heads, s, d]

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        q = self._project(module, module.q_proj, "q_norm", hidden[:, -1:])
        q, _ = self.rope(q, q[:, :, :0], cos[:, -1:], sin[:, -1:])  # no key to rotate: an empty one
        if cache is not None:
            layer = cache.layers[module.layer_idx] if hasattr(cache, "layers") else None
            keys = layer.keys if layer is not None else cache.key_cache[module.layer_idx]
        else:
            k = self._project(module, module.k_proj, "k_norm", hidden)
            _, keys = self.rope(k, k, cos, sin)
        b, heads, length = q.shape[0], q.shape[1], keys.shape[2]
        group = heads // keys.shape[1]
        q = q.reshape(b, keys.shape[1], group, module.head_dim).float() * module.scaling  # head i uses kv head i // group
        self.scores = torch.matmul(q, keys.float().transpose(2, 3)).reshape(b, heads, length)
        self.visible = self._visible(kwargs.get("attention_mask"), b, length, hidden.device)

    @staticmethod
    def _visible(mask: Any, b: int, length: int, device: torch.device) -> Optional[torch.Tensor]:
        if mask is None:  # sdpa/causal skip: the last query sees every key
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise TypeError(
                f"HookBasedEntropySampler needs a 4-D attention mask tensor (sdpa or eager attention), got "
                f"{type(mask).__name__}; load the model with attn_implementation='sdpa'"
            )
        row = mask[:, 0, -1, :length]
        if row.dtype == torch.bool:
            return row.expand(b, -1)
        return (row > torch.finfo(row.dtype).min / 2).expand(b, -1)


class HookBasedEntropySampler(LogitsProcessor):
    """Entropix-style adaptive sampling inside ``model.generate``.

    >>> sampler = HookBasedEntropySampler(model, tokenizer, pause_token_id, clarifying_question_token_id)
    >>> out = model.generate(input_ids, attention_mask=mask, logits_processor=[sampler], max_new_tokens=64)
    >>> sampler.remove_hooks()

    Each call reads the step's logits and the last layer's attention of the current query, picks
    a regime per row and returns scores that allow only the chosen token (0 there, -inf elsewhere),
    so greedy and sampling generate both emit it. Put it last among logits processors.

    Args:
        model: a decoder-only transformers model whose last ``self_attn`` can be observed (Llama,
            Qwen2, and models built like them); otherwise a ``TypeError`` naming the model class.
        tokenizer: resolves token strings (for the two token arguments and
            ``config.clarifying_token``); may be None when ids are given.
        pause_token_id: id or string of the seed's pause token; validated and kept as
            ``pause_token_id``. The classic entropix regimes never insert it.
        clarifying_question_token_id: id or string emitted by the ``clarify`` regime; None falls
            back to ``config.clarifying_token`` (and to no clarifying token).
        config: :class:`EntropixConfig` or a mapping of its fields.
        rng: generator for reproducible draws (default: torch's global generator).

    Attributes:
        history: one dict per generation step with ``[b]`` tensors ``entropy, varentropy,
            attn_entropy, attn_varentropy, agreement, interaction_strength, regime`` (codes into
            :data:`REGIMES`) and ``temperature, top_k, top_p, min_p``.
    """

    regime_names = REGIMES

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pause_token_id: Union[int, str, None],
        clarifying_question_token_id: Union[int, str, None],
        config: Union[EntropixConfig, Mapping[str, Any], None] = None,
        *,
        rng: Optional[torch.Generator] = None,
    ):
        self.config = EntropixConfig.coerce(config)
        vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(model, "get_output_embeddings") else None
        self.pause_token_id = _token_id("pause_token_id", pause_token_id, tokenizer, vocab)
        if clarifying_question_token_id is None:
            self.clarifying_id = resolve_clarifying_token(self.config.clarifying_token, tokenizer)
        else:
            self.clarifying_id = _token_id("clarifying_question_token_id", clarifying_question_token_id, tokenizer, vocab)
        self.rng = rng
        self.history: list[dict[str, torch.Tensor]] = []
        self._observer = HFLastQueryAttention(model)

    def remove_hooks(self) -> None:
        """Detach the attention hook from the model (the sampler cannot be used after this)."""
        self._observer.remove()

    def __enter__(self) -> "HookBasedEntropySampler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove_hooks()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores ``[b, v]`` allowing only each row's chosen token, given ``input_ids`` ``[b, s]``."""
        observed = self._observer
        if observed.scores is None or observed.scores.shape[0] != scores.shape[0]:
            raise RuntimeError(
                "no attention of the current step was observed; call the sampler inside model.generate of the "
                "model it was built with"
            )
        metrics = entropix_metrics(scores, observed.scores, observed.visible, validate=False)
        decision = entropix_step(scores, metrics, self.config, input_ids[:, -1], self.clarifying_id, self.rng)
        p = decision.params
        self.history.append(
            {**metrics.as_dict(), "regime": decision.regime, "temperature": p.temperature, "top_k": p.top_k,
             "top_p": p.top_p, "min_p": p.min_p}
        )
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, decision.token.unsqueeze(-1), 0.0)

    def stacked_history(self) -> dict[str, torch.Tensor]:
        """``history`` as ``[b, T]`` tensors by name."""
        if not self.history:
            return {}
        return {name: torch.stack([h[name] for h in self.history], dim=1) for name in self.history[0]}


def _token_id(name: str, value: Union[int, str, None], tokenizer: Any, vocab: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{name} {value!r} is a string; pass a tokenizer to resolve it")
        try:
            value = encode_single_token(value, tokenizer)
        except ValueError as err:
            raise ValueError(f"unknown {name} string {value!r}: {err}") from err
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (vocab is not None and value >= vocab):
        raise ValueError(f"{name} must be a token id in [0, {vocab}) or a token string, got {value!r}")
    return value


__all__ = ["HFLastQueryAttention", "HookBasedEntropySampler"]
