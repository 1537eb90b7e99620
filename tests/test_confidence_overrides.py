"""Confidence overrides (the ablation decode path): a fixed bin is what the model reads everywhere,
shuffled bins are a per-row permutation of a reference decode's bins, and the model's own signal
is still recorded."""
from __future__ import annotations

import pytest
import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.generation import FixedBin, ShuffledBins, decode
from entropy_guided_generation.generation.bin_ablations import compact_left, permute_within_rows
from entropy_guided_generation.layout import Interleaving
from entropy_guided_generation.modeling import logits_of

from helpers import tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
PAD = 0
PROMPT = torch.tensor([[PAD, PAD, 5, 9, 12, 7], [PAD, PAD, PAD, PAD, 22, 3], [14, 15, 16, 17, 18, 19]])
STEPS = 10


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=5, weight_scale=3.0)


@pytest.fixture(scope="module")
def codec(model):
    tokens = torch.randint(2, VOCAB - 11, (4, 24), generator=torch.Generator().manual_seed(0))
    h = signals.entropy(logits_of(model, tokens), exclude_ids=CONF_IDS)
    return ConfidenceCodec(signal="entropy", edges=fit_quantile_edges(h, 11), token_ids=torch.tensor(CONF_IDS))


def run(model, codec, mode, override=None):
    # No stop tokens: every row runs STEPS content tokens, each followed by its confidence token.
    return decode(model, PROMPT, interleaving=Interleaving.of(mode), max_generated_tokens=STEPS, pad_id=PAD,
                  temperature=0.0, codec=codec, confidence_override=override)


def confidence_tokens(result, codec):
    """Per row, the confidence tokens the model read, in order."""
    is_conf = codec.is_confidence_token(result.interleaved) & result.interleaved_valid
    return [row[mask].tolist() for row, mask in zip(result.interleaved, is_conf)]


@pytest.mark.parametrize("mode", ["full", "answer"])
def test_fixed_bin_feeds_that_bins_token_everywhere(mode, model, codec):
    result = run(model, codec, mode, FixedBin(4))
    for row in confidence_tokens(result, codec):
        assert row and set(row) == {CONF_IDS[4]}
    assert bool((result.bins == 4).all())


def test_fixed_bin_keeps_the_models_own_signal(model, codec):
    real, forced = run(model, codec, "answer"), run(model, codec, "answer", FixedBin(0))
    # The first content token is produced before any confidence token is read: same signal.
    assert torch.equal(real.signal[:, 0], forced.signal[:, 0])
    assert torch.equal(codec.bins_from_signal(real.signal[:, 0]), real.bins[:, 0])


@pytest.mark.parametrize("mode", ["full", "answer"])
def test_shuffled_bins_are_a_permutation_per_row(mode, model, codec):
    real = run(model, codec, mode)
    shuffled = run(model, codec, mode, ShuffledBins.from_reference(real.bins, seed=3))
    assert not torch.equal(real.bins, shuffled.bins)
    for ref_row, new_row in zip(real.bins, shuffled.bins):
        assert sorted(ref_row.tolist()) == sorted(new_row.tolist())
    # Mode full: the prompt's confidence tokens are a permutation of the exact prompt bins too.
    for ref_row, new_row in zip(confidence_tokens(real, codec), confidence_tokens(shuffled, codec)):
        assert sorted(ref_row) == sorted(new_row)


def test_fixed_bin_outside_the_codec_is_an_error_naming_the_range(model, codec):
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        run(model, codec, "answer", FixedBin(11))
    with pytest.raises(ValueError, match="-1"):
        FixedBin(-1)


def test_permute_within_rows_moves_only_masked_entries():
    values = torch.arange(24).reshape(3, 8)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 1], [1] * 8, [0] * 8], dtype=torch.bool)
    out = permute_within_rows(values, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out[~mask], values[~mask])
    for r in range(3):
        assert sorted(out[r][mask[r]].tolist()) == sorted(values[r][mask[r]].tolist())
    assert not torch.equal(out, values)


def test_shuffled_bins_cycle_when_an_ablated_row_outlasts_its_reference():
    reference = torch.tensor([[2, 5, 7, -1, -1], [-1, -1, -1, -1, -1]])
    override = ShuffledBins.from_reference(reference, seed=0)
    assert override.count.tolist() == [3, 0]
    fed = torch.stack([override.step_bins(torch.tensor([9, 9]), t) for t in range(6)], dim=1)
    assert sorted(fed[0, :3].tolist()) == [2, 5, 7] and fed[0, 3:].tolist() == fed[0, :3].tolist()
    assert fed[1].tolist() == [9] * 6  # no reference bins: the row feeds its own
    assert compact_left(reference, reference >= 0).tolist() == reference.tolist()
