"""Laplace-LoRA class probabilities from the server (`class_choices`) equal the library's."""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import start

from lorafleet.adapters import attach, read_adapter
from lorafleet.bayes import calibrate, laplace_class_probs, load_factors
from lorafleet.bayes.serving import laplace_classifier
from lorafleet.data import load_examples
from lorafleet.models.tiny import tiny_llama

PROMPT = "Review: a warm, funny and moving film\nSentiment:"
CHOICES = [" negative", " positive"]


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory, adapters_dir, tokenizer):
    root = tmp_path_factory.mktemp("laplace-adapters")
    shutil.copytree(adapters_dir / "alpha", root / "calib")
    shutil.copytree(adapters_dir / "beta", root / "plain")
    model = attach(tiny_llama(0, vocab_size=len(tokenizer)), read_adapter(root / "calib"))
    train = load_examples("sst2", tokenizer, split="train", chat=False, limit=12)
    calibrate(model, tokenizer, root / "calib", train, max_length=96)
    return root


def test_class_probs_for_a_calibrated_adapter(tokenizer, calibrated_dir):
    srv = start(tokenizer, calibrated_dir, classifier=laplace_classifier)
    try:
        body = {"model": "calib", "prompt": PROMPT, "class_choices": CHOICES}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        got = choice["class_probs"]
        assert got["method"] == "laplace" and got["labels"] == CHOICES
        assert abs(sum(got["probs"]) - 1) < 1e-5
        assert choice["text"] == CHOICES[max(range(2), key=got["probs"].__getitem__)]
        model = attach(
            tiny_llama(0, vocab_size=len(tokenizer)), read_adapter(calibrated_dir / "calib")
        )
        want = laplace_class_probs(
            model, tokenizer, load_factors(calibrated_dir / "calib"), PROMPT, CHOICES
        )
        assert got["probs"] == pytest.approx(want, abs=1e-5)
        for model_name in ("plain", "tiny"):  # uncalibrated adapter, base: a clear 400
            r = httpx.post(srv.url + "/v1/completions", json={**body, "model": model_name})
            assert r.status_code == 400 and r.json()["error"]["code"] == "not_calibrated"
        # generation on the same server still works after the classifier copied the base
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"model": "calib", "prompt": "Hi", "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        srv.stop()
