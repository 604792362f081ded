"""class_choices through the injected Classifier: each refusal is a one-line 400 of its own code."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.bayes.serving import LaplaceClassifier
from lorafleet.errors import LorafleetError
from lorafleet.serve.api.classify import class_probs
from lorafleet.serve.api.errors import APIError


class FakeClassifier:
    def __init__(self, problem=None, fail=None):
        self._problem, self._fail = problem, fail

    def problem(self, adapter):
        return self._problem

    def probs(self, adapter, prompt, choices):
        if self._fail:
            raise LorafleetError(self._fail)
        return {"labels": choices, "probs": [0.25, 0.75], "method": "fake"}


def refusal(classifier) -> APIError:
    with pytest.raises(APIError) as caught:
        class_probs(classifier, "calib", "p", ["a", "b"])
    assert caught.value.status == 400 and caught.value.param == "class_choices"
    return caught.value


def test_refusals_and_answer():
    assert refusal(None).code == "invalid_request"  # a server started without a classifier
    err = refusal(FakeClassifier(problem="adapter calib is not calibrated"))
    assert err.code == "not_calibrated" and err.message == "adapter calib is not calibrated"
    err = refusal(FakeClassifier(fail="factors are stale"))
    assert err.code == "invalid_request" and err.message == "factors are stale"
    out = class_probs(FakeClassifier(), "calib", "p", ["a", "b"])
    assert out["probs"] == [0.25, 0.75]


def test_laplace_classifier_names_uncalibrated_adapters(tmp_path: Path):
    (tmp_path / "plain").mkdir()
    paths = {"plain": tmp_path / "plain"}
    copies = []
    clf = LaplaceClassifier(lambda: copies.append(1), None, paths.get)
    for name in ("plain", "unknown"):
        assert f"adapter {name} is not calibrated (no laplace.json)" in clf.problem(name)
        with pytest.raises(LorafleetError, match="not calibrated"):
            clf.probs(name, "p", ["a", "b"])
    assert copies == []  # no copy of the base for a request that cannot be answered
    (tmp_path / "plain" / "laplace.json").write_text("{}")
    assert clf.problem("plain") is None
