"""fsutil: atomic writes leave the old file or the new one, never half of one, and no temp files."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lorafleet.fsutil import atomic_write_json


def test_atomic_write_json_writes_indented_json_with_normal_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "new" / "out.json", {"a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "out.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write_json(path, {"v": {2}}, default=sorted)
    assert json.loads(path.read_text()) == {"v": [2]}


def test_atomic_dir_replaces_whole_or_leaves_the_old_one(tmp_path):
    from lorafleet.fsutil import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    try:
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old one intact
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("two")
    assert [p.name for p in target.iterdir()] == ["c.txt"]  # replaced whole
