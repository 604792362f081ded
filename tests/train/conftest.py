"""Fixtures for training tests: a small prompt/completion file the tiny model can fit."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def arithmetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [
        {"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
        for a in range(4)
        for b in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(base_dir, data, out, *extra):
    return [
        "train",
        "--base",
        str(base_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--no-chat",
        *extra,
    ]
