"""The confidence core: signal, codec, layouts, fixed-point bins, metadata."""
from __future__ import annotations

import json

import math

import pytest
import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import (
    ConfidenceCodec,
    check_config_matches,
    fit_quantile_edges,
    read_confidence_json,
    write_confidence_json,
)
from entropy_guided_generation.layout import (
    IGNORE_INDEX,
    compute_bins,
    confidence_slots,
    interleave,
    strip_confidence,
)
from entropy_guided_generation.modeling import logits_of

from helpers import tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))  # the last 11 ids are the confidence tokens
EOS = 1


def codec_with_edges(edges, **kw) -> ConfidenceCodec:
    return ConfidenceCodec(signal="entropy", edges=torch.tensor(edges), token_ids=torch.tensor(CONF_IDS), **kw)


# ------------------------------------------------------------------ signal
def test_entropy_masks_confidence_ids_and_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, VOCAB)
    h = signals.entropy(logits, temperature=0.7, exclude_ids=CONF_IDS)
    z = logits[..., : VOCAB - 11] / 0.7  # conf ids are the tail: dropping them == masking them
    p = z.softmax(-1)
    assert torch.allclose(h, -(p * p.log()).sum(-1), atol=1e-5)
    mp = signals.max_prob(logits, temperature=0.7, exclude_ids=CONF_IDS)
    assert torch.allclose(mp, p.amax(-1), atol=1e-6)
    v = signals.varentropy(logits, exclude_ids=CONF_IDS)
    q = logits[..., : VOCAB - 11].softmax(-1)
    hq = -(q * q.log()).sum(-1, keepdim=True)
    assert torch.allclose(v, (q * (q.log() + hq) ** 2).sum(-1), atol=1e-4)


def test_float64_signal_on_request():
    logits = torch.randn(2, VOCAB)
    assert signals.entropy(logits, dtype=torch.float64).dtype == torch.float64
    codec = codec_with_edges([1.0] * 0 + [float(k) for k in range(1, 11)], compute_dtype=torch.float64)
    assert codec.signal_from_logits(logits).dtype == torch.float64


def test_non_finite_logits_name_row_and_position():
    logits = torch.zeros(2, 4, VOCAB)
    logits[1, 3, 5] = float("nan")
    codec = codec_with_edges([float(k) for k in range(1, 11)])
    with pytest.raises(FloatingPointError, match=r"row 1, position 3"):
        codec.signal_from_logits(logits)


# ------------------------------------------------------------------ presets
def _public_entropy_bin(h: torch.Tensor) -> torch.Tensor:
    """The public CaC code's discretize_entropy, as a bin index."""
    return torch.round(h).to(torch.int).clamp(max=10).long()


def _public_maxprob_bin(p: torch.Tensor) -> torch.Tensor:
    return torch.round(p * 10).to(torch.int).clamp(max=10).long()


def test_entropy_round_preset_reproduces_public_bins_at_every_boundary():
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS})
    halves = torch.arange(0, 25, dtype=torch.float32) / 2  # 0, 0.5, ..., 12
    eps = torch.tensor(1e-6)
    values = torch.cat([halves, halves + eps, (halves - eps).clamp(min=0), torch.tensor([100.0])])
    assert torch.equal(codec.bins_from_signal(values), _public_entropy_bin(values))


def test_maxprob_round_preset_reproduces_public_bins_at_every_decile_boundary():
    codec = ConfidenceCodec.from_config({"signal": "max_prob", "edges": {"scheme": "maxprob_round"}, "token_ids": CONF_IDS})
    deciles = torch.arange(0, 21, dtype=torch.float32) / 20  # 0, 0.05, ..., 1
    values = torch.cat([deciles, (deciles + 1e-6).clamp(max=1), (deciles - 1e-6).clamp(min=0)])
    assert torch.equal(codec.bins_from_signal(values), _public_maxprob_bin(values))


def test_binning_is_number_of_edges_at_or_below_signal():
    codec = codec_with_edges([0.5 * k for k in range(1, 11)])
    s = torch.tensor([0.0, 0.49, 0.5, 0.51, 4.99, 5.0, 9.0])
    assert codec.bins_from_signal(s).tolist() == [0, 0, 1, 1, 9, 10, 10]


def test_uniform_and_quantile_edges():
    uni = ConfidenceCodec.from_config({"signal": "max_prob", "edges": {"scheme": "uniform"}, "token_ids": CONF_IDS[:4]})
    assert torch.allclose(uni.edges, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    values = torch.arange(1000, dtype=torch.float64) / 100
    edges = fit_quantile_edges(values, 4)
    counts = torch.bincount(torch.bucketize(values, edges, right=True), minlength=4)
    assert counts.tolist() == [250, 250, 250, 250]
    with pytest.raises(ValueError, match="ties"):
        fit_quantile_edges(torch.zeros(100), 4)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"signal": "entropy", "edges": {"scheme": "qantile"}, "token_ids": CONF_IDS}, "unknown confidence.edges.scheme 'qantile'"),
        ({"signal": "entropy", "edges": {"scheme": "explicit", "values": [1.0, 0.5]}, "token_ids": CONF_IDS[:3]}, "strictly ascending"),
        ({"signal": "entropy", "edges": {"scheme": "explicit", "values": [1.0, 2.0]}, "token_ids": CONF_IDS[:4]}, "K = len"),
        ({"signal": "entropie", "token_ids": CONF_IDS}, "unknown confidence.signal 'entropie'"),
        ({"signal": "entropy", "token_ids": [3, 4, 999]}, "outside the vocabulary"),
        ({"tokens": {"preset": "kit", "count": 5}}, r"a mapping takes exactly one of 'preset' \(one of kit, llama3_reserved, digits, smollm2_unused\) or 'add'"),
    ],
)
def test_bad_codec_configs_name_the_bad_value(cfg, message):
    with pytest.raises(ValueError, match=message):
        ConfidenceCodec.from_config(cfg, vocab_size=VOCAB)


class _WordTokenizer:
    """A torchtune-style tokenizer over whitespace words, for resolution tests."""

    special_tokens = {"<|conf_0|>": 60, "<|conf_1|>": 61}

    def encode(self, text, add_bos=False, add_eos=False):
        return [hash(w) % 50 for w in text.split()]


def test_token_string_that_is_not_one_id_is_an_error():
    tok = _WordTokenizer()
    with pytest.raises(ValueError, match=r"'two words' must encode to exactly one id"):
        ConfidenceCodec.from_config(
            {"tokens": ["<|conf_0|>", "two words"], "edges": {"scheme": "explicit", "values": [1.0]}}, tokenizer=tok
        )
    codec = ConfidenceCodec.from_config(
        {"tokens": ["<|conf_0|>", "<|conf_1|>"], "edges": {"scheme": "explicit", "values": [1.0]}}, tokenizer=tok
    )
    assert codec.token_ids.tolist() == [60, 61]
    with pytest.raises(ValueError, match="outside the model's vocabulary of 61"):
        ConfidenceCodec.from_config(
            {"tokens": ["<|conf_0|>", "<|conf_1|>"], "edges": {"scheme": "explicit", "values": [1.0]}},
            tokenizer=tok,
            vocab_size=61,
        )


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match="unknown interleaving.mode 'answr'; expected one of none, full, answer, marker"):
        confidence_slots(torch.zeros(1, 3, dtype=torch.long), mode="answr")


# ------------------------------------------------------------------ layouts
def _batch():
    # right-padded rows: prompt (3 / 2 tokens), response ending in EOS, pad 0.
    tokens = torch.tensor([[5, 6, 7, 20, 30, 21, 22, EOS, 0], [8, 9, 23, 30, 31, 24, EOS, 0, 0]])
    valid = tokens != 0
    response = torch.zeros_like(valid)
    response[0, 3:8] = True
    response[1, 2:7] = True
    return tokens, valid, response


def test_answer_layout_interleaves_response_only_and_skips_eos():
    tokens, valid, response = _batch()
    slots = confidence_slots(tokens, mode="answer", response_mask=response, valid_mask=valid, stop_ids=[EOS])
    assert slots[0].tolist() == [False] * 3 + [True] * 4 + [False] * 2
    conf = torch.full_like(tokens, CONF_IDS[0])
    out = interleave(tokens, slots, conf, labels=tokens, valid_mask=valid)
    assert out.tokens[0, :12].tolist() == [5, 6, 7, 20, 53, 30, 53, 21, 53, 22, 53, EOS]
    assert torch.equal(out.strip(), tokens)
    # labels never target a confidence token; content labels kept.
    assert (out.labels[out.is_confidence] == IGNORE_INDEX).all()
    assert not torch.isin(out.labels, torch.tensor(CONF_IDS)).any()
    assert torch.equal(strip_confidence(out.tokens, out.is_confidence)[:, : tokens.shape[1]], tokens)


def test_full_layout_skips_only_the_first_token_and_eos():
    tokens, valid, response = _batch()
    slots = confidence_slots(tokens, mode="full", valid_mask=valid, stop_ids=[EOS])
    assert slots[1].tolist() == [False, True, True, True, True, True, False, False, False]


@pytest.mark.parametrize(
    "marker, expected_last_slot",
    [([30], 4), ([21, 22], 6), ([99], 6)],  # found once, two-token marker, absent -> whole response
)
def test_marker_layout(marker, expected_last_slot):
    tokens, valid, response = _batch()
    slots = confidence_slots(tokens, mode="marker", response_mask=response, valid_mask=valid, stop_ids=[EOS], marker_ids=marker)
    assert int(slots[0].nonzero().max()) == expected_last_slot
    assert int(slots[0].nonzero().min()) == 3


def test_marker_in_prompt_only_counts_as_absent():
    tokens = torch.tensor([[30, 6, 20, 21, EOS]])
    response = torch.tensor([[False, False, True, True, True]])
    slots = confidence_slots(tokens, mode="marker", response_mask=response, stop_ids=[EOS], marker_ids=[30])
    assert slots[0].tolist() == [False, False, True, True, False]


def test_marker_at_the_end_of_the_response():
    tokens = torch.tensor([[5, 20, 21, 30]])
    response = torch.tensor([[False, True, True, True]])
    slots = confidence_slots(tokens, mode="marker", response_mask=response, marker_ids=[30])
    assert slots[0].tolist() == [False, True, True, True]


def test_left_padded_interleave_ends_every_row_at_the_last_column():
    tokens = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    valid = tokens != 0
    slots = confidence_slots(tokens, mode="full", valid_mask=valid)
    out = interleave(tokens, slots, torch.full_like(tokens, 60), valid_mask=valid, left_pad=True)
    assert out.tokens[0].tolist() == [0, 0, 0, 0, 5, 6, 60, 7, 60]
    assert out.tokens[1].tolist() == [8, 9, 60, 10, 60, 11, 60, 12, 60]
    assert torch.equal(out.strip(), tokens)
    assert out.valid_mask[:, -1].all()


# ------------------------------------------------------------------ fixed point == sequential
def sequential_bins(model, tokens, slots, codec):
    """Reference: build the interleaved row token by token, one forward per slot."""
    seq: list[int] = []
    bins = []
    for t, tok in enumerate(tokens.tolist()):
        if bool(slots[t]):
            logits = logits_of(model, torch.tensor([seq]))[0, -1]
            b = int(codec.bins_from_signal(codec.signal_from_logits(logits)))
            seq += [tok, int(codec.token_ids[b])]
            bins.append(b)
        else:
            seq.append(tok)
            bins.append(-1)
    return torch.tensor(bins), torch.tensor(seq)


def edges_between_values(edges: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Move each edge to the midpoint between the data values around it. A quantile edge equals a
    data value, and a signal lying exactly on an edge would make the comparison hinge on the last
    float bit of a batched (padded) forward vs an unbatched one; real data never sit exactly there."""
    distinct = torch.unique(values.double())
    above = torch.searchsorted(distinct, edges.double()).clamp(1, distinct.numel() - 1)
    return (distinct[above - 1] + distinct[above]) / 2


@pytest.mark.parametrize("mode", ["full", "answer", "marker"])
def test_fixed_point_bins_equal_sequential_reference(mode):
    model = tiny_decoder(VOCAB, seed=1, weight_scale=3.0)
    g = torch.Generator().manual_seed(2)
    b, n = 3, 14
    tokens = torch.randint(2, VOCAB - 11, (b, n), generator=g)
    lengths = torch.tensor([14, 11, 9])
    valid = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    tokens[1, 10] = EOS
    response = valid & (torch.arange(n).unsqueeze(0) >= torch.tensor([[4], [3], [5]]))
    marker = [int(tokens[0, 8])]
    slots = confidence_slots(tokens, mode=mode, response_mask=response, valid_mask=valid, stop_ids=[EOS], marker_ids=marker)
    # Edges at quantiles of the plain signals, so bins really vary and interleaving changes them.
    plain = logits_of(model, tokens)
    values = signals.entropy(plain, exclude_ids=CONF_IDS)[valid]
    codec = codec_with_edges(edges_between_values(fit_quantile_edges(values, 11), values).tolist())
    result = compute_bins(model, tokens, codec=codec, slots=slots, valid_mask=valid, max_passes=n + 1)
    assert result.converged and result.changed_fraction == 0.0
    for row in range(b):
        ref_bins, ref_seq = sequential_bins(model, tokens[row, : lengths[row]], slots[row, : lengths[row]], codec)
        assert torch.equal(result.bins[row, : lengths[row]], ref_bins), f"row {row}"
        got = result.interleaved.tokens[row][result.interleaved.valid_mask[row]]
        assert torch.equal(got, ref_seq), f"row {row}"
    # More than one pass was needed: the test exercises the iteration, not just pass 0.
    assert result.passes > 2


def test_fixed_point_left_padded_equals_right_padded():
    model = tiny_decoder(VOCAB, seed=3, weight_scale=3.0)
    right = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    left = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]])
    codec = codec_with_edges([0.3 * k for k in range(1, 11)])
    r = compute_bins(model, right, codec=codec, slots=confidence_slots(right, mode="full", valid_mask=right != 0), valid_mask=right != 0, max_passes=8)
    l = compute_bins(model, left, codec=codec, slots=confidence_slots(left, mode="full", valid_mask=left != 0), max_passes=8, left_pad=True)
    assert torch.equal(r.bins[1, :3], l.bins[1, 3:])
    assert torch.equal(r.bins[0], l.bins[0])


def test_max_passes_caps_the_work_and_reports_changes():
    model = tiny_decoder(VOCAB, seed=1, weight_scale=3.0)
    tokens = torch.randint(2, VOCAB - 11, (2, 16), generator=torch.Generator().manual_seed(0))
    codec = codec_with_edges([0.25 * k + 2.0 for k in range(1, 11)])
    slots = confidence_slots(tokens, mode="full")
    one = compute_bins(model, tokens, codec=codec, slots=slots, max_passes=1)
    assert one.passes == 1 and not one.converged and math.isnan(one.changed_fraction)


# ------------------------------------------------------------------ metadata
def test_confidence_json_round_trip_and_mismatch_error(tmp_path):
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS})
    write_confidence_json(tmp_path, codec, mode="marker", marker="####")
    meta = read_confidence_json(tmp_path)
    back = meta.to_codec()
    assert torch.equal(back.edges, codec.edges) and torch.equal(back.token_ids, codec.token_ids)
    values = torch.arange(0, 25, dtype=torch.float32) / 2
    assert torch.equal(back.bins_from_signal(values), codec.bins_from_signal(values))
    check_config_matches(meta, mode="marker", codec=codec, marker="####")
    with pytest.raises(ValueError, match=r"interleaving.mode is 'full' but confidence.json says 'marker'"):
        check_config_matches(meta, mode="full")


def test_signal_context_round_trips_and_a_mismatch_is_refused_naming_both(tmp_path):
    """``confidence.context`` is part of the codec: confidence.json records it, a checkpoint's codec
    carries it back, and a config that contradicts it is refused naming both values. Files written
    before it existed read as ``interleaved``."""
    plain = ConfidenceCodec.from_config(
        {"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS, "context": "plain"}
    )
    assert plain.context == "plain" and plain.with_edges(plain.edges).context == "plain"
    write_confidence_json(tmp_path, plain, mode="answer")
    meta = read_confidence_json(tmp_path)
    assert meta.context == "plain" and meta.to_codec().context == "plain"
    interleaved = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS})
    assert interleaved.context == "interleaved"
    with pytest.raises(ValueError, match=r"config confidence.context is 'interleaved' but confidence.json says 'plain'"):
        check_config_matches(meta, codec=interleaved)
    old = json.loads((tmp_path / "confidence.json").read_text())
    del old["context"]
    (tmp_path / "confidence.json").write_text(json.dumps(old))
    assert read_confidence_json(tmp_path).to_codec().context == "interleaved"
    with pytest.raises(ValueError, match=r"unknown confidence.context 'prefix'; expected one of interleaved, plain"):
        ConfidenceCodec.from_config({"signal": "entropy", "token_ids": CONF_IDS, "context": "prefix"})


def test_metadata_without_a_codec_records_the_mode_and_refuses_to_build_one(tmp_path):
    """A mode-none finetune without a confidence section: mode recorded, codec fields null."""
    path = write_confidence_json(tmp_path, None, mode="none")
    meta = read_confidence_json(path)
    assert meta.mode == "none" and not meta.has_codec and meta.token_ids is None and meta.edges is None
    check_config_matches(meta, mode="none")
    with pytest.raises(ValueError, match=r"interleaving.mode is 'answer' but confidence.json says 'none'"):
        check_config_matches(meta, mode="answer")
    with pytest.raises(ValueError, match=r"mode 'none'\) records no confidence codec"):
        meta.to_codec()
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS})
    with pytest.raises(ValueError, match="config gives a confidence codec but confidence.json records none"):
        check_config_matches(meta, codec=codec)


def test_truncated_or_foreign_confidence_json_names_the_file(tmp_path):
    codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "token_ids": CONF_IDS})
    path = write_confidence_json(tmp_path, codec, mode="answer")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON .*truncated"):
        read_confidence_json(tmp_path)
    path.write_text(text.replace('"mode"', '"moed"'))
    with pytest.raises(ValueError, match=rf"{path} is not confidence metadata .*unknown fields \['moed'\]; missing fields \['mode'\]"):
        read_confidence_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} holds a list"):
        read_confidence_json(path)
