"""Every kernels test sees the kernels as a new process would; the switch is restored after."""

from __future__ import annotations

import pytest

from lorafleet import kernels
from lorafleet.kernels import build


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    kernels.reset()
    yield
    kernels.reset()
