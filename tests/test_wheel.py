"""The wheel: carries every file read at run time; installed alone, `lorafleet serve` serves `/`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from lorafleet.serve.api.server import free_port

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorafleet"


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}{proc.stderr}"
    return proc


def _runtime_files() -> set[str]:
    """Every non-Python file inside the package (templates, the page): the program reads them."""
    return {
        "lorafleet/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the build never writes into the tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", tmp / "src", ignore=skip)
    out = tmp / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(out),
        str(tmp),
    )
    (found,) = out.glob("lorafleet-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from the project's venv."""
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    _run(sys.executable, "-m", "venv", "--without-pip", str(env_dir))
    python = env_dir / "bin" / "python"
    purelib = Path(
        _run(
            str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).stdout.strip()
    )
    # Appended after the venv's own site-packages: the wheel's lorafleet wins over the editable one
    # (a .pth line adds a path; the editable install's own .pth hooks in there are not run).
    (purelib / "zz_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        str(wheel),
    )
    return env_dir


def test_wheel_carries_every_runtime_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = _runtime_files()
    assert "lorafleet/serve/api/web/playground.html" in needed
    assert needed <= names, f"missing from the wheel: {sorted(needed - names)}"


def test_installed_wheel_runs_and_serves_the_page(venv, tiny_base_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ""}
    where = _run(
        str(venv / "bin" / "python"),
        "-c",
        "import lorafleet; print(lorafleet.__file__)",
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout's src/
    helped = _run(str(venv / "bin" / "lorafleet"), "--help", cwd=tmp_path, env=env).stdout
    assert "serve" in helped and "train" in helped
    port = free_port()
    cmd = [
        str(venv / "bin" / "lorafleet"),
        "serve",
        "--base",
        str(tiny_base_dir),
        "--port",
        str(port),
        "--max-seq-len",
        "64",
    ]
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            page = _wait_for_page(f"http://127.0.0.1:{port}/", proc, tmp_path / "server.log")
        finally:
            proc.terminate()
            proc.wait(30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (PACKAGE / "serve" / "api" / "web" / "playground.html").read_text()


def _wait_for_page(url: str, proc: subprocess.Popen, log: Path) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
