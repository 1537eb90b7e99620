"""The scaling-function registry: built-ins, decorators, user registration, errors."""
from __future__ import annotations

import pytest

from entropy_guided_generation.sampling import scalers
from entropy_guided_generation.sampling.scalers import (
    checked_decision,
    get_scale_func,
    last_k_count,
    register,
    scale_func_names,
    scale_token_only,
    should_continue_scaling,
)

WAIT = [427]


def test_default_always_continues_with_the_given_token():
    scale = get_scale_func("default")
    assert scale(0, [], [], WAIT) == (True, WAIT)
    assert scale(7, [1, 2], [0.0, 0.0], [5, 6]) == (True, [5, 6])


@pytest.mark.parametrize(
    "entropies, expected",
    [([0.6, 0.6], True), ([0.5, 0.5], True), ([0.4, 0.4], False)],
)
def test_entropy_thresholding_continues_while_mean_is_at_or_above_threshold(entropies, expected):
    # The public registry inverts this against its own README; ours continues while unsure.
    assert get_scale_func("entropy_thresholding", threshold=0.5)(0, [1, 2], entropies, WAIT) == (expected, WAIT)


def test_entropy_thresholding_decays_the_threshold_per_iteration():
    scale = get_scale_func("entropy_thresholding", threshold=1.0, decay_factor=0.5)
    entropies = [0.3, 0.3]
    assert [scale(i, [1, 2], entropies, WAIT)[0] for i in range(3)] == [False, False, True]


@pytest.mark.parametrize("last_k, expected", [(-1, False), (1, True), (2, True), (3, False), (0.25, True), (0.5, True), (0.75, False)])
def test_entropy_thresholding_last_k_counts_and_fractions(last_k, expected):
    entropies = [0.0, 0.0, 1.0, 1.0]  # mean of all 0.5, of the last 3 0.67, of the last 2 1.0
    scale = get_scale_func("entropy_thresholding", threshold=0.7, last_k=last_k)
    assert scale(0, [1, 2, 3, 4], entropies, WAIT)[0] is expected


def test_empty_round_gives_no_evidence_to_continue():
    assert get_scale_func("entropy_thresholding", threshold=-1.0)(0, [], [], WAIT) == (False, WAIT)


def test_last_k_count_rules():
    assert [last_k_count(-1, 10), last_k_count(3, 10), last_k_count(30, 10), last_k_count(0.25, 10), last_k_count(0.01, 10)] == [10, 3, 10, 3, 1]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"last_k must be .* got {bad!r}"):
            last_k_count(bad, 10)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown scale_func_name 'entropy'; expected one of default, entropy_thresholding"):
        get_scale_func("entropy")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"takes options \['threshold', 'decay_factor', 'last_k'\], got unknown \['treshold'\]"):
        get_scale_func("entropy_thresholding", treshold=1.0)


def test_user_function_registered_by_name_without_editing_the_library():
    @register("test_long_rounds", replace=True)
    def long_rounds(min_len: int = 3):
        @should_continue_scaling
        def decide(iteration, seq, entropies):
            return len(seq) < int(min_len)

        return decide

    assert "test_long_rounds" in scale_func_names()
    assert get_scale_func("test_long_rounds", min_len=2)(0, [1], [0.1], WAIT) == (True, WAIT)
    assert get_scale_func("test_long_rounds", min_len=2)(0, [1, 2], [0.1, 0.1], WAIT) == (False, WAIT)
    assert scalers.scale_func_from_kwargs("test_long_rounds", {"min_len": 5, "until": ["\n"]})(0, [1], [0.0], WAIT)[0]


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(ValueError, match="'default' is already registered"):
        register("default", lambda: None)


def test_scale_token_only_always_continues_with_its_choice():
    scale = scale_token_only(lambda it, seq, ents, tok: tok * (it + 1))
    assert scale(2, [], [], WAIT) == (True, WAIT * 3)


@pytest.mark.parametrize("bad", [True, (True,), (True, []), (True, [-1]), (True, ["Wait"])])
def test_bad_scaler_returns_are_errors(bad):
    with pytest.raises((TypeError, ValueError), match="scaling function 'x'"):
        checked_decision(bad, "x")
    assert checked_decision((False, []), "x") == (False, [])
