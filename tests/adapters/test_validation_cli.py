"""Every way an adapter can be bad is refused by the CLI: exit 2, one line naming it."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from helpers import randomize_adapter
from safetensors.torch import load_file, save_file

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter, write_adapter
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tokenizer):
    """A valid rank-8 LoRA for the seed-0 tiny base, written by lorafleet (with fingerprint)."""
    base = tiny_llama(0, vocab_size=len(tokenizer))
    model = new_adapter(base, MethodConfig(rank=8, alpha=16))
    randomize_adapter(model)
    path = tmp_path_factory.mktemp("good") / "adapter"
    write_adapter(path, adapter_from_model(model, base_fingerprint=fingerprint(model)))
    return path


@pytest.fixture
def bad(good_adapter, tmp_path):
    """A fresh copy of the good adapter to break."""
    path = tmp_path / "bad"
    shutil.copytree(good_adapter, path)
    return path


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def _refused(run_cli, base_dir, adapter, *words, extra=()):
    code, out, err = run_cli("info", "--base", base_dir, "--adapter", adapter, *extra)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def test_good_adapter_is_accepted(run_cli, tiny_base_dir, good_adapter):
    code, out, err = run_cli("info", "--base", tiny_base_dir, "--adapter", good_adapter, "--json")
    assert code == 0, err
    report = json.loads(out)["adapter"]
    assert report["method"] == "lora" and report["rank"] == 8 and report["alpha"] == 16
    assert report["fingerprint_check"] == "match" and report["compatible"] is True
    assert report["parameters"] == sum(
        t.numel() for t in load_file(str(good_adapter / WEIGHTS)).values()
    )


def test_missing_directory(run_cli, tiny_base_dir, tmp_path):
    _refused(run_cli, tiny_base_dir, tmp_path / "nope", "nope", "no such adapter directory")


def test_missing_config(run_cli, tiny_base_dir, bad):
    (bad / CONFIG).unlink()
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "missing")


def test_empty_config(run_cli, tiny_base_dir, bad):
    (bad / CONFIG).write_text("")
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "empty")


def test_config_that_is_not_an_object(run_cli, tiny_base_dir, bad):
    (bad / CONFIG).write_text("[1, 2]")
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "expected an object")


def test_config_that_is_not_json(run_cli, tiny_base_dir, bad):
    (bad / CONFIG).write_text("{not json")
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "invalid JSON")


def test_missing_weights(run_cli, tiny_base_dir, bad):
    (bad / WEIGHTS).unlink()
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, "missing")


def test_empty_weights(run_cli, tiny_base_dir, bad):
    (bad / WEIGHTS).write_bytes(b"")
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, "empty")


def test_corrupt_weights(run_cli, tiny_base_dir, bad):
    (bad / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, "not a valid safetensors")


class _Boom:
    """Unpickling this would create a marker file: proof the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_never_unpickled(run_cli, tiny_base_dir, bad, tmp_path):
    (bad / WEIGHTS).unlink()
    marker = tmp_path / "unpickled"
    (bad / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    _refused(run_cli, tiny_base_dir, bad, "adapter_model.bin", "pickle")
    assert not marker.exists()


def test_wrong_tensor_shape(run_cli, tiny_base_dir, bad):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(bad, lambda t: t.__setitem__(key, torch.zeros(8, 63)))
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, key, "shape (8, 63)", "expected (8, 64)")


def test_rank_above_limit(run_cli, tiny_base_dir, bad):
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "rank 8", "limit of 4", extra=("--max-rank", "4"))


def test_non_finite_values(run_cli, tiny_base_dir, bad):
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    _edit_tensors(bad, lambda t: t[key].__setitem__((0, 0), float("inf")))
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, key, "non-finite")


def test_target_modules_the_base_lacks(run_cli, tiny_base_dir, bad):
    _edit_config(bad, target_modules=["q_proj", "c_attn"])
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "lacks", "c_attn")


def test_tensor_for_a_layer_the_base_lacks(run_cli, tiny_base_dir, bad):
    def add_layer(t):
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)

    _edit_tensors(bad, add_layer)
    _refused(run_cli, tiny_base_dir, bad, WEIGHTS, "layers.7", "lacks")


def test_unknown_peft_type(run_cli, tiny_base_dir, bad):
    _edit_config(bad, peft_type="PREFIX_TUNING")
    _refused(run_cli, tiny_base_dir, bad, CONFIG, "unknown peft_type", "PREFIX_TUNING")


def test_other_base_fingerprint_refused_unless_forced(run_cli, other_base_dir, good_adapter):
    _refused(run_cli, other_base_dir, good_adapter, WEIGHTS, "another base", "--force")
    code, out, err = run_cli(
        "info", "--base", other_base_dir, "--adapter", good_adapter, "--force", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["adapter"]["fingerprint_check"] == "mismatch"


def test_bad_adapter_fails_generate_too(run_cli, tiny_base_dir, bad):
    (bad / CONFIG).write_text("[]")
    code, out, err = run_cli("generate", "--base", tiny_base_dir, "--adapter", bad, "-p", "hi")
    assert code == 2 and out == "" and "expected an object" in err
