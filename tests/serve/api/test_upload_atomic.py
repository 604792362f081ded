"""Admin uploads are atomic: a server SIGKILLed mid-upload never serves a half-written adapter
after its restart, and the temp dirs killed uploads leave are removed at start."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN, make_adapter, start

from lorafleet.adapters import write_adapter
from lorafleet.serve.api import AuthConfig
from lorafleet.serve.api.admin_routes import (
    HOST,
    OTHER_HOST_STALE_S,
    PROCESS_START,
    UPLOAD_PREFIX,
    clean_stale_uploads,
    host_tag,
    process_start,
    upload_owner,
)
from lorafleet.serve.api.server import free_port

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def multipart(name: str, adapter_dir) -> tuple[bytes, str]:
    """A multipart body for POST /admin/adapters: field `name` + the adapter's two files."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()
    ]
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{filename}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + (adapter_dir / filename).read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def wait_healthy(proc, url: str, log_path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.3)


def test_sigkill_mid_upload_leaves_nothing_served(
    tiny_base_dir, adapters_dir, auth_file, tokenizer, api_fp, tmp_path
):
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir, root)
    new = tmp_path / "new-adapter"
    write_adapter(new, make_adapter(tokenizer, api_fp, 7))
    payload, kind = multipart("upl", new)
    port = free_port()
    cmd = [
        *(sys.executable, "-m", "lorafleet.cli", "serve", "--base", str(tiny_base_dir)),
        *("--adapters", str(root), "--auth", str(auth_file), "--port", str(port)),
        *("--max-seq-len", "128", "--max-rank", "8"),
    ]
    log_path = tmp_path / "server.log"
    log = log_path.open("w")  # closed in `finally`
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, log_path)
        half, sent = len(payload) // 2, threading.Event()

        def body():
            yield payload[:half]
            sent.set()
            time.sleep(30)  # the rest never comes: the server is killed meanwhile
            yield payload[half:]

        def upload() -> None:
            headers = {**ADMIN_HEADERS, "Content-Type": kind, "Content-Length": str(len(payload))}
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.post(url + "/admin/adapters", content=body(), headers=headers, timeout=60)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        assert sent.wait(30)
        time.sleep(0.5)  # the server is reading the body now
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # What a SIGKILL between writing an upload and renaming it into place leaves behind: a
    # complete, valid adapter in a temp dir of a process that is gone.
    leftover = root / f"{UPLOAD_PREFIX}999999999.1234-gamma2-x1y2"
    shutil.copytree(new, leftover)
    # The next start on the same directory.
    srv = start(tokenizer, root, AuthConfig.load(auth_file))
    try:
        assert not leftover.exists() and not list(root.glob(UPLOAD_PREFIX + "*"))
        assert not (root / "upl").exists()
        got = httpx.get(srv.url + "/v1/models", headers=ADMIN_HEADERS).json()
        models = [m["id"] for m in got["data"]]
        listed = httpx.get(srv.url + "/admin/adapters", headers=ADMIN_HEADERS).json()["adapters"]
        for name in ("upl", "gamma2"):
            assert name not in models and name not in [a["name"] for a in listed]
            ask = {"model": name, "prompt": "Hi", "max_tokens": 2}
            r = httpx.post(srv.url + "/v1/completions", json=ask, headers=ADMIN_HEADERS)
            assert r.status_code == 404, r.text
        assert "alpha" in models
        # The same upload, whole this time: it lands complete and is served.
        headers = {**ADMIN_HEADERS, "Content-Type": kind}
        r = httpx.post(srv.url + "/admin/adapters", content=payload, headers=headers, timeout=60)
        assert r.status_code == 201, r.text
        assert sorted(p.name for p in (root / "upl").iterdir()) == sorted(
            ["adapter_config.json", "adapter_model.safetensors"]
        )
        ask = {"model": "upl", "prompt": "Hi", "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/completions", json=ask, headers=ADMIN_HEADERS, timeout=60)
        assert r.status_code == 200, r.text
        # Deleting it drops its metrics series too (no growth when adapters come and go).
        metrics = httpx.get(srv.url + "/metrics", headers=ADMIN_HEADERS).text
        assert 'adapter="upl"' in metrics
        r = httpx.delete(srv.url + "/admin/adapters/upl", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        metrics = httpx.get(srv.url + "/metrics", headers=ADMIN_HEADERS).text
        assert 'adapter="upl"' not in metrics
        for gauge in ("process_resident_memory_bytes", "lorafleet_kv_used_slots 0.0"):
            assert gauge in metrics  # what a soak reads
        assert "lorafleet_adapter_slots_in_use 0.0" in metrics
    finally:
        srv.stop()


def test_clean_stale_uploads_keeps_live_ones(tmp_path):
    pid, parent = os.getpid(), os.getppid()
    mine = tmp_path / f"{UPLOAD_PREFIX}{upload_owner()}-a-xyz"  # this process: in progress
    gone = tmp_path / f"{UPLOAD_PREFIX}999999999.1234-b-xyz"
    unnamed = tmp_path / f"{UPLOAD_PREFIX}c-xyz"  # no pid
    # A dead predecessor that had this process's PID (a restart as PID 1 in a container):
    # its PID is alive, but it is this process now, started later.
    before = tmp_path / f"{UPLOAD_PREFIX}{pid}.{PROCESS_START}0-e-xyz"
    legacy = tmp_path / f"{UPLOAD_PREFIX}{pid}-f-xyz"  # an older server's name, this PID
    stale = [gone, unnamed, before, legacy]
    kept = [mine, tmp_path / "d"]  # d: an adapter, never touched
    start = process_start(parent)
    if start is not None:  # where /proc tells: another live process's upload stays, and a
        kept.append(tmp_path / f"{UPLOAD_PREFIX}{parent}.{start}-g-xyz")  # PID reused is stale
        stale.append(tmp_path / f"{UPLOAD_PREFIX}{parent}.{int(start) + 1}-h-xyz")
    for path in stale + kept:
        path.mkdir()
    assert sorted(clean_stale_uploads(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_another_hosts_uploads_are_judged_by_age_not_pid(tmp_path):
    """On a directory several machines share (serve --ray), a PID names a process only on
    its own host: another host's upload dir with a PID dead here stays (its upload may be in
    progress there) until it is OTHER_HOST_STALE_S old; this host's dead one goes."""
    dead = "999999999.1234"
    other = host_tag("other-node.example")
    assert other != HOST and "-" not in other and "@" not in other
    elsewhere = tmp_path / f"{UPLOAD_PREFIX}{dead}@{other}-a-xyz"  # live there, maybe
    old = tmp_path / f"{UPLOAD_PREFIX}{dead}@{other}-b-xyz"  # a day old: left over
    here = tmp_path / f"{UPLOAD_PREFIX}{dead}@{HOST}-c-xyz"  # this host, process gone
    mine = tmp_path / f"{UPLOAD_PREFIX}{upload_owner()}-d-xyz"  # this process: in progress
    for path in (elsewhere, old, here, mine):
        path.mkdir()
    long_ago = time.time() - OTHER_HOST_STALE_S - 60
    os.utime(old, (long_ago, long_ago))
    assert upload_owner().endswith("@" + HOST)
    assert sorted(clean_stale_uploads(tmp_path)) == sorted([old, here])
    assert elsewhere.exists() and mine.exists() and not old.exists() and not here.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc here")
def test_process_start_reads_another_process_and_a_later_one_starts_later():
    code = "import sys; print(open('/proc/self/stat').read(), flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        own = child.stdout.readline().rsplit(")", 1)[1].split()[19]  # field 22, its own view
        assert process_start(child.pid) == own
        assert int(own) >= int(PROCESS_START)  # ticks since boot: started after this process
    finally:
        child.communicate("")
    assert process_start(999999999) is None
