"""Fixtures for the Laplace-LoRA tests: one torch thread while they run."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many tiny ops; on a shared 2-core machine thread hand-offs cost far more
    # than the ops (a 60x slowdown measured), so they run on one thread and restore the setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
