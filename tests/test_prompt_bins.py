"""Prompt bins reused across calls: few-shot prompts that share their examples get the same exact bins,
and the same decodes, as prompts interleaved from scratch."""
from __future__ import annotations

import pytest
import torch

from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.generation import PromptBinsCache, get_decoder, left_pad
from entropy_guided_generation.layout import Interleaving, compute_bins
from entropy_guided_generation.modeling import logits_of
from entropy_guided_generation import signals

from helpers import tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=11, weight_scale=3.0)


def few_shot_prompts(seed: int, rows: int = 3) -> list[list[int]]:
    """``rows`` prompts: the same 40-token "examples" (a stop token inside), then a question of its
    own (5..12 tokens) each."""
    g = torch.Generator().manual_seed(seed)
    shots = torch.randint(2, VOCAB - 11, (40,), generator=g).tolist()
    shots[17] = EOS
    return [shots + torch.randint(2, VOCAB - 11, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g).tolist() for _ in range(rows)]


@pytest.fixture(scope="module")
def codec(model):
    tokens = torch.tensor([p[:40] for p in few_shot_prompts(0)])
    values = signals.entropy(logits_of(model, tokens), exclude_ids=CONF_IDS).flatten().double()
    edges = fit_quantile_edges(values, 11)
    distinct = torch.unique(values)
    above = torch.searchsorted(distinct, edges).clamp(1, distinct.numel() - 1)
    edges = (distinct[above - 1] + distinct[above]) / 2  # no signal on an edge
    return ConfidenceCodec(signal="entropy", edges=edges.float(), token_ids=torch.tensor(CONF_IDS))


def fixed_point(model, codec, prompt, cache=None):
    interleaving = Interleaving.of("full", stop_ids=[EOS])
    valid = prompt != PAD
    slots = interleaving.slots(prompt, valid_mask=valid)
    known = cache.known(prompt, valid, slots) if cache is not None else (None, None)
    result = compute_bins(model, prompt, codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, left_pad=True,
                          known_bins=known[0], known_signal=known[1])
    if cache is not None:
        cache.add(prompt, valid, result.bins, result.signal)
    return result


def test_known_prefix_bins_give_the_bins_of_a_fresh_fixed_point(model, codec):
    cache = PromptBinsCache()
    first = left_pad(few_shot_prompts(1), PAD)
    fixed_point(model, codec, first, cache)
    later = left_pad(few_shot_prompts(1, rows=5)[2:] + [[7, 8, 9]], PAD)  # new questions, and a prompt sharing nothing
    fresh = fixed_point(model, codec, later)
    reused = fixed_point(model, codec, later, cache)
    assert torch.equal(reused.bins, fresh.bins)
    assert torch.equal(reused.interleaved.tokens, fresh.interleaved.tokens)
    slots = reused.bins >= 0
    assert torch.allclose(reused.signal[slots].double(), fresh.signal[slots].double(), rtol=1e-4, atol=1e-5)
    # The shared examples came from the cache: the passes ran over far fewer slots.
    assert cache.reused_slots >= 3 * 39
    assert sum(reused.pass_slots) < sum(fresh.pass_slots) / 2


def test_full_mode_decodes_equal_with_and_without_the_cache(model, codec):
    decoder = get_decoder("full")
    cache = PromptBinsCache()
    kwargs = dict(max_generated_tokens=6, codec=codec, pad_id=PAD, temperature=0.0, stop_tokens=[EOS])
    for seed in (2, 3):
        prompt = left_pad(few_shot_prompts(seed), PAD)
        alone = decoder(model, prompt, **kwargs)
        cached = decoder(model, prompt, prompt_bins=cache, **kwargs)
        again = decoder(model, prompt, prompt_bins=cache, **kwargs)  # every prompt bin from the cache now
        for result in (cached, again):
            assert torch.equal(result.content, alone.content)
            assert torch.equal(result.bins, alone.bins)
    assert len(cache) == 6 and cache.reused_slots > 0


def test_bad_known_bins_and_capacity_are_refused(model, codec):
    prompt = left_pad(few_shot_prompts(4), PAD)
    valid = prompt != PAD
    slots = Interleaving.of("full", stop_ids=[EOS]).slots(prompt, valid_mask=valid)
    with pytest.raises(ValueError, match=r"known_bins must have the shape of tokens \(3, \d+\), got \(3, 2\)"):
        compute_bins(model, prompt, codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, left_pad=True,
                     known_bins=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity must be an int >= 1, got 0"):
        PromptBinsCache(capacity=0)
