"""The demo's measurements: trace calibration on hand-made numbers, result digits checked character by
character, the held-out scorer agreeing with lm-eval's gsm8k filter, exact train/decode agreement,
and settings errors that name the bad value."""
from __future__ import annotations

import math

import pytest
import torch

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.demo import DemoSettings, parse_change
from entropy_guided_generation.demo_analysis.agreement import train_decode_agreement
from entropy_guided_generation.demo_analysis.heldout import GSM8K, DecodedSample, decode_heldout
from entropy_guided_generation.demo_analysis.report import digit_view, extreme_bins, trace_calibration
from entropy_guided_generation.demo_analysis.trace import bin_probabilities, bin_signal_bounds, digit_tokens, trace_confidence
from entropy_guided_generation.layout import Interleaving

CONF_STRINGS = [f"<|conf_{k}|>" for k in range(3)]


def codec_of(signal: str, edges: list[float], scale: float = 1.0) -> ConfidenceCodec:
    return ConfidenceCodec(signal=signal, edges=torch.tensor(edges), token_ids=torch.arange(100, 100 + len(edges) + 1), scale=scale)


def sample(bins: list[int], correct: bool, pieces: tuple[str, ...] = ("1",), entropies: tuple[float, ...] = (0.1,)) -> DecodedSample:
    n = len(bins)
    return DecodedSample(
        text="".join(pieces), correct=correct, tokens=list(range(n)), pieces=list(pieces), bins=torch.tensor(bins),
        signal=torch.zeros(n), entropies=torch.tensor(entropies), logprobs=torch.full((n,), -0.1),
        prompt_ids=[1], content_ids=list(range(n)), interleaved=[],
    )


def test_entropy_bins_stand_for_exp_minus_their_midpoint():
    codec = codec_of("entropy", [0.5, 1.5])
    assert bin_signal_bounds(codec).tolist() == [0.0, 0.5, 1.5, 2.5]
    assert torch.allclose(bin_probabilities(codec), torch.exp(-torch.tensor([0.25, 1.0, 2.0], dtype=torch.float64)))


def test_max_prob_bins_stand_for_their_midpoint_in_probability_units():
    assert bin_probabilities(codec_of("max_prob", [0.5])).tolist() == [0.25, 0.75]
    # maxprob_round's edges are in units of 10 p: bin 10 covers [0.95, 1].
    rounded = codec_of("max_prob", [k + 0.5 for k in range(10)], scale=10.0)
    assert math.isclose(float(bin_probabilities(rounded)[10]), 0.975) and math.isclose(float(bin_probabilities(rounded)[0]), 0.025)


def test_trace_confidence_is_the_geometric_mean_of_the_fed_bins():
    probabilities = bin_probabilities(codec_of("entropy", [0.5, 1.5]))
    assert math.isclose(trace_confidence(torch.tensor([0, 2, -1]), probabilities), math.exp(-(0.25 + 2.0) / 2))
    assert math.isclose(trace_confidence(torch.tensor([0, 2, -1]), probabilities, "min"), math.exp(-2.0))
    assert trace_confidence(torch.tensor([-1, -1]), probabilities) is None
    with pytest.raises(ValueError, match="'median'"):
        trace_confidence(torch.tensor([0]), probabilities, "median")
    with pytest.raises(ValueError, match="bin 3"):
        trace_confidence(torch.tensor([3]), probabilities)


def test_trace_calibration_on_a_hand_made_set():
    codec = codec_of("entropy", [0.5, 1.5])
    # Confidences exp(-0.25) = 0.779 (right), exp(-1) = 0.368 (wrong), exp(-2) = 0.135 (wrong).
    samples = [sample([0, 0], True), sample([1], False), sample([2, 2, -1], False)]
    found = trace_calibration(samples, codec)
    assert found["auroc"] == 1.0 and found["accuracy"] == pytest.approx(1 / 3)
    expected_ece = (abs(1 - math.exp(-0.25)) + math.exp(-1.0) + math.exp(-2.0)) / 3
    assert found["ece"] == pytest.approx(expected_ece)


def test_result_digits_are_checked_place_by_place():
    pieces = ["9", " *", " ", "7", " =", " ", "6", "2", "\n", "####", " ", "6", "2", "0"]
    found = [(d.index, d.right) for d in digit_tokens(pieces, target="63")]
    # 9 * 7 = 63: "6" right, "2" wrong; the final answer 620 against 63: "6" right, "2" and "0" wrong.
    assert found == [(6, True), (7, False), (11, True), (12, False), (13, False)]
    # A token holding several digits is wrong when any of them is.
    assert [(d.index, d.right) for d in digit_tokens(["2 + 2 = ", "45"], target=None)] == [(1, False)]


def test_digit_view_reads_the_bin_before_and_after_each_digit():
    pieces = ("1", " +", " ", "1", " =", " ", "3")
    found = digit_view([sample([0, 0, 0, 0, 1, 2, 4], True, pieces, (0.1,) * 6 + (2.0,))], [None], codec_of("entropy", [0.5, 1.5, 2.5, 3.5]))
    assert found["wrong"]["n"] == 1 and found["wrong"]["mean_own_bin"] == 4 and found["wrong"]["mean_prev_bin"] == 2
    assert found["right"]["n"] == 0


def test_extreme_bins_follow_the_signal_direction():
    assert extreme_bins(codec_of("entropy", [0.5, 1.5])) == {"fixed_confident": 0, "fixed_unconfident": 2}
    assert extreme_bins(codec_of("max_prob", [0.3, 0.6])) == {"fixed_confident": 2, "fixed_unconfident": 0}


@pytest.mark.parametrize(
    "text, correct",
    [("3 + 4 = 7\n#### 7", True), ("#### 7.", True), ("#### 1,007", False), ("the answer is 7", False), ("#### 7\n#### 8", True)],
)
def test_heldout_scorer_follows_lm_evals_strict_match(text, correct):
    assert GSM8K.is_correct(text, {"answer": "3 + 4 = 7\n#### 7"}) is correct


@pytest.fixture(scope="module")
def tiny():
    tokenizer = kit.load_tokenizer()
    model = kit.load_torchtune_model(kit.build_tiny_checkpoint()).eval()
    rows = kit.gsm8k_examples(5, seed=3, split="test")
    return model, tokenizer, rows


def quantile_codec(model, tokenizer, rows) -> ConfidenceCodec:
    base = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer)
    tokens = torch.tensor([tokenizer.encode(rows[0]["question"], add_bos=False, add_eos=False)])
    with torch.no_grad():
        signal = base.signal_from_logits(model(tokens))
    return base.with_edges(fit_quantile_edges(signal, base.num_bins), "quantile")


@pytest.mark.parametrize("mode, positions", [("full", "sequential"), ("answer", "sequential"), ("answer", "shared")])
def test_training_rederives_exactly_the_decoded_bins(mode, positions, tiny):
    model, tokenizer, rows = tiny
    codec = quantile_codec(model, tokenizer, rows)
    interleaving = Interleaving.for_tokenizer(mode, tokenizer, positions=positions)
    samples = decode_heldout(model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=codec, max_gen_toks=12, batch_size=2)
    assert len({int(b) for s in samples for b in s.bins}) > 1  # the bins vary, so agreement means something
    exact = train_decode_agreement(model, samples, interleaving=interleaving, codec=codec, pad_id=tokenizer.pad_id, max_passes=None)
    assert exact.equal_fraction == 1.0 and exact.rows_equal_fraction == 1.0 and exact.confidence_tokens > 0
    capped = train_decode_agreement(model, samples, interleaving=interleaving, codec=codec, pad_id=tokenizer.pad_id, max_passes=1)
    assert capped.max_passes == 1 and 0.0 <= capped.equal_fraction <= 1.0


def test_bad_demo_settings_name_the_value():
    with pytest.raises(ValueError, match="'bogus'"):
        DemoSettings(codec="bogus")
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        DemoSettings(steps=0)
    with pytest.raises(ValueError, match="'lr=abc'"):
        parse_change("lr=abc")
    with pytest.raises(ValueError, match="'nope=1'"):
        parse_change("nope=1")
    assert parse_change("lr=0.003") == {"lr": 0.003} and parse_change("codec=entropy_quantile") == {"codec": "entropy_quantile"}
    assert DemoSettings().changes() == "default" and DemoSettings(steps=960, lr=0.003).changes() == "steps=960, lr=0.003"
    assert DemoSettings(steps=960).label().startswith("s960-b16-lr0.001-")


def test_step0_study_measures_each_mode_rows_and_position_rule_against_plain(tiny):
    from entropy_guided_generation.demo_analysis.heldout import heldout_content_loss
    from entropy_guided_generation.demo_analysis.step0 import RowsVariant, step0_study

    model, tokenizer, rows = tiny
    codec = quantile_codec(model, tokenizer, rows)
    before = model.tok_embeddings.weight.detach().clone()
    variants = [RowsVariant("kit", codec, "raw"), RowsVariant("kit", codec, "mean")]
    found = step0_study(model, tokenizer, rows[:3], GSM8K, variants=variants, modes=[("answer", None), ("marker", "####")], batch_size=2)
    # The mean rows are set only for the study: the base's weights are as they were.
    assert torch.equal(model.tok_embeddings.weight, before)
    plain = heldout_content_loss(model, tokenizer, rows[:3], GSM8K, interleaving=Interleaving.for_tokenizer("none", tokenizer), codec=None)
    assert found["plain"] == pytest.approx(plain, abs=1e-5)  # other batches: float sums in another order
    assert [(r["mode"], r["init"], r["positions"]) for r in found["rows"]] == [
        (m, i, p) for m in ("answer", "marker") for i in ("raw", "mean") for p in ("sequential", "shared")
    ]
    raw_answer = heldout_content_loss(model, tokenizer, rows[:3], GSM8K, interleaving=Interleaving.for_tokenizer("answer", tokenizer), codec=codec)
    assert found["rows"][0]["content_loss"] == pytest.approx(raw_answer, abs=1e-5)
    for row in found["rows"]:
        assert row["excess"] == pytest.approx(row["content_loss"] - found["plain"]) and math.isfinite(row["content_loss"])
    # Mean rows change what the model reads: another loss than its raw rows.
    assert found["rows"][2]["content_loss"] != pytest.approx(found["rows"][0]["content_loss"])
    with pytest.raises(ValueError, match="'none'"):
        step0_study(model, tokenizer, rows[:1], GSM8K, variants=variants, modes=[("none", None)])
    with pytest.raises(ValueError, match="'zero'"):
        RowsVariant("kit", codec, "zero")


def test_single_pass_mismatch_counts_the_slot_bins_one_plain_pass_gets_wrong(tiny):
    from entropy_guided_generation.demo_analysis.agreement import single_pass_mismatch
    from entropy_guided_generation.demo_analysis.heldout import reference_batch
    from entropy_guided_generation.layout import compute_bins

    model, tokenizer, rows = tiny
    codec = quantile_codec(model, tokenizer, rows)
    interleaving = Interleaving.for_tokenizer("full", tokenizer)
    found = single_pass_mismatch(model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=codec, batch_size=2)
    # The same count by hand over the same batches of two rows (exact bins at an edge may flip with
    # the batch's padding, so one batch of every row is not the same computation).
    differ = total = 0
    for start in range(0, len(rows), 2):
        tokens, response, valid = reference_batch(tokenizer, rows[start : start + 2], GSM8K)
        slots = interleaving.slots(tokens, response_mask=response, valid_mask=valid)
        kw = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=tokenizer.pad_id)
        exact, single = compute_bins(model, tokens, **kw), compute_bins(model, tokens, max_passes=1, **kw)
        differ, total = differ + int((exact.bins[slots] != single.bins[slots]).sum()), total + int(slots.sum())
    assert found.slots == total > 0 and found.rows == len(rows) > 2
    assert found.share == pytest.approx(differ / total)
    assert found.exact_passes_mean >= 1
    with pytest.raises(ValueError, match="'none'"):
        single_pass_mismatch(model, tokenizer, rows, GSM8K, interleaving=Interleaving.for_tokenizer("none", tokenizer), codec=codec)


def test_single_pass_mismatch_measures_a_plain_context_codec_against_the_interleaved_fixed_point(tiny):
    import dataclasses

    from entropy_guided_generation.demo_analysis.agreement import single_pass_mismatch

    model, tokenizer, rows = tiny
    codec = quantile_codec(model, tokenizer, rows)
    interleaving = Interleaving.for_tokenizer("full", tokenizer)
    plain = dataclasses.replace(codec, context="plain")
    found = single_pass_mismatch(model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=codec)
    assert found.share > 0  # one plain pass misses some bins here, so a plain codec's own bins (share 0) would show
    assert single_pass_mismatch(model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=plain) == single_pass_mismatch(
        model, tokenizer, rows, GSM8K, interleaving=interleaving, codec=codec
    )
