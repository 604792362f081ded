"""Fixtures for Trans-LoRA: a tiny Llama source with an adapter, a tiny Gemma 3 target with its
own tokenizer, a small text/label task file, and a kit made from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import randomize_adapter

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter, write_adapter
from lorafleet.cli import main
from lorafleet.models import load_base
from lorafleet.models.tiny_gemma import save_tiny_gemma_base

GOOD = [
    "a warm and funny film",
    "a moving story with great acting",
    "simply wonderful to watch",
    "the best movie of the year",
    "charming , clever and kind",
    "a joy from start to end",
]
BAD = [
    "a dull and lifeless mess",
    "boring from the first scene",
    "the plot makes no sense",
    "a waste of two hours",
    "badly acted and too long",
    "flat , tired and cheap",
]
# Fast settings for every stage on tiny models.
TINY_PREPARE = {
    "seeds": 3,
    "real": 128,  # the floor: 128 real + 128 synthetic training inputs
    "held_out": 4,
    "disc_steps": 4,
    "disc_rank": 4,
    "batch_size": 16,  # few engine steps for the 132 synthetic inputs
    "max_new_tokens": 6,
}


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """144 text/label rows, each text distinct and none inside another (so a leak into the kit
    is detectable)."""
    path = tmp_path_factory.mktemp("task") / "reviews.jsonl"
    rows = [
        {"text": f"{t} ({i})", "label": "positive" if j == 0 else "negative"}
        for i in range(12)
        for j, texts in enumerate((GOOD, BAD))
        for t in texts
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    return save_tiny_gemma_base(tmp_path_factory.mktemp("tiny-gemma"), seed=0)


@pytest.fixture(scope="session")
def gemma_plain_dir(tmp_path_factory) -> Path:
    """The tiny Gemma 3 whose tokenizer has no chat template."""
    return save_tiny_gemma_base(tmp_path_factory.mktemp("tiny-gemma-plain"), chat_template=False)


@pytest.fixture(scope="session")
def source_adapter(tmp_path_factory, tiny_base_dir) -> Path:
    """A random LoRA on the tiny Llama source base (it changes the logits)."""
    base = load_base(str(tiny_base_dir))
    model = new_adapter(base.model, MethodConfig("lora", 4, 8.0, None, 0.0))
    randomize_adapter(model, seed=5, scale=0.3)
    adapter = adapter_from_model(model, base_fingerprint=base.fingerprint)
    return write_adapter(tmp_path_factory.mktemp("src") / "adapter", adapter)


@pytest.fixture(scope="session")
def kit(tmp_path_factory, tiny_base_dir, source_adapter, task_file) -> Path:
    """A kit made through the CLI (`lorafleet transfer prepare`), shared by the tests."""
    out = tmp_path_factory.mktemp("kits") / "kit"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_PREPARE.items()]
    code = main(
        [
            "transfer",
            "prepare",
            "-b",
            str(tiny_base_dir),
            "-a",
            str(source_adapter),
            "-d",
            str(task_file),
            "-o",
            str(out),
            *flags,
        ]
    )
    assert code == 0
    return out
