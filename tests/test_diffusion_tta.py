"""TTA uncertainty remasking (``generate_with_tta_uncertainty``): forward cost, logs, invariants,
freeze window, remask budget, dropout mode, constraint checks, constraint functions, and the
uncertainty score that ranks remasking against a reference recomputed from each step's raw inputs."""
from __future__ import annotations

import pytest
import torch

from diffusion_models import MASK_ID, PAD_ID, CountingModel, ScriptedModel, random_predictor
from entropy_guided_generation.diffusion import balanced_brackets, generate_with_tta_uncertainty, no_repeat_ngrams
from entropy_guided_generation.diffusion.tta import FreezeWindow, TTAOptions, remask_counts

PROMPTS = torch.tensor([[PAD_ID, PAD_ID, 5, 9, 2], [3, 4, 7, 8, 6]])
LAYOUT = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK_ID)


@pytest.fixture(scope="module")
def predictor():
    return random_predictor(seed=1)


@pytest.mark.parametrize(
    "perturbation, rows_per_forward, nfe_per_step",
    [({}, 2, 1), ({"tta_use_dropout": True}, 2 * 5, 5), ({"tta_mask_ratio": 0.5}, 2 * 5, 5)],
    ids=["temperature", "dropout", "input-remasking"],
)
def test_one_forward_per_step_of_b_or_k_times_b_rows(predictor, perturbation, rows_per_forward, nfe_per_step):
    counting = CountingModel(predictor)
    tokens, logs = generate_with_tta_uncertainty(counting, PROMPTS, tta_k=5, remask_top_pct=0.25, seed=0, **LAYOUT, **perturbation)
    assert len(counting.inputs) == LAYOUT["steps"] == logs["total_steps"]
    assert {tuple(x.shape) for x in counting.inputs} == {(rows_per_forward, PROMPTS.shape[1] + LAYOUT["gen_length"])}
    assert logs["nfe"] == nfe_per_step * LAYOUT["steps"]
    assert set(logs["tta_stats"]) == {"avg_entropy_per_step", "avg_disagreement_per_step", "remask_ratio_per_step", "frozen_ratio_per_step"}
    assert all(len(v) == LAYOUT["steps"] for v in logs["tta_stats"].values())
    assert torch.equal(tokens[:, : PROMPTS.shape[1]], PROMPTS), "the prompt must never change"
    assert not bool((tokens == MASK_ID).any()), "no mask token may remain"
    assert max(logs["tta_stats"]["remask_ratio_per_step"]) > 0, "TTA must revisit some committed tokens"


def test_input_remasking_hides_only_committed_generated_tokens(predictor):
    counting = CountingModel(predictor)
    generate_with_tta_uncertainty(counting, PROMPTS, tta_k=3, tta_mask_ratio=0.5, seed=0, **LAYOUT)
    p = PROMPTS.shape[1]
    for step, x in enumerate(counting.inputs[2:], start=2):  # from step 2 on, round(0.5 x committed) >= 1
        views = x.view(3, *PROMPTS.shape[:1], -1)
        assert torch.equal(views[:, :, :p], PROMPTS.expand(3, -1, -1)), "views never mask the prompt"
        canvas_masked = (views == MASK_ID).all(dim=0)  # masked in the canvas itself: masked in every view
        extra = (views == MASK_ID) & ~canvas_masked
        assert bool(extra.any()), f"step {step}: input re-masking hid no committed token"


def test_seed_makes_runs_repeatable_and_leaves_global_rng_alone(predictor):
    state = torch.random.get_rng_state()
    a = generate_with_tta_uncertainty(predictor, PROMPTS, tta_k=3, tta_temperature_range=(0.5, 1.5), seed=3, **LAYOUT)
    b = generate_with_tta_uncertainty(predictor, PROMPTS, tta_k=3, tta_temperature_range=(0.5, 1.5), seed=3, **LAYOUT)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(torch.random.get_rng_state(), state)


def flipping_model(flip_position: int):
    """Confident (token 1) everywhere except at ``flip_position``, where tokens 2 and 3 are nearly
    tied (entropy ~ ln 2) and the winner alternates every two calls: a token recommitted every
    other step flips each time."""

    def logits_fn(call: int, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, MASK_ID + 1)
        logits[..., 1] = 10.0
        winner, loser = (2, 3) if (call // 2) % 2 == 0 else (3, 2)
        logits[:, flip_position, 1] = 0.0
        logits[:, flip_position, winner] = 5.1
        logits[:, flip_position, loser] = 5.0
        return logits

    return ScriptedModel(logits_fn)


def flip_position_masked_per_call(freeze_threshold: int) -> list[bool]:
    p = PROMPTS.shape[1]
    model = flipping_model(p)
    _, logs = generate_with_tta_uncertainty(
        model, PROMPTS[:1], steps=16, gen_length=4, block_length=4, mask_id=MASK_ID, tta_k=1,
        tta_temperature_range=(0.0, 0.0), alpha_entropy=1.0, beta_disagreement=0.0, lambda_change=0.0,
        remask_top_k=1, freeze_window=5, freeze_threshold=freeze_threshold, freeze_duration=3,
    )
    return [bool(x[0, p] == MASK_ID) for x in model.inputs], logs


def test_freeze_window_blocks_a_token_that_flips_threshold_times():
    # The uncertain position is committed last (step 3, call 3), then remasked at every step where
    # it is eligible (4, 6, 8, ...) and recommitted at the next (5, 7, ...), flipping each time.
    free, free_logs = flip_position_masked_per_call(freeze_threshold=100)
    assert [i for i, masked in enumerate(free) if masked and i >= 4] == [0 + i for i in range(5, 16, 2)]
    frozen, logs = flip_position_masked_per_call(freeze_threshold=2)
    # Flips at steps 5 and 7 (both in the 5-step window) freeze it at step 7 for steps 7, 8, 9:
    # not remasked at step 8, so call 9 sees it committed; eligible again at step 10 (seen at call 11).
    masked_calls = [i for i, masked in enumerate(frozen) if masked and i >= 4]
    assert 9 not in masked_calls and 11 in masked_calls and masked_calls[:2] == [5, 7]
    assert logs["tta_stats"]["frozen_ratio_per_step"][8] == pytest.approx(0.25)
    assert max(free_logs["tta_stats"]["frozen_ratio_per_step"]) == 0


def test_freeze_window_counts_only_flips_within_the_window():
    window = FreezeWindow((1, 2), window=3, threshold=2, duration=2, device=torch.device("cpu"))
    commit = torch.tensor([[True, False]])
    for step, token in enumerate([4, 5, 5, 5, 6]):  # flips at steps 1 and 4: 3 steps apart, window 3
        window.record_commits(step, commit, torch.tensor([[token, 0]]))
        assert not bool(window.frozen(step).any()), f"step {step}"
    window.record_commits(5, commit, torch.tensor([[7, 0]]))  # flips at 4 and 5: freeze for steps 5, 6
    assert window.frozen(5).tolist() == [[True, False]] and window.frozen(6).tolist() == [[True, False]]
    assert window.frozen(7).tolist() == [[False, False]]


def test_remask_top_k_overrides_top_pct(predictor):
    eligible = torch.tensor([[True] * 10, [True] * 3 + [False] * 7, [False] * 10])
    assert remask_counts(eligible, TTAOptions(remask_top_k=2, remask_top_pct=0.9)).tolist() == [2, 2, 0]
    assert remask_counts(eligible, TTAOptions(remask_top_pct=0.5)).tolist() == [5, 1, 0]
    _, logs = generate_with_tta_uncertainty(predictor, PROMPTS, tta_k=2, remask_top_k=2, remask_top_pct=0.9, seed=0, steps=8, gen_length=8, block_length=8, mask_id=MASK_ID)
    remasked = [round(r * 2 * 8) for r in logs["tta_stats"]["remask_ratio_per_step"]]
    assert max(remasked) == 2 * 2 and remasked[-1] == 0, remasked


@pytest.mark.parametrize("train_mode", [False, True])
def test_dropout_runs_in_train_mode_and_the_callers_mode_is_restored(train_mode):
    model = random_predictor(seed=2).train(train_mode)
    counting = CountingModel(model)
    generate_with_tta_uncertainty(counting, PROMPTS, tta_k=3, tta_use_dropout=True, seed=0, **LAYOUT)
    assert all(all(modes) and modes for modes in counting.dropout_modes), "every dropout module must be in train mode during the views"
    assert all(m.training == train_mode for m in model.modules())


def test_dropout_views_change_the_forward_and_need_a_dropout_module(predictor):
    options = dict(tta_k=4, tta_temperature_range=(0.0, 0.0), seed=0, **LAYOUT)
    _, plain = generate_with_tta_uncertainty(predictor, PROMPTS, **options)
    _, dropout = generate_with_tta_uncertainty(predictor, PROMPTS, tta_use_dropout=True, **options)
    assert max(plain["tta_stats"]["avg_disagreement_per_step"]) == 0, "temperature-0 views of one forward agree"
    assert dropout["tta_stats"]["avg_entropy_per_step"][0] != plain["tta_stats"]["avg_entropy_per_step"][0], "dropout views must change the forward"
    no_dropout = random_predictor(seed=0, dropout=0.0)
    with pytest.raises(ValueError, match="tta_use_dropout=True but the model .* has no torch.nn dropout module"):
        generate_with_tta_uncertainty(no_dropout, PROMPTS, tta_use_dropout=True, **LAYOUT)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: torch.zeros(t.shape[0], t.shape[1] - 1), r"returned shape \(2, 12\) and dtype torch.float32; expected shape \(2, 13\)"),
        (lambda t: torch.zeros(t.shape, dtype=torch.float64), r"returned shape \(2, 13\) and dtype torch.float64; expected shape \(2, 13\) .* and dtype torch.float32"),
    ],
)
def test_constraint_fn_with_wrong_shape_or_dtype_is_an_error_naming_both(predictor, bad, message):
    with pytest.raises(ValueError, match=message):
        generate_with_tta_uncertainty(predictor, PROMPTS, constraint_fn=bad, **LAYOUT)


def test_constraint_violations_steer_remasking():
    # All positions equally certain; the constraint marks one generated position as violating:
    # with remask_top_k=1 that position is the one remasked (seen masked at the next call).
    p = PROMPTS.shape[1]
    model = ScriptedModel(lambda call, tokens: torch.zeros(*tokens.shape, MASK_ID + 1).index_fill_(-1, torch.tensor([1]), 8.0))
    target = p + 2

    def constraint(tokens: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(tokens.shape, dtype=torch.float32)
        scores[:, target] = 5.0
        return scores

    generate_with_tta_uncertainty(model, PROMPTS[:1], steps=8, gen_length=4, block_length=4, mask_id=MASK_ID, tta_k=1, remask_top_k=1, constraint_fn=constraint)
    after_full = [x for x in model.inputs[4:]]
    assert after_full and all(bool(x[0, target] == MASK_ID) for x in after_full[::2])


def test_no_repeat_ngrams_marks_the_end_of_every_repeated_ngram():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 1, 2], [5, 5, 5, 5, 0, 0, 0, 0, 0]])
    assert no_repeat_ngrams(tokens, n=2).tolist() == [[0, 0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0, 1, 1, 1]]
    assert no_repeat_ngrams(tokens, n=2, ignore_ids=[0])[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert no_repeat_ngrams(tokens, n=3).dtype == torch.float32


def test_balanced_brackets_counts_unmatched_openers_and_closers():
    depth_change = torch.tensor([0, 1, -1, 2])  # token 1 "(", token 2 ")", token 3 "(("
    tokens = torch.tensor([[1, 0, 2, 2, 1, 0], [3, 2, 0, 0, 0, 0], [1, 2, 1, 2, 0, 0]])
    assert balanced_brackets(tokens, depth_change).tolist() == [[0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0] * 6]


def test_views_sample_softmax_at_their_temperature_and_argmax_at_zero():
    from entropy_guided_generation.diffusion.tta import sample_views

    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, float("-inf")]).expand(1, 4000, 1, 4)
    samples = sample_views(logits, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    assert samples.shape == (3, 4000, 1) and bool((samples[0] == 2).all())
    for view, temperature in ((1, 1.0), (2, 0.5)):
        frequencies = torch.bincount(samples[view].flatten(), minlength=4).float() / 4000
        expected = torch.softmax(logits[0, 0, 0] / temperature, dim=-1)
        assert torch.allclose(frequencies, expected, atol=0.03), (temperature, frequencies, expected)


def test_remasking_ranks_by_the_reference_uncertainty_of_seed_004(predictor, monkeypatch):
    """Through ``generate_with_tta_uncertainty``: the scores that choose what to remask equal, at every
    eligible position of every step, alpha * H(mean of the views' softmax) + beta * share of views
    disagreeing with the consensus + gamma * violation - lambda * flip rate, each term recomputed here
    from the step's raw inputs (views' logits and samples, the constraint's output, the flip history).
    Distinct weights and terms that all vary make a dropped weight, a swapped one or a flipped
    penalty sign fail."""
    from entropy_guided_generation.diffusion import tta

    weights = dict(alpha_entropy=0.7, beta_disagreement=1.3, gamma_violation=0.45, lambda_change=2.1)
    seen = {"views": [], "samples": [], "violations": [], "flip_rates": [], "scores": []}
    real_sample, real_summarize, real_top_k = tta.sample_views, tta.summarize_views, tta.top_k_per_row
    real_flip_rate = tta.FreezeWindow.flip_rate

    def sample_spy(logits, temperatures):
        samples = real_sample(logits, temperatures)
        seen["samples"].append(samples)
        return samples

    def summarize_spy(logits, temperatures):
        views = real_summarize(logits, temperatures)
        seen["views"].append((logits.clone(), views.consensus.clone()))
        return views

    def flip_rate_spy(self):
        rate = real_flip_rate(self)
        seen["flip_rates"].append(rate.clone())
        return rate

    calls = []

    def top_k_spy(scores, counts):
        calls.append(scores.clone())  # per step: the commit ranking, then the remask ranking
        return real_top_k(scores, counts)

    def constraint(tokens):
        scores = ((tokens * 7 + torch.arange(tokens.shape[1])) % 5 == 0).float()
        seen["violations"].append(scores)
        return scores

    monkeypatch.setattr(tta, "sample_views", sample_spy)
    monkeypatch.setattr(tta, "summarize_views", summarize_spy)
    monkeypatch.setattr(tta, "top_k_per_row", top_k_spy)
    monkeypatch.setattr(tta.FreezeWindow, "flip_rate", flip_rate_spy)
    generate_with_tta_uncertainty(
        predictor, PROMPTS, steps=16, gen_length=8, block_length=8, mask_id=MASK_ID, tta_k=4,
        tta_temperature_range=(0.5, 2.0), remask_top_k=3, constraint_fn=constraint, seed=3, freeze_threshold=9, **weights,
    )
    p = PROMPTS.shape[1]
    remask_scores = calls[1::2]
    assert len(remask_scores) == len(seen["views"]) == 16
    used = {"disagreement": 0, "violation": 0, "flip": 0}
    for step, scores in enumerate(remask_scores):
        logits, consensus = seen["views"][step]
        mean_p = torch.softmax(logits.double(), dim=-1).mean(dim=0)  # [b, n, v]
        entropy = -(mean_p * torch.where(mean_p > 0, mean_p.log(), torch.zeros_like(mean_p))).sum(-1)
        disagreement = (seen["samples"][step] != consensus).double().mean(dim=0)
        n = scores.shape[1]
        violation = seen["violations"][step][:, p : p + n].double()
        flips = seen["flip_rates"][step][:, :n].double()
        reference = (weights["alpha_entropy"] * entropy + weights["beta_disagreement"] * disagreement
                     + weights["gamma_violation"] * violation - weights["lambda_change"] * flips)
        eligible = torch.isfinite(scores)
        torch.testing.assert_close(scores[eligible].double(), reference[eligible], atol=1e-5, rtol=0)
        used["disagreement"] += int((disagreement[eligible] > 0).sum())
        used["violation"] += int((violation[eligible] > 0).sum())
        used["flip"] += int((flips[eligible] > 0).sum())
    assert all(count > 0 for count in used.values()), f"a term never mattered at an eligible position: {used}"
