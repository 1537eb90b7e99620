"""Calibration metrics: ECE and AUROC equal the plain reference computations of tests/references.py."""
from __future__ import annotations

import math

import pytest
import torch

from entropy_guided_generation.eval.calibration import auroc, calibration_report, expected_calibration_error
from entropy_guided_generation.eval.report import choice_confidence

from references import auroc as auroc_reference
from references import ece as ece_reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_auroc_equal_reference_on_random_samples_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    # Rounded confidences give ties (AUROC) and values on bin edges (ECE), 1.0 included.
    confidence = (torch.rand(200, generator=gen) * 20).round().div(20).tolist()
    correct = (torch.rand(200, generator=gen) < torch.tensor(confidence)).double().tolist()
    for bins in (1, 10, 15):
        assert expected_calibration_error(confidence, correct, bins) == pytest.approx(ece_reference(confidence, correct, bins), abs=1e-12)
    assert auroc(confidence, correct) == pytest.approx(auroc_reference(confidence, correct), abs=1e-12)


def test_perfectly_separated_and_perfectly_calibrated_cases():
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # Two bins' worth of samples whose accuracy equals their confidence.
    assert expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == 0.0
    report = calibration_report([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    assert (report.num_samples, report.accuracy, report.mean_confidence) == (8, 0.5, 0.5)


def test_auroc_of_one_class_is_undefined_and_serializes_as_none():
    assert math.isnan(auroc([0.3, 0.7], [1, 1]))
    assert calibration_report([0.3, 0.7], [1, 1]).to_dict()["auroc"] is None


def test_choice_confidence_is_the_top_softmax_probability_of_the_loglikelihoods():
    lls = [-3.0, -1.0, -2.0]
    expected = math.exp(-1.0) / sum(math.exp(x) for x in lls)
    assert choice_confidence(lls) == pytest.approx(expected)


@pytest.mark.parametrize(
    "confidence, correct, message",
    [
        ([0.5, 0.5], [1], "confidence has 2 values but correct has 1"),
        ([0.5, 1.5], [1, 0], r"confidence\[1\] is 1.5"),
        ([0.5, float("nan")], [1, 0], r"confidence\[1\] is nan"),
        ([0.5, 0.5], [1, 2], r"correct\[1\] is 2.0; expected 0 or 1"),
        ([], [], "at least one sample"),
    ],
)
def test_bad_calibration_inputs_name_the_value(confidence, correct, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(confidence, correct)


def test_ece_rejects_bad_bin_count():
    with pytest.raises(ValueError, match="num_bins must be an int >= 1, got 0"):
        expected_calibration_error([0.5], [1], num_bins=0)
