"""No entry stops the server: an adapters directory holding good adapters, a MoLE copied beside
its experts and a bundled one beside each kind of broken entry (a MoLE with a missing or a
changed expert, a broken calibration, a corrupt LoC model, a non-adapter folder, a stray file)
starts, serves the good ones, lists the broken ones as unavailable with their reasons (admin
listing, /metrics), answers 400 naming the problem for each, and follows rescans."""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import ADMIN, AUTH, KEYS, SETTINGS, make_adapter
from PIL import Image
from serve_helpers import tiny_base

from lorafleet.adapters import write_adapter
from lorafleet.bayes.serving import laplace_classifier
from lorafleet.change.serving import ChangeCatalog
from lorafleet.change.store import ChangeConfig, build, save_model
from lorafleet.compose.mole import attach_mole, read_experts, save_mole
from lorafleet.compose.mole_bundle import bundle_mole
from lorafleet.compose.mole_serve import MoleCatalog
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import ServerThread, build_state

KEY = KEYS["acme"]
BROKEN = {  # entry -> (kind, what its reason says)
    "moe-missing": ("mole", "expert x is missing"),
    "moe-changed": ("mole", "changed since the gates were trained"),
    "calib-broken": ("calibrated", "not a lorafleet Laplace factors file"),
    "loc-corrupt": ("change", "cannot load the LoC"),
    "notes": ("unknown", "not an adapter directory (no adapter_config.json)"),
    "stray.txt": ("unknown", "a file, not an adapter directory"),
}


def _mole(tokenizer, fp, out, experts: dict):
    """A MoLE at `out` over {expert name: adapter dir}, with random input gates."""
    specs = [(name, str(path)) for name, path in experts.items()]
    model = tiny_llama(0, vocab_size=len(tokenizer))
    mole = attach_mole(model, read_experts(specs), variant="input")
    with torch.no_grad():
        for p in mole.gates.parameters():
            p.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
    return save_mole(out, mole, read_experts(specs), fp)


def _loc(folder):
    cfg = ChangeConfig(image_size=16, width=4, dim=16, depth=1)
    return save_model(folder, cfg, *build(cfg))


@pytest.fixture(scope="module")
def entries(tmp_path_factory, tokenizer, api_fp):
    """ROOT: alpha, beta, ad-lora, ad-mlp (adapters), moe (copied beside its experts),
    moe-bundled (its experts inside it), loc-good, and the BROKEN entries."""
    tmp = tmp_path_factory.mktemp("entries")
    root, train = tmp / "adapters-dir", tmp / "train"
    for i, name in enumerate(["alpha", "beta"]):
        write_adapter(root / name, make_adapter(tokenizer, api_fp, 200 + i))
    for i, name in enumerate(["ad-lora", "ad-mlp", "gone", "cx", "b1", "b2"]):
        write_adapter(train / "adapters" / name, make_adapter(tokenizer, api_fp, 210 + i))
    ad = train / "adapters"
    # The case: trained at train/moe over train/adapters/*, copied beside copies.
    _mole(tokenizer, api_fp, train / "moe", {"lora": ad / "ad-lora", "mlp": ad / "ad-mlp"})
    for name in ("ad-lora", "ad-mlp", "moe"):
        shutil.copytree(train / ("adapters/" + name if name != "moe" else name), root / name)
    # Bundled elsewhere, then moved in: its experts are nowhere else in the directory.
    _mole(tokenizer, api_fp, train / "moe-b", {"p": ad / "b1", "q": ad / "b2"})
    bundle_mole(train / "moe-b", tmp / "elsewhere" / "bundle")
    (tmp / "elsewhere" / "bundle").rename(root / "moe-bundled")
    # Broken entries.
    _mole(tokenizer, api_fp, root / "moe-missing", {"x": ad / "gone"})
    shutil.rmtree(ad / "gone")
    _mole(tokenizer, api_fp, train / "moe-changed", {"y": ad / "cx"})
    shutil.copytree(train / "moe-changed", root / "moe-changed")
    write_adapter(root / "cx", make_adapter(tokenizer, api_fp, 299))  # cx, other bytes
    shutil.copytree(root / "alpha", root / "calib-broken")
    (root / "calib-broken" / "laplace.json").write_text("{}")
    (root / "calib-broken" / "laplace.safetensors").write_bytes(b"not safetensors")
    _loc(root / "loc-good")
    _loc(root / "loc-corrupt")
    (root / "loc-corrupt" / "editor.safetensors").write_bytes(b"\x00" * 64)
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an adapter")
    (root / "stray.txt").write_text("a stray file")
    return root


@pytest.fixture(scope="module")
def srv(tokenizer, entries, tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth.json"
    path.write_text(__import__("json").dumps(AUTH))
    state = build_state(
        tiny_base(tokenizer),
        entries,
        AuthConfig.load(path),
        SETTINGS,
        ServerConfig(model_name="tiny"),
        laplace_classifier,
        None,
        MoleCatalog,
        None,
        ChangeCatalog,
    )
    server = ServerThread(state).start()
    yield server
    server.stop()


def call(srv, method, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, srv.url + path, headers=headers, timeout=120, **kw)


def complete(srv, model):
    body = {"model": model, "prompt": "Two plus two is", "max_tokens": 4, "temperature": 0}
    return call(srv, "POST", "/v1/completions", json=body)


def listing(srv) -> dict:
    rows = call(srv, "GET", "/admin/adapters", ADMIN).json()["adapters"]
    return {row["name"]: row for row in rows}


def unavailable_metrics(srv) -> tuple[float, dict]:
    text = call(srv, "GET", "/metrics", ADMIN).text
    count = float(re.search(r"^lorafleet_adapters_unavailable (\S+)$", text, re.M).group(1))
    lines = re.findall(
        r'^lorafleet_adapter_unavailable\{adapter="([^"]+)",kind="([^"]+)"', text, re.M
    )
    return count, dict(lines)


def assert_refused(r, name, needle):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "model_unavailable" and err["param"] == "model"
    assert name in err["message"] and needle in err["message"], err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]


def png(seed, size=(24, 24)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def edit(srv, model):
    files = {
        k: (f"{k}.png", png(i), "image/png") for i, k in enumerate(("before", "after", "image"))
    }
    return call(srv, "POST", "/v1/images/edits", files=files, data={"model": model})


def test_good_entries_serve_beside_every_kind_of_broken_one(srv):
    # Served: plain adapters, the MoLE copied beside its experts, the bundled MoLE.
    texts = {}
    for model in ("alpha", "beta", "moe", "moe-bundled", "ad-lora"):
        r = complete(srv, model)
        assert r.status_code == 200, (model, r.text)
        texts[model] = r.json()["choices"][0]["text"]
    assert texts["moe"] != texts["ad-lora"]  # the MoLE mixes, not one expert
    models = {m["id"] for m in call(srv, "GET", "/v1/models").json()["data"]}
    assert {"alpha", "beta", "moe", "moe-bundled"} <= models
    assert not models & set(BROKEN)

    # Listed with their kind and reason, as unavailable.
    rows = listing(srv)
    for name, (kind, needle) in BROKEN.items():
        row = rows[name]
        assert row["state"] == "unavailable" and row["kind"] == kind, row
        assert name in row["reason"] and needle in row["reason"], row
        assert str(srv.state.adapters_dir) not in row["reason"]  # paths relative to the dir
    assert rows["moe"]["kind"] == "mole" and rows["moe"]["reason"] is None
    assert rows["loc-good"]["state"] == "available" and rows["loc-good"]["kind"] == "change"
    assert rows["alpha"]["kind"] == "adapter" and rows["alpha"]["state"] != "unavailable"
    count, labelled = unavailable_metrics(srv)
    assert count == len(BROKEN) and labelled == {n: k for n, (k, _) in BROKEN.items()}

    # A request naming a broken entry: a 400 naming it and its problem; the others go on.
    for name, (_, needle) in BROKEN.items():
        assert_refused(complete(srv, name), name, needle)
    body = {"model": "mix:alpha*0.5+moe-missing*0.5", "prompt": "Hi", "max_tokens": 2}
    assert_refused(call(srv, "POST", "/v1/completions", json=body), "moe-missing", "missing")
    assert_refused(edit(srv, "loc-corrupt"), "loc-corrupt", "cannot load the LoC")
    # The good LoC model edits images by name; a text request for it says where it goes.
    r = edit(srv, "loc-good")
    assert r.status_code == 200 and r.headers["x-lorafleet-model"] == "loc-good", r.text
    r = complete(srv, "loc-good")
    assert r.status_code == 400 and "/v1/images/edits" in r.json()["error"]["message"]
    assert complete(srv, "alpha").json()["choices"][0]["text"] == texts["alpha"]


def _swap_weights(target, source):
    """Copy `source`'s weights over `target`'s, with a new mtime (even on a coarse clock)."""
    file = target / "adapter_model.safetensors"
    shutil.copyfile(source / "adapter_model.safetensors", file)
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_rescans_break_and_fix_entries(srv, entries, tmp_path, caplog):
    saved = tmp_path / "ad-mlp"
    shutil.copytree(entries / "ad-mlp", saved)
    assert complete(srv, "moe").status_code == 200
    # An expert rewritten in place: the MoLE is refused at its next request (re-checked).
    _swap_weights(entries / "ad-mlp", entries / "alpha")
    assert_refused(complete(srv, "moe"), "moe", "changed since the gates were trained")
    assert listing(srv)["moe"]["state"] == "unavailable"
    assert unavailable_metrics(srv)[1]["moe"] == "mole"
    listing(srv)  # a rescan with nothing changed logs nothing again
    assert sum("'moe' is unavailable" in r.getMessage() for r in caplog.records) == 1
    # Restored: it serves again; the listing and metrics follow.
    _swap_weights(entries / "ad-mlp", saved)
    assert complete(srv, "moe").status_code == 200
    assert listing(srv)["moe"]["state"] == "available"
    assert "moe" not in unavailable_metrics(srv)[1]

    # The broken calibration removed: a plain adapter again, served.
    for name in ("laplace.json", "laplace.safetensors"):
        (entries / "calib-broken" / name).unlink()
    row = listing(srv)["calib-broken"]
    assert row["kind"] == "adapter" and row["reason"] is None and row["state"] != "unavailable"
    assert complete(srv, "calib-broken").status_code == 200
    # A good adapter losing its config: unavailable, with the reason.
    (entries / "beta" / "adapter_config.json").rename(tmp_path / "beta-config.json")
    assert listing(srv)["beta"]["state"] == "unavailable"
    assert_refused(complete(srv, "beta"), "beta", "not an adapter directory")
    (tmp_path / "beta-config.json").rename(entries / "beta" / "adapter_config.json")
    assert complete(srv, "beta").status_code == 200
    count, labelled = unavailable_metrics(srv)
    assert count == len(BROKEN) - 1 and "beta" not in labelled and "calib-broken" not in labelled


def test_entry_checks_and_rescans_run_off_the_event_loop(srv, monkeypatch):
    """Re-checking a named entry (which may load a MoLE or LoC model from disk) and the rescan
    behind a listing run on worker threads: the server answers other requests meanwhile."""
    reg, inside = srv.state.registry, threading.Event()

    def slow(real):
        def run(*args, **kw):
            inside.set()
            time.sleep(2.0)  # a big model's load
            return real(*args, **kw)

        return run

    monkeypatch.setattr(reg, "refresh", slow(reg.refresh))
    monkeypatch.setattr(reg, "rescan", slow(reg.rescan))
    chat = {"model": "moe", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for send in (
        lambda: complete(srv, "moe"),
        lambda: call(srv, "POST", "/v1/chat/completions", json=chat),
        lambda: edit(srv, "loc-good"),
        lambda: call(srv, "GET", "/v1/models"),
    ):
        inside.clear()
        got = {}
        worker = threading.Thread(target=lambda send=send, got=got: got.update(r=send()))
        worker.start()
        assert inside.wait(60)
        began = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        assert time.monotonic() - began < 1.0  # not behind the 2 s check
        worker.join(60)
        assert got["r"].status_code == 200, got["r"].text
