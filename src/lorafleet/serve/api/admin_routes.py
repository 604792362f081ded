"""Admin routes (admin key only): add an adapter (a path in the adapters dir, or an upload),
remove one, list them with their tier."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from lorafleet.adapters import read_adapter
from lorafleet.errors import LorafleetError
from lorafleet.serve.adapter_store import resolve_inside
from lorafleet.serve.api.auth import valid_name
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.responses import AdapterAdded, AdapterDeleted, AdapterInfo, AdapterList
from lorafleet.serve.api.schemas import AddAdapter
from lorafleet.serve.api.state import ServerState, admin, state_of

router = APIRouter(prefix="/admin", dependencies=[Depends(admin)])
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")
# An upload is written to ADAPTERS_DIR/.upload-PID.START@HOST-NAME-XXXX (START: when process
# PID started, process_start; HOST: this machine's name, host_tag), then renamed to NAME. A dot
# name is never an adapter name, so such a dir is never served; one whose process is gone
# (killed mid-upload) is removed at the next start (clean_stale_uploads). START tells a
# restarted server that got its dead predecessor's PID (PID 1 in a container) from that
# predecessor. HOST matters where several machines share the directory (`serve --ray`): a PID
# means something only on the machine that wrote it, so another host's upload dir is left
# alone unless it is older than OTHER_HOST_STALE_S (no upload takes that long).
UPLOAD_PREFIX = ".upload-"
OTHER_HOST_STALE_S = 24 * 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_start(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it (clock ticks since boot, field 22
    of /proc/PID/stat): the same for a process's whole life, different for a later process
    given the same PID. None where /proc cannot tell (not Linux, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 and fields[19].isdigit() else None


# This process's start: /proc's where it tells (comparable with other processes'), else the
# time this module was imported (then only this process's own uploads can be told apart).
PROCESS_START = process_start(os.getpid()) or f"t{time.time_ns()}"


def host_tag(hostname: str | None = None) -> str:
    """`hostname` (default: this machine's, socket.gethostname) as it goes into an upload dir's
    name: characters other than [A-Za-z0-9._] become "_" (the name's "-" separates its parts),
    at most 64 of them."""
    name = socket.gethostname() if hostname is None else hostname
    return re.sub(r"[^A-Za-z0-9._]", "_", name)[:64] or "_"


HOST = host_tag()


def upload_owner() -> str:
    """The PID.START@HOST part of this process's upload temp dir names."""
    return f"{os.getpid()}.{PROCESS_START}@{HOST}"


def _stale(owner: str, path: Path, now: float) -> bool:
    """True when upload dir `path`, named by `owner` (PID.START@HOST), is left over: written on
    this host (or before hosts were named: PID.START, PID) by a process that is gone; or
    written on another host and not modified for OTHER_HOST_STALE_S seconds (its PID cannot
    be checked from here)."""
    owner, at, host = owner.partition("@")
    if at and host != HOST:
        try:
            age = now - path.stat().st_mtime
        except OSError:  # removed meanwhile (by its own server)
            return False
        return age > OTHER_HOST_STALE_S
    return _process_gone(owner)


def _process_gone(owner: str) -> bool:
    """True when the process that named an upload dir `owner` (PID.START) on this host is
    gone: no such PID, or that PID is now another process (a later start). An owner without
    START (an older server's) is stale when its PID is gone or is this process's own."""
    pid, _, start = owner.partition(".")
    if not (pid.isdigit() and int(pid) > 0) or not _alive(int(pid)):
        return True
    if int(pid) == os.getpid():
        return start != PROCESS_START
    if not start:
        return False
    now = process_start(int(pid))
    return now is not None and now != start


def clean_stale_uploads(root: Path) -> list[Path]:
    """Remove the upload temp dirs in `root` left over (_stale): this host's whose process is
    gone (or that name none, or whose PID another process has taken since), other hosts'
    untouched for OTHER_HOST_STALE_S; returns them. A live process's upload in progress is
    left alone, on any host sharing `root`."""
    removed, now = [], time.time()
    for path in root.glob(UPLOAD_PREFIX + "*"):
        owner = path.name[len(UPLOAD_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and _stale(owner, path, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _write_synced(path: Path, data: bytes) -> None:
    """Write and fsync (the rename that publishes the adapter must not outrun its bytes)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, target: Path) -> None:
    """Rename the complete upload into place (atomic) and make the rename durable."""
    os.rename(tmp, target)  # fails (OSError) if target appeared meanwhile: never merged
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(state: ServerState, name) -> str:
    if not valid_name(name):
        raise APIError(
            400,
            f"bad adapter name {name!r}: use [A-Za-z0-9._-]{{1,64}}, not starting with a dot",
            code="invalid_name",
            param="name",
        )
    if name == state.config.model_name:
        raise APIError(400, f"{name!r} is the base model's name", code="invalid_name", param="name")
    if state.registry is None:
        raise APIError(400, "this server has no adapter registry", code="no_registry")
    return name


def _validate_dir(state: ServerState, path: Path) -> None:
    """Read and check the adapter now, so a bad one is refused at once (never half-added)."""
    try:
        state.registry.validate(read_adapter(path))
    except LorafleetError as exc:
        where = state.adapters_dir
        message = str(exc).replace(str(where) + os.sep, "") if where else str(exc)
        raise APIError(400, message, code="invalid_adapter") from None


@router.get("/adapters", response_model=None)
def list_adapters(request: Request) -> AdapterList:
    state = state_of(request)
    reg = state.registry
    adapters = [AdapterInfo(**row) for row in state.listing()]
    return AdapterList(adapters=adapters, stats=reg.stats() if reg else {})


@router.post("/adapters", status_code=201, response_model=None)
async def add_adapter(request: Request) -> AdapterAdded:
    state = state_of(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _upload(state, request)
    try:
        body = AddAdapter.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        msg = (
            "the request body is not valid JSON"
            if first.get("type") == "json_invalid"
            else f"{where}: {first.get('msg')}"
        )
        raise APIError(400, msg, code="invalid_request") from None
    name = _check_name(state, body.name)
    if state.adapters_dir is None:
        raise APIError(400, "the server has no adapters directory", code="no_adapters_dir")
    try:
        path = resolve_inside(body.path, state.adapters_dir)
    except LorafleetError as exc:
        raise APIError(400, str(exc), code="invalid_path", param="path") from None
    if not path.is_dir():
        raise APIError(
            400, f"{body.path}: no such adapter directory", code="invalid_path", param="path"
        )
    await asyncio.to_thread(_validate_dir, state, path)
    try:
        state.registry.add(name, path)
    except LorafleetError as exc:
        raise APIError(409, str(exc), code="conflict") from None
    return AdapterAdded(name=name, path=str(path.relative_to(state.adapters_dir)))


async def _upload(state: ServerState, request: Request) -> AdapterAdded:
    """A PEFT adapter as multipart: field `name` plus files adapter_config.json and
    adapter_model.safetensors; written to ADAPTERS_DIR/NAME through a temp dir + rename."""
    limit = int(state.config.max_upload_mb * 2**20)
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(
            413, f"the upload is over {state.config.max_upload_mb:g} MB", code="too_large"
        )
    try:
        form = await request.form(max_files=4, max_fields=4)
    except Exception as exc:
        raise APIError(400, f"bad multipart body: {exc}", code="invalid_request") from None
    name = _check_name(state, form.get("name"))
    root = state.adapters_dir
    if root is None:
        raise APIError(400, "the server has no adapters directory", code="no_adapters_dir")
    files = {}
    for key, value in form.multi_items():
        if key == "name":
            continue
        filename = Path(getattr(value, "filename", "") or "").name
        if filename not in UPLOAD_FILES or not hasattr(value, "read"):
            raise APIError(
                400,
                f"unexpected upload field {key!r}: send only "
                f"{', '.join(UPLOAD_FILES)} (safetensors, never pickles)",
                code="invalid_upload",
            )
        files[filename] = value
    missing = [f for f in UPLOAD_FILES if f not in files]
    if missing:
        raise APIError(400, f"missing upload file(s): {', '.join(missing)}", code="invalid_upload")
    target = root / name
    if target.exists() or (state.registry.state(name) is not None):
        raise APIError(409, f"adapter {name} already exists; delete it first", code="conflict")
    tmp = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{upload_owner()}-{name}-", dir=root))
    try:
        total = 0
        for filename, upload in files.items():
            data = await upload.read()
            total += len(data)
            if total > limit:
                raise APIError(
                    413, f"the upload is over {state.config.max_upload_mb:g} MB", code="too_large"
                )
            await asyncio.to_thread(_write_synced, tmp / filename, data)
        await asyncio.to_thread(_validate_dir, state, tmp)
        try:
            await asyncio.to_thread(_publish, tmp, target)  # whole or not at all
        except OSError:
            raise APIError(
                409, f"adapter {name} already exists; delete it first", code="conflict"
            ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        state.registry.add(name, target)
    except LorafleetError as exc:
        raise APIError(409, str(exc), code="conflict") from None
    return AdapterAdded(name=name, path=name)


@router.delete("/adapters/{name}", response_model=None)
def delete_adapter(name: str, request: Request) -> AdapterDeleted:
    state = state_of(request)
    _check_name(state, name)
    if state.registry.state(name) is None:
        raise APIError(404, f"unknown adapter {name!r}", code="not_found")
    try:
        state.registry.remove(name)
    except LorafleetError as exc:
        status = 409 if "in use" in str(exc) else 404
        code = "conflict" if status == 409 else "not_found"
        raise APIError(status, str(exc), code=code) from None
    state.metrics.forget(name)  # its series go with it (bounded /metrics under churn)
    return AdapterDeleted(name=name)
