"""EvalConfig: the settings `evaluate` and `lorafleet eval` share, checked on creation."""

from __future__ import annotations

import inspect

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.eval import EvalConfig, evaluate


def test_evaluate_defaults_are_eval_configs():
    params = inspect.signature(evaluate).parameters
    for name, value in vars(EvalConfig()).items():
        assert params[name].default == value, name


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"metrics": ("accuracy", "bleu")}, "unknown metric 'bleu'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_length": -1}, "max_length must be >= 1"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kw, words):
    with pytest.raises(LorafleetError, match=words):
        EvalConfig(**kw)
