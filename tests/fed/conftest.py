"""Fixtures for the federated tests: labelled train / validation files for the tiny model."""

from __future__ import annotations

import pytest
from fed_helpers import write_reviews


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """(train file, validation file): 24 labelled rows to split among clients, 8 held out."""
    root = tmp_path_factory.mktemp("fed-data")
    return write_reviews(root / "train.jsonl", 24, seed=0), write_reviews(root / "val.jsonl", 8, 1)
