"""Directory entries beside plain adapters: each checked on its own by its kind, once per change;
a failing one (or a check that crashes) is unavailable with its reason, the rest serve."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import GREEDY, run_to_end

from lorafleet.errors import LorafleetError


class Marker:
    """A kind claiming dirs that hold MARK; its check reads MARK: "ok", "bad" or "crash"."""

    kind, label, usage, pool = "marked", "marked entry", "", False

    def __init__(self):
        self.checks: list[str] = []
        self.served: set[str] = set()

    def claims(self, path: Path) -> bool:
        return (path / "MARK").is_file()

    def check(self, name: str, path: Path):
        self.checks.append(name)
        text = (path / "MARK").read_text()
        if text == "crash":
            raise RuntimeError("boom")
        if text != "ok":
            raise LorafleetError(f"{path / 'MARK'}: says {text}")
        self.served.add(name)
        return ()

    def drop(self, name: str) -> None:
        self.served.discard(name)


def _rewrite(file: Path, text: str) -> None:
    file.write_text(text)
    st = file.stat()  # a new mtime even on a coarse clock
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture
def mixed(tmp_path, disk) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(disk / "lora4", root / "lora4")
    for name, text in (("good", "ok"), ("bad", "bad"), ("buggy", "crash")):
        (root / name).mkdir()
        (root / name / "MARK").write_text(text)
    (root / "plain-folder").mkdir()
    (root / ".upload-123-x").mkdir()  # an upload in progress: never an entry
    (root / "has space").mkdir()
    return root


def test_each_entry_is_checked_alone_once_per_change(make, mixed, prompts, caplog):
    caplog.set_level(logging.INFO)
    marker = Marker()
    engine, registry = make(mixed, kinds=[marker])
    found = {s.name: s for s in registry.entries.all()}
    assert set(found) == {"good", "bad", "buggy", "plain-folder", "has space"}
    assert found["good"].available and found["good"].kind == "marked"
    assert registry.entry("bad").reason == "marked entry 'bad' is unavailable: bad/MARK: says bad"
    assert registry.entry("buggy").reason.endswith("RuntimeError: boom")
    assert "not an adapter directory" in registry.entry("plain-folder").reason
    assert "invalid adapter name" in registry.entry("has space").reason
    assert [s.name for s in registry.unavailable()] == ["bad", "buggy", "has space", "plain-folder"]
    assert registry.stats()["unavailable"] == 4
    assert registry.names() == ["lora4"]
    # The plain adapter serves; a request for an unavailable entry fails with its reason.
    good = engine.add_request(prompts[0], "lora4", GREEDY)
    bad = engine.add_request(prompts[1], "bad", GREEDY)
    out = run_to_end(engine)
    assert out[good].finish_reason == "length" and out[bad].finish_reason == "error"
    assert "bad/MARK: says bad" in out[bad].error and registry.state("bad") == "unavailable"

    # Rescans check nothing unchanged again, and log each problem once.
    registry.rescan()
    registry.rescan()
    assert sorted(marker.checks) == ["bad", "buggy", "good"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("'bad' is unavailable" in m for m in warned) == 1
    # A fix is picked up by the next rescan (or a request's refresh); a break too.
    _rewrite(mixed / "bad" / "MARK", "ok")
    _rewrite(mixed / "good" / "MARK", "nope")
    registry.refresh("bad")
    assert registry.entry("bad").available and "bad" in marker.served
    registry.rescan()
    assert not registry.entry("good").available and "good" not in marker.served
    assert any("'bad' is available again" in r.getMessage() for r in caplog.records)
    # A vanished entry is forgotten, and its kind told to stop serving it.
    shutil.rmtree(mixed / "bad")
    registry.rescan()
    assert registry.entry("bad") is None and "bad" not in marker.served


def test_a_kind_added_after_the_scan_takes_its_entries_over(make, mixed):
    _, registry = make(mixed)
    assert registry.entry("good").kind == "unknown"  # no kind claims it yet: a stray
    marker = Marker()
    registry.add_kind(marker)
    assert registry.entry("good").kind == "marked" and registry.entry("good").available
    assert marker.served == {"good"}


def test_a_claimed_adapter_dir_serves_only_once_its_check_passed(make, mixed, disk):
    shutil.copytree(disk / "lora4", mixed / "calibrated")
    (mixed / "calibrated" / "MARK").write_text("bad")
    marker = Marker()
    engine, registry = make(mixed, kinds=[marker], scan=False)
    assert registry.state("calibrated") is None  # not discovered before its check ran
    registry.rescan()
    assert registry.state("calibrated") == "unavailable"
    assert "calibrated/MARK: says bad" in registry.prepare("calibrated")
    assert "calibrated" not in registry.names()
    _rewrite(mixed / "calibrated" / "MARK", "ok")
    assert "calibrated" in registry.names()
    assert registry.prepare("calibrated") is None and registry.wait(30)
