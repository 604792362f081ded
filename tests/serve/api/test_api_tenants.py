"""Tenancy and admin: private adapters, 401/404/403 answers, adding and removing adapters."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from conftest import ADMIN, KEYS, PUBLIC

from lorafleet.adapters import read_adapter
from lorafleet.serve.api import AuthConfig
from lorafleet.serve.api.auth import valid_name


def call(srv, method, path, key=None, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, srv.url + path, headers=headers, timeout=60, **kw)


def ask(srv, key, model):
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    return call(srv, "POST", "/v1/completions", key, json=body)


def test_no_key_or_wrong_key_is_401_in_openai_shape(tenant_server):
    for key in (None, "wrong-key", KEYS["acme"] + "x"):
        r = ask(tenant_server, key, "alpha")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert call(tenant_server, "GET", "/v1/models").status_code == 401


def test_models_show_public_and_own_private_only(tenant_server):
    def ids(key):
        return {m["id"] for m in call(tenant_server, "GET", "/v1/models", key).json()["data"]}

    assert ids(KEYS["acme"]) == {"tiny", *PUBLIC, "acme-secret"}
    assert ids(KEYS["globex"]) == {"tiny", *PUBLIC, "globex-secret"}
    assert {"acme-secret", "globex-secret"} <= ids(ADMIN)


def test_other_tenants_private_adapter_is_the_same_404_as_a_missing_one(tenant_server):
    assert ask(tenant_server, KEYS["acme"], "acme-secret").status_code == 200
    hidden = ask(tenant_server, KEYS["globex"], "acme-secret")
    missing = ask(tenant_server, KEYS["globex"], "acme-secreT")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert hidden.json()["error"]["message"].replace("acme-secret", "X") == missing.json()["error"][
        "message"
    ].replace("acme-secreT", "X")
    r = call(tenant_server, "GET", "/v1/models/acme-secret", KEYS["globex"])
    assert r.status_code == 404


def test_admin_routes_refuse_tenants_and_missing_keys(tenant_server):
    for key, status in ((None, 401), ("bad", 401), (KEYS["acme"], 403)):
        assert call(tenant_server, "GET", "/admin/adapters", key).status_code == status
        r = call(tenant_server, "DELETE", "/admin/adapters/alpha", key)
        assert r.status_code == status
    assert call(tenant_server, "GET", "/metrics", KEYS["acme"]).status_code == 403
    assert ask(tenant_server, KEYS["acme"], "alpha").status_code == 200  # alpha still there


def test_admin_refuses_traversal_names_and_paths(tenant_server):
    for name in ("..", "../x", "a/b", ".hidden", "x" * 65, "", "sp ace"):
        r = call(
            tenant_server, "POST", "/admin/adapters", ADMIN, json={"name": name, "path": "alpha"}
        )
        assert r.status_code in (400, 404, 405), (name, r.status_code)
        if r.status_code == 400:
            assert r.json()["error"]["code"] == "invalid_name"
    for path in ("../", "/etc", "../../tmp", "alpha/../../x"):
        r = call(
            tenant_server, "POST", "/admin/adapters", ADMIN, json={"name": "newone", "path": path}
        )
        assert r.status_code == 400, (path, r.text)
    assert call(tenant_server, "DELETE", "/admin/adapters/..%2F..%2Fetc", ADMIN).status_code in (
        400,
        404,
    )


def test_admin_adds_by_path_then_removes(tenant_server):
    srv = tenant_server
    root = srv.state.adapters_dir
    (root / "nested").mkdir()
    (root / "alpha").rename(root / "nested" / "alpha2")  # a path that is not a top-level dir
    try:
        r = call(
            srv, "POST", "/admin/adapters", ADMIN, json={"name": "a2", "path": "nested/alpha2"}
        )
        assert r.status_code == 201, r.text
        assert ask(srv, KEYS["acme"], "a2").status_code == 200
        r = call(
            srv, "POST", "/admin/adapters", ADMIN, json={"name": "a2", "path": "nested/alpha2"}
        )
        assert r.status_code in (201, 409)
        assert call(srv, "DELETE", "/admin/adapters/a2", ADMIN).status_code == 200
        assert ask(srv, KEYS["acme"], "a2").status_code == 404
        assert call(srv, "DELETE", "/admin/adapters/a2", ADMIN).status_code == 404
    finally:
        (root / "nested" / "alpha2").rename(root / "alpha")


def test_admin_upload_validates_and_writes_atomically(tenant_server):
    srv = tenant_server
    root = srv.state.adapters_dir
    src = root / "beta"
    files = {
        "adapter_config.json": (src / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (src / "adapter_model.safetensors").read_bytes(),
    }

    def upload(name, parts):
        multipart = [(f, (f, io.BytesIO(b), "application/octet-stream")) for f, b in parts.items()]
        return call(srv, "POST", "/admin/adapters", ADMIN, data={"name": name}, files=multipart)

    r = upload("up1", files)
    assert r.status_code == 201, r.text
    assert read_adapter(root / "up1").tensors.keys() == read_adapter(src).tensors.keys()
    assert ask(srv, KEYS["globex"], "up1").status_code == 200
    assert upload("up1", files).status_code == 409
    # A pickle instead of safetensors, a config that is not JSON, a wrong rank: refused, no dir.
    bad_cfg = {**files, "adapter_config.json": b"{not json"}
    high = json.loads(files["adapter_config.json"])
    high["r"] = 64
    for name, parts in (
        (
            "up2",
            {
                "adapter_config.json": files["adapter_config.json"],
                "adapter_model.bin": b"\x80\x04pickle",
            },
        ),
        ("up3", bad_cfg),
        ("up4", {**files, "adapter_config.json": json.dumps(high).encode()}),
    ):
        r = upload(name, parts)
        assert r.status_code == 400, (name, r.text)
        assert not (root / name).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".upload")]
    assert call(srv, "DELETE", "/admin/adapters/up1", ADMIN).status_code == 200


def test_metrics_for_admin(tenant_server):
    ask(tenant_server, KEYS["acme"], "gamma")
    text = call(tenant_server, "GET", "/metrics", ADMIN).text
    for name in (
        "lorafleet_requests_total",
        "lorafleet_time_to_first_token_seconds_bucket",
        "lorafleet_time_per_output_token_seconds",
        "lorafleet_queue_depth",
        "lorafleet_resident_adapters",
        "lorafleet_adapter_cache_hits_total",
        "lorafleet_adapter_cache_misses_total",
        "lorafleet_adapter_cache_loads_total",
        "lorafleet_prompt_tokens_total",
        "lorafleet_generated_tokens_total",
    ):
        assert name in text, name
    assert 'adapter="gamma"' in text and 'status="200"' in text


def test_auth_file_problems_are_one_line(tmp_path):
    cases = {
        "a.json": "{not json",
        "b.json": "[]",
        "c.json": '{"tenants": {"t": {"keys": [1]}}}',
        "d.json": '{"admin_keys": ["k"], "tenants": {"t": {"keys": ["k"]}}}',
        "e.json": '{"tenants": {"a": {"private_adapters": ["x"]}, '
        '"b": {"private_adapters": ["x"]}}}',
        "f.json": '{"extra": 1}',
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(Exception) as e:
            AuthConfig.load(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    (tmp_path / "ok.yaml").write_text("admin_keys: [k]\ntenants:\n  t: {keys: [k2]}\n")
    auth = AuthConfig.load(tmp_path / "ok.yaml")
    assert auth.identify("k").admin and auth.identify("k2").tenant == "t"
    assert auth.identify("k3") is None and auth.identify(None) is None


def test_name_rule():
    assert valid_name("my-adapter_1.0") and not valid_name("..") and not valid_name("a/b")
    assert not valid_name(".x") and not valid_name("x" * 65) and valid_name("x" * 64)
