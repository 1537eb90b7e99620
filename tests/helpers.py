"""Tiny models for tests: seeded torchtune decoders small enough to run a forward per token."""
from __future__ import annotations

import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.modeling import logits_of


def tiny_decoder(
    vocab_size: int = 64, seed: int = 0, embed_dim: int = 32, num_layers: int = 2, weight_scale: float = 1.0,
    max_seq_len: int = 256, tie_word_embeddings: bool = True,
):
    """A random torchtune Qwen2 decoder (fp32, eval mode). ``weight_scale`` sharpens its distributions
    so that entropies spread over several bins; ``max_seq_len`` sizes its rotary position table."""
    from torchtune.models.qwen2 import qwen2

    torch.manual_seed(seed)
    model = qwen2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=embed_dim,
        intermediate_dim=2 * embed_dim,
        max_seq_len=max_seq_len,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, weight_scale / p.shape[-1] ** 0.5)
        model.tok_embeddings.weight.normal_(0.0, weight_scale)
    return model.eval()


def quantile_codec(model, vocab_size: int, conf_ids: list[int], seed: int = 0):
    """A confidence codec over ``conf_ids`` whose edges are the quantiles of ``model``'s own
    entropies on random tokens, so that bins vary from token to token."""
    tokens = torch.randint(2, vocab_size - len(conf_ids), (4, 24), generator=torch.Generator().manual_seed(seed))
    h = signals.entropy(logits_of(model, tokens), exclude_ids=conf_ids)
    return ConfidenceCodec(signal="entropy", edges=fit_quantile_edges(h, len(conf_ids)), token_ids=torch.tensor(conf_ids))

