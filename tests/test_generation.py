"""Decoders: decoding produces exactly the training layout; batching, torchtune parity, sampling."""
from __future__ import annotations

import pytest
import torch

from entropy_guided_generation.generation import (
    filter_top_k,
    filter_top_p,
    generate_answer_interleaved,
    generate_answer_interleaved_marker,
    generate_plain,
    get_decoder,
    sample_next_token,
)
from entropy_guided_generation import fixed_point
from entropy_guided_generation.layout import compute_bins, confidence_slots
from entropy_guided_generation.scoring import SamplingPolicy

from helpers import quantile_codec, tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
EOS, PAD = 1, 0
PROMPTS = [[5, 9, 12, 7], [22, 3], [14, 15, 16, 17, 18, 19]]


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[PAD] * (width - len(r)) + r for r in rows])


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=5, weight_scale=3.0)


@pytest.fixture(scope="module")
def codec(model):
    return quantile_codec(model, VOCAB, CONF_IDS)


def decode_mode(mode, model, codec, prompt, marker=None, **kw):
    kwargs = dict(max_generated_tokens=12, pad_id=PAD, temperature=0.0, stop_tokens=[EOS])
    kwargs.update(kw)
    if mode == "none":
        return generate_plain(model, prompt, **kwargs)
    if mode == "marker":
        return generate_answer_interleaved_marker(model, prompt, codec=codec, marker=marker, **kwargs)
    return get_decoder(mode)(model, prompt, codec=codec, **kwargs)


def training_layout(model, codec, mode, prompt_row, content_row, marker, stop_ids):
    """The training layout of prompt + decoded content, with exact fixed-point bins."""
    tokens = torch.tensor([prompt_row + content_row])
    response = torch.zeros_like(tokens, dtype=torch.bool)
    response[0, len(prompt_row) :] = True
    slots = confidence_slots(tokens, mode=mode, response_mask=response, stop_ids=stop_ids, marker_ids=marker)
    fixed = compute_bins(model, tokens, codec=codec, slots=slots, max_passes=tokens.shape[1] + 1)
    assert fixed.converged
    return fixed.interleaved.tokens[0], fixed.bins[0, len(prompt_row) :]


@pytest.mark.parametrize("mode", ["none", "full", "answer", "marker"])
def test_decoded_interleaved_sequence_equals_training_layout(mode, model, codec):
    prompt = left_pad(PROMPTS)
    marker = None
    if mode == "marker":
        # Up to and including the marker, marker mode decodes exactly as answer mode: pick a marker
        # that row 0 really generates there.
        answer = generate_answer_interleaved(model, prompt, codec=codec, max_generated_tokens=12, temperature=0.0)
        marker = answer.content[0, 3:5].tolist()
    stop_ids = [] if mode == "marker" else [EOS]
    result = decode_mode(mode, model, codec, prompt, marker=marker, stop_tokens=stop_ids)
    for row, prompt_row in enumerate(PROMPTS):
        n = int(result.generated_lengths[row])
        content = result.content[row, :n].tolist()
        expected_seq, expected_bins = training_layout(model, codec, mode, prompt_row, content, marker, stop_ids)
        seen = result.interleaved[row][result.interleaved_valid[row]]
        assert seen.tolist() == expected_seq.tolist(), f"mode {mode} row {row}"
        assert result.bins[row, :n].tolist() == expected_bins.tolist()
    if mode == "marker":
        # row 0 switched to plain decoding after the first occurrence of its marker.
        ends = [t + 1 for t in range(1, 12) if result.content[0, t - 1 : t + 1].tolist() == marker]
        assert ends and ends[0] <= 5
        assert (result.bins[0, ends[0] :] == -1).all() and (result.bins[0, : ends[0]] >= 0).all()
    if mode in ("full", "answer"):
        generated = torch.arange(result.content.shape[1]) < result.generated_lengths.unsqueeze(1)
        assert (result.bins[generated & (result.content != EOS)] >= 0).all()
        assert (result.bins[~generated | (result.content == EOS)] == -1).all()


def test_full_mode_prompt_stepped_on_cpu_still_decodes_the_training_layout():
    """With a large vocabulary (65,536 x hidden 64) and 4 prompts on a CPU, the decoder finds the
    prompt's bins by stepping right after pass 0; what it decodes is still, row by row, the training
    layout of the same text (whose single-row fixed point runs passes)."""
    vocab = 1 << 16
    big = tiny_decoder(vocab, seed=5, weight_scale=3.0, embed_dim=64)
    big_codec = quantile_codec(big, vocab, list(range(vocab - 11, vocab)))
    prompts = [[5, 9, 12, 7, 30, 31, 2], [22, 3, 40], [14, 15, 16, 17, 18, 19, 20, 21, 22], [8, 6, 4, 2, 11]]
    assert fixed_point._stepping_is_cheaper(big, len(prompts), torch.device("cpu"))
    result = decode_mode("full", big, big_codec, left_pad(prompts))
    for row, prompt_row in enumerate(prompts):
        n = int(result.generated_lengths[row])
        content = result.content[row, :n].tolist()
        expected_seq, expected_bins = training_layout(big, big_codec, "full", prompt_row, content, None, [EOS])
        assert result.interleaved[row][result.interleaved_valid[row]].tolist() == expected_seq.tolist(), f"row {row}"
        assert result.bins[row, :n].tolist() == expected_bins.tolist()


@pytest.mark.parametrize("mode", ["none", "full", "answer", "marker"])
def test_batch_of_mixed_length_prompts_equals_one_by_one(mode, model, codec):
    marker = [7, 9]
    batch = decode_mode(mode, model, codec, left_pad(PROMPTS), marker=marker)
    for row, prompt_row in enumerate(PROMPTS):
        alone = decode_mode(mode, model, codec, torch.tensor([prompt_row]), marker=marker)
        n = int(alone.generated_lengths[0])
        assert int(batch.generated_lengths[row]) == n
        assert torch.equal(batch.content[row, :n], alone.content[0, :n])
        assert torch.equal(batch.bins[row, :n], alone.bins[0, :n])
        assert torch.equal(
            batch.interleaved[row][batch.interleaved_valid[row]], alone.interleaved[0][alone.interleaved_valid[0]]
        )
        assert torch.allclose(batch.entropies[row, :n], alone.entropies[0, :n], atol=1e-4)


def test_mode_none_greedy_equals_torchtune_generate(model):
    from torchtune.generation import generate

    prompt = left_pad(PROMPTS)
    ours = generate_plain(model, prompt, max_generated_tokens=10, pad_id=PAD, temperature=0.0, stop_tokens=[EOS])
    theirs, _ = generate(model, prompt, max_generated_tokens=10, pad_id=PAD, temperature=1e-6, top_k=1, stop_tokens=[EOS])
    width = min(theirs.shape[1], ours.tokens.shape[1])
    assert torch.equal(ours.tokens[:, :width], theirs[:, :width])


def test_sampling_with_fixed_rng_is_reproducible_and_never_emits_confidence_ids(model, codec):
    prompt = left_pad(PROMPTS)
    runs = [
        generate_answer_interleaved(
            model, prompt, codec=codec, max_generated_tokens=20, pad_id=PAD, temperature=5.0,
            rng=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].interleaved, runs[1].interleaved)
    content = runs[0].content
    assert not torch.isin(content, torch.tensor(CONF_IDS)).any()
    # at temperature 5 over 64 ids, unmasked sampling would emit confidence ids (11/64 of the mass).
    assert torch.unique(content).numel() > 10


def test_top_k_and_top_p_never_sample_outside_the_allowed_set():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    k = sample_next_token(logits, temperature=1.0, top_k=3, rng=g)
    assert set(k.tolist()) <= {0, 1, 2} and len(set(k.tolist())) == 3
    probs = logits[0].softmax(-1)  # 0.61, 0.22, 0.08, ... -> nucleus 0.8 keeps 3 tokens (0.61 + 0.22 < 0.9)
    p = sample_next_token(logits, temperature=1.0, top_p=0.8, rng=g)
    assert set(p.tolist()) == {0, 1}, probs
    assert torch.isinf(filter_top_p(logits[:1], 0.5)).sum() == 5
    assert torch.isinf(filter_top_k(logits[:1], 2)).sum() == 4


def reference_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[b, v]`` kept mask, one row at a time in float64: sort the probabilities descending, keep the
    first m + 1 where m counts the inclusive cumulative sums below ``top_p``, and every token tied
    with the last one kept."""
    kept = torch.zeros_like(logits, dtype=torch.bool)
    for r, row in enumerate(logits.double()):
        probs = row.softmax(-1)
        ordered = probs.sort(descending=True).values
        m = int((ordered.cumsum(0) < top_p).sum())
        kept[r] = probs >= ordered[min(m, len(ordered) - 1)]
    return kept


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.8, 0.95])
def test_top_p_of_decoder_and_scorer_keep_the_reference_nucleus_ties_included(temperature, top_p):
    # Logits in quarter steps tie at every rank; temperatures that are powers of two scale them
    # exactly, so the decoder's, the scorer's and the reference's tempered logits are the same numbers.
    g = torch.Generator().manual_seed(3)
    logits = torch.round(torch.randn(200, 40, generator=g) * torch.linspace(0.2, 6.0, 200).unsqueeze(1) * 4) / 4
    expected = reference_nucleus(logits / temperature, top_p)
    assert len({int(n) for n in expected.sum(-1)}) > 5  # nuclei of many sizes
    assert torch.equal(torch.isfinite(filter_top_p(logits / temperature, top_p)), expected)
    assert torch.equal(SamplingPolicy(temperature=temperature, top_p=top_p).kept_mask(logits), expected)
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    p = tied.softmax(-1)[0]
    between_ties = float(p[0] + p[1] / 2)  # a sort-order rule keeps one of the tied tokens here
    assert torch.isfinite(filter_top_p(tied, between_ties)).tolist() == [[True, True, True, False]]


def test_stopped_rows_stop_growing(model, codec):
    prompt = left_pad(PROMPTS)
    first = generate_answer_interleaved(model, prompt, codec=codec, max_generated_tokens=6, pad_id=PAD, temperature=0.0)
    stop = int(first.content[0, 2])
    result = generate_answer_interleaved(
        model, prompt, codec=codec, max_generated_tokens=6, pad_id=PAD, temperature=0.0, stop_tokens=[stop]
    )
    n = int(result.generated_lengths[0])
    assert n <= 3 and result.content[0, n - 1] == stop and (result.content[0, n:] == PAD).all()
    assert result.bins[0, n - 1] == -1  # the stop token gets no confidence token


def test_bad_decoder_inputs():
    with pytest.raises(ValueError, match="unknown interleaving.mode 'answr'; expected one of none, full, answer, marker"):
        get_decoder("answr")
    model = tiny_decoder(VOCAB)
    with pytest.raises(ValueError, match="needs a confidence codec"):
        get_decoder("answer")(model, torch.tensor([[3, 4]]), max_generated_tokens=2, codec=None)


def test_progress_true_shows_a_bar_of_decode_steps_and_false_shows_none(model, codec, capsys):
    """README (Decoding): ``progress=True`` shows a progress bar."""
    decode_mode("answer", model, codec, left_pad(PROMPTS), stop_tokens=[], progress=True)
    shown = capsys.readouterr().err
    assert "decode[answer]" in shown and "/12 " in shown  # a bar over the 12 decode steps
    decode_mode("answer", model, codec, left_pad(PROMPTS), stop_tokens=[])
    assert "decode[" not in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_plain_context_decode_equals_its_training_layout(mode, model, codec):
    """Under ``confidence.context: plain`` the decoder reads each bin off a plain twin of the row (same
    session, no confidence tokens): what it decodes is, row by row, the training layout whose bins come
    from one plain forward; the content token still comes from the interleaved row."""
    import dataclasses

    plain = dataclasses.replace(codec, context="plain")
    prompt = left_pad(PROMPTS)
    marker = [7, 9] if mode == "marker" else None
    stop_ids = [EOS]
    result = decode_mode(mode, model, plain, prompt, marker=marker, stop_tokens=stop_ids)
    interleaved = decode_mode(mode, model, codec, prompt, marker=marker, stop_tokens=stop_ids)
    differs = False
    for row, prompt_row in enumerate(PROMPTS):
        n = int(result.generated_lengths[row])
        content = result.content[row, :n].tolist()
        expected_seq, expected_bins = training_layout(model, plain, mode, prompt_row, content, marker, stop_ids)
        assert result.interleaved[row][result.interleaved_valid[row]].tolist() == expected_seq.tolist(), f"row {row}"
        assert result.bins[row, :n].tolist() == expected_bins.tolist()
        m = min(n, int(interleaved.generated_lengths[row]))
        differs |= result.bins[row, :m].tolist() != interleaved.bins[row, :m].tolist()
    assert differs, "plain-context bins equal the interleaved-context ones on every row: the twin is not read"


def test_plain_context_training_bins_are_one_plain_pass(model, codec):
    """``confidence.context: plain``: compute_bins gives every bin from pass 0 (the plain forward), final
    at once, equal to a single capped pass of the interleaved-context codec."""
    import dataclasses

    plain = dataclasses.replace(codec, context="plain")
    tokens = torch.tensor([PROMPTS[2] + PROMPTS[0]])
    slots = confidence_slots(tokens, mode="full", response_mask=torch.ones_like(tokens, dtype=torch.bool), stop_ids=[EOS])
    fixed = compute_bins(model, tokens, codec=plain, slots=slots)
    single = compute_bins(model, tokens, codec=codec, slots=slots, max_passes=1)
    assert fixed.converged and fixed.passes == 1
    assert torch.equal(fixed.bins, single.bins)
