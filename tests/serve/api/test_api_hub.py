"""Hub adapters over HTTP, offline: `model` / adapter_id `org/name[@revision]` loaded on first
request from a local copy laid out as the hub cache (never downloaded), fetched once, with the
same tokens as the same adapter from a local directory; `serve --adapters org/name`; refusals
(not cached, pickles only, the hub off) in OpenAI's error shape."""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import SETTINGS
from hub_cache import adapter_files, count_fetches, go_offline, put_repo, write_lora
from serve_helpers import tiny_base

from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import ServerThread, build_state

REPO = "acme/tiny-lora"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, tokenizer):
    """An offline hub cache (acme/tiny-lora: main = lora v1, tag v2 = lora v2; acme/pickled:
    a pickle and code only) and a local adapters dir with the same two LoRAs as `v1`, `v2`;
    snapshot_download's calls counted. Undone after the module."""
    root = tmp_path_factory.mktemp("hub-api")
    local = root / "adapters"
    write_lora(local / "v1", tokenizer, seed=1)
    write_lora(local / "v2", tokenizer, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        cache = go_offline(mp, root)
        v1 = put_repo(cache, REPO, adapter_files(local / "v1"))
        v2 = put_repo(cache, REPO, adapter_files(local / "v2"), ref="v2")
        config = (local / "v1" / "adapter_config.json").read_bytes()
        unsafe = {"adapter_config.json": config, "adapter_model.bin": b"\x80.", "run.py": b""}
        put_repo(cache, "acme/pickled", unsafe)
        yield {"root": root, "local": local, "v1": v1, "v2": v2, "fetches": count_fetches(mp)}


def start(tokenizer, adapters_dir, hub: bool) -> ServerThread:
    config = ServerConfig(model_name="tiny", hub_adapters=hub)
    state = build_state(tiny_base(tokenizer), adapters_dir, AuthConfig.off(), SETTINGS, config)
    return ServerThread(state).start()


@pytest.fixture(scope="module")
def hub_server(hub_env, tokenizer):
    srv = start(tokenizer, hub_env["local"], hub=True)
    yield srv
    srv.stop()


def complete(srv, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)


def text(srv, model: str) -> str:
    r = complete(srv, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_hub_id_is_loaded_on_first_request_and_fetched_once(hub_server, hub_env):
    fetches = hub_env["fetches"]
    before = len(fetches)
    assert REPO not in [m["id"] for m in httpx.get(f"{hub_server.url}/v1/models").json()["data"]]
    from_hub = text(hub_server, REPO)
    assert from_hub == text(hub_server, "v1")  # the same adapter from a local directory
    assert from_hub != text(hub_server, "tiny")  # and it does change the output
    assert len(fetches) == before + 1
    assert text(hub_server, REPO) == from_hub
    assert len(fetches) == before + 1  # the second request did not fetch
    listed = [m["id"] for m in httpx.get(f"{hub_server.url}/v1/models").json()["data"]]
    assert REPO in listed


def test_revision_selects_the_snapshot(hub_server, hub_env):
    pinned = text(hub_server, f"{REPO}@v2")
    assert pinned == text(hub_server, "v2") != text(hub_server, "v1")
    assert text(hub_server, f"{REPO}@{hub_env['v2']}") == pinned


def test_lorax_generate_takes_a_hub_adapter_id(hub_server):
    def generate(**params) -> str:
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 8, **params}}
        r = httpx.post(f"{hub_server.url}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    assert generate(adapter_id=REPO, adapter_source="hub") == generate(adapter_id="v1")


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("acme/missing", ["acme/missing", "not in the local hub cache", "HF_HUB_OFFLINE"]),
        ("acme/pickled", ["acme/pickled", "adapter_model.bin", "safetensors"]),
    ],
)
def test_refusals_are_4xx_in_openai_shape(hub_server, model, needles):
    for _ in range(2):  # the second answer comes from the remembered failure
        r = complete(hub_server, model)
        assert 400 <= r.status_code < 500, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert all(needle in error["message"] for needle in needles), error
        assert "\n" not in error["message"]
    assert text(hub_server, "v1")  # the server serves on


def test_with_the_hub_off_a_hub_id_is_a_404_naming_the_flag(hub_env, tokenizer):
    srv = start(tokenizer, hub_env["local"], hub=False)
    try:
        r = complete(srv, REPO)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "--hub-adapters" in error["message"]
        assert REPO in error["message"]
        r = complete(srv, "nothere")  # a plain unknown name gets no hint
        assert r.status_code == 404 and "--hub-adapters" not in r.text
    finally:
        srv.stop()


def test_a_local_directory_named_like_the_hub_id_wins(hub_env, tokenizer, tmp_path):
    local = tmp_path / "adapters"
    shutil.copytree(hub_env["local"] / "v2", local / "acme" / "tiny-lora")
    shutil.copytree(hub_env["local"] / "v2", local / "v2")
    srv = start(tokenizer, local, hub=True)
    try:
        before = len(hub_env["fetches"])
        assert text(srv, REPO) == text(srv, "v2")  # acme/tiny-lora's hub main is v1
        assert len(hub_env["fetches"]) == before
    finally:
        srv.stop()


def test_serve_adapters_names_a_hub_id(hub_env, run_cli, tiny_base_dir, monkeypatch):
    import lorafleet.serve.api.server as server_module

    started = []
    monkeypatch.setattr(server_module, "serve_forever", lambda state, *a: started.append(state))
    code, _, err = run_cli(
        "serve", "--base", tiny_base_dir, "--adapters", f"{REPO}@v2", "--hub-adapters"
    )
    assert code == 0, err
    assert f"1 adapter(s) ({REPO}@v2)" in err
    state = started[0]
    state.registry.add("v2", hub_env["local"] / "v2")  # the same adapter from a directory
    with ServerThread(state) as srv:
        assert text(srv, f"{REPO}@v2") == text(srv, "v2")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--adapters", "acme/missing", "--hub-adapters"], ["acme/missing", "HF_HUB_OFFLINE"]),
        (["--adapters", "acme/pickled", "--hub-adapters"], ["acme/pickled", "adapter_model.bin"]),
        (["--adapters", REPO], [REPO, "no such directory", "--hub-adapters"]),
    ],
)
def test_serve_refuses_in_one_line(hub_env, run_cli, tiny_base_dir, monkeypatch, args, needles):
    import lorafleet.serve.api.server as server_module

    monkeypatch.setattr(server_module, "serve_forever", lambda *a: pytest.fail("it served"))
    code, _, err = run_cli("serve", "--base", tiny_base_dir, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(needle in err for needle in needles), err
