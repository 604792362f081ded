"""Metric functions: answer extraction after a marker, exact match, contains, accuracy."""

from __future__ import annotations

import math

import pytest

from lorafleet.eval import (
    accuracy,
    contains,
    exact_match,
    extract_answer,
    label_token_loss,
    perplexity,
)


def test_extract_answer_takes_the_text_after_the_last_marker():
    assert extract_answer("father-sister #### Aunt.\nmore text", "####") == "aunt"
    assert extract_answer("a #### b #### son-in-law", "####") == "son-in-law"
    assert extract_answer("  Paris  ", None) == "paris"
    assert extract_answer("no marker here", "####") == "no marker here"


def test_exact_match_and_contains():
    refs = ["mother-son #### grandson", "x #### niece"]
    preds = ["mother-son #### grandson", "x #### aunt (the niece)"]
    assert exact_match(preds, refs, "####") == 0.5
    assert contains(preds, refs, "####") == 1.0
    with pytest.raises(ValueError):
        exact_match(["a"], [], None)


def test_accuracy_and_perplexity():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert math.isnan(accuracy([], []))
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_label_token_loss_is_the_mean_nll_of_the_right_choice():
    scores = [[math.log(0.5), math.log(0.25)], [math.log(0.1), math.log(0.8)], [-1.0, -2.0]]
    want = -(math.log(0.5) + math.log(0.8) - 2.0) / 3
    assert math.isclose(label_token_loss(scores, [0, 1, 1]), want)
    assert math.isclose(label_token_loss([[-0.7, -0.7]], [1]), 0.7)  # even odds on two labels
    assert math.isnan(label_token_loss([], []))
    with pytest.raises(ValueError, match="differ in length"):
        label_token_loss(scores, [0])
