"""Tiny models for tests: seeded torchtune decoders small enough to run a forward per token."""
from __future__ import annotations

import torch


def tiny_decoder(
    vocab_size: int = 64, seed: int = 0, embed_dim: int = 32, num_layers: int = 2, weight_scale: float = 1.0,
    max_seq_len: int = 256,
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
        tie_word_embeddings=True,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, weight_scale / p.shape[-1] ** 0.5)
        model.tok_embeddings.weight.normal_(0.0, weight_scale)
    return model.eval()
