"""CalibrateConfig: how `calibrate` tunes and reports (its defaults are calibrate's and
`lorafleet calibrate`'s), checked on creation."""

from __future__ import annotations

import inspect

import pytest

from lorafleet.bayes import CalibrateConfig, calibrate
from lorafleet.errors import LorafleetError


def test_calibrate_defaults_are_calibrate_configs():
    params = inspect.signature(calibrate).parameters
    for name, value in vars(CalibrateConfig()).items():
        assert params[name].default == value, name


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"tune": "grid"}, "tune must be one of evidence, val, got 'grid'"),
        ({"prior": "flat"}, "prior must be one of"),
        ({"evidence": "exact"}, "evidence must be one of"),
        ({"weight_samples": -1}, "weight_samples >= 0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kw, words):
    with pytest.raises(LorafleetError, match=words):
        CalibrateConfig(**kw)
