"""Shared fixtures: a private cache dir, the real tokenizer, tiny random Llama bases on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Point the cache at a fresh dir before lorafleet is imported anywhere: tests never touch the
# user's cache, and the `default` model's first (converting) load is exercised every run. The
# dir holds converted real models (gigabytes): removed when the run ends, so runs do not pile up.
if "LORAFLEET_CACHE" not in os.environ:
    os.environ["LORAFLEET_CACHE"] = tempfile.mkdtemp(prefix="lorafleet-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LORAFLEET_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from lorafleet.cli import main  # noqa: E402
from lorafleet.models.tiny import default_tokenizer, save_tiny_base, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama (seed 0) with the real SmolLM2 tokenizer, as a transformers model dir."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny0"), seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory, tokenizer) -> Path:
    """The same architecture with other weights (seed 1): another base's fingerprint."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny1"), seed=1, tokenizer=tokenizer)


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(0, vocab_size=len(tokenizer))


@pytest.fixture
def input_ids(tokenizer):
    return torch.tensor([tokenizer("The film was a delight from start to finish.")["input_ids"]])


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
