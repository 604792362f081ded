"""`lorafleet calibrate` and `eval --bayes` on a tiny model; bad input; the server entry point."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapter

from lorafleet.adapters import MethodConfig, adapter_from_model, load_adapter, new_adapter
from lorafleet.adapters import write_adapter as write_peft_adapter
from lorafleet.bayes import class_item, glm_predictive, laplace_class_probs, load_factors
from lorafleet.data import bos_to_add
from lorafleet.models import load_base

WORDS = ["great", "awful", "lovely", "dull", "superb", "boring", "fine", "bad"]


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bayes-data") / "reviews.jsonl"
    rows = [
        {"text": f"The film was {w} and the cast was {v}.", "label": "good" if i % 2 else "bad"}
        for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS), strict=True))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return path


def _adapter(base_dir, out, method="lora", seed=3):
    base = load_base(str(base_dir))
    model = new_adapter(
        base.model, MethodConfig(method=method, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    )
    randomize_adapter(model, seed=seed, scale=0.2)
    write_peft_adapter(out, adapter_from_model(model, base_fingerprint=base.fingerprint))
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_base_dir, tmp_path_factory):
    return _adapter(tiny_base_dir, tmp_path_factory.mktemp("bayes-adapter") / "lora")


def report_grid(adapter):
    return json.loads((adapter / "laplace.json").read_text())["tuning"]["val_grid"]


def _common(base_dir, adapter, data):
    return ["--base", str(base_dir), "--adapter", str(adapter), "--data", str(data), "--no-chat"]


def test_calibrate_then_eval_bayes_writes_factors_figures_and_plot(
    run_cli, tiny_base_dir, lora_dir, labelled_file, tmp_path
):
    code, out, err = run_cli(
        "calibrate",
        *_common(tiny_base_dir, lora_dir, labelled_file),
        "--val",
        str(labelled_file),
        "--threshold",
        "32",
        "--n-kfac",
        "4",
        "--json",
        tmp_path / "cal.json",
    )
    assert code == 0, err
    assert (lora_dir / "laplace.safetensors").stat().st_size > 1000
    info = json.loads((lora_dir / "laplace.json").read_text())
    assert info["n"] == 16 and info["config"]["n_kfac"] == 4
    report = json.loads((tmp_path / "cal.json").read_text())
    lam = report["prior_precision"]
    assert lam == pytest.approx(info["prior_precision"]) and 0 < lam < float("inf")
    assert set(report["val_map"]) == {"accuracy", "ece", "nll", "brier"}
    assert "Laplace factors written to" in out
    # The big (64-wide) factors are low-rank: 4 columns, not 64.
    factors = load_factors(lora_dir)
    m = next(iter(factors.modules.values()))
    assert m.A_in.U.shape == (64, 4) and m.A_out.U.shape == (4, 4)

    json_out = tmp_path / "eval" / "figures.json"
    code, out, err = run_cli(
        "eval", *_common(tiny_base_dir, lora_dir, labelled_file), "--bayes", "--json", json_out
    )
    assert code == 0, err
    figures = json.loads(json_out.read_text())
    assert set(figures) >= {"map", "laplace", "prior_precision"}
    for key in ("map", "laplace"):
        assert set(figures[key]) == {"accuracy", "ece", "nll", "brier"}
        assert 0 <= figures[key]["ece"] <= 1 and figures[key]["nll"] > 0
    assert figures["prior_precision"] == pytest.approx(lam)
    grid = [row["prior_precision"] for row in report_grid(lora_dir)]
    best = min(report_grid(lora_dir), key=lambda row: row["nll"])["prior_precision"]
    if best != lam:  # calibrate saw --val: the val-tuned prior is reported beside
        assert figures["laplace_val_tuned"]["prior_precision"] in grid
        assert set(figures["laplace_val_tuned"]) == {
            "accuracy",
            "ece",
            "nll",
            "brier",
            "prior_precision",
        }
    plot = json_out.with_name("figures.reliability.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert "Laplace-LoRA" in out


def test_server_entry_point_returns_laplace_probabilities(
    tiny_base_dir, lora_dir, labelled_file, run_cli, tokenizer
):
    code, _, err = run_cli("calibrate", *_common(tiny_base_dir, lora_dir, labelled_file))
    assert code == 0, err
    base = load_base(str(tiny_base_dir))
    _, model = load_adapter(lora_dir, base.model)
    factors = load_factors(lora_dir)
    prompt, choices = "The film was lovely.\nLabel:", [" bad", " good"]
    with torch.inference_mode():  # as a server would call it
        probs = laplace_class_probs(model, base.tokenizer, factors, prompt, choices)
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    item = class_item(base.tokenizer, prompt, choices, bos=bos_to_add(base.tokenizer))
    pred = glm_predictive(model, [item], factors, link="probit")
    assert probs == pytest.approx(pred.probs[0].tolist(), abs=1e-6)
    assert max(probs) < float(torch.softmax(pred.logits[0], -1).max())  # softer than MAP


def test_eval_bayes_without_factors_is_one_line_exit_2(
    run_cli, tiny_base_dir, labelled_file, tmp_path
):
    fresh = _adapter(tiny_base_dir, tmp_path / "fresh")
    code, _, err = run_cli("eval", *_common(tiny_base_dir, fresh, labelled_file), "--bayes")
    assert code == 2 and err.count("\n") == 1
    assert "laplace.json: missing" in err and "lorafleet calibrate" in err


def test_stale_factors_are_refused(run_cli, tiny_base_dir, labelled_file, tmp_path):
    adapter = _adapter(tiny_base_dir, tmp_path / "stale")
    assert run_cli("calibrate", *_common(tiny_base_dir, adapter, labelled_file))[0] == 0
    _adapter(tiny_base_dir, adapter, seed=4)  # rewritten: other weights, same directory
    code, _, err = run_cli("eval", *_common(tiny_base_dir, adapter, labelled_file), "--bayes")
    assert code == 2 and "other adapter weights" in err and err.count("\n") == 1


def test_adapter_without_lora_is_one_line_exit_2(run_cli, tiny_base_dir, labelled_file, tmp_path):
    bone = _adapter(tiny_base_dir, tmp_path / "bone", method="bone")
    code, _, err = run_cli("calibrate", *_common(tiny_base_dir, bone, labelled_file))
    assert code == 2 and "no LoRA layers" in err and err.count("\n") == 1
    assert not (bone / "laplace.json").exists()


def test_generation_data_is_one_line_exit_2(run_cli, tiny_base_dir, lora_dir, tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text('{"prompt": "1 plus 1 is", "completion": " 2"}\n' * 4)
    code, _, err = run_cli("calibrate", *_common(tiny_base_dir, lora_dir, data))
    assert code == 2 and "needs classification data" in err and err.count("\n") == 1


def test_bad_options_are_one_line_exit_2(run_cli, tiny_base_dir, lora_dir, labelled_file):
    code, _, err = run_cli(
        "calibrate", *_common(tiny_base_dir, lora_dir, labelled_file), "--labels", "empirical"
    )
    assert code == 2 and "labels must be one of" in err
    code, _, err = run_cli(
        "calibrate", *_common(tiny_base_dir, lora_dir, labelled_file), "--tune", "val"
    )
    assert code == 2 and "needs validation data" in err


def test_help_has_examples(run_cli):
    code, out, _ = run_cli("calibrate", "--help")
    assert code == 0 and "Examples" in out and "lorafleet calibrate --base default" in out
    code, out, _ = run_cli("eval", "--help")
    assert code == 0 and "--bayes" in out
