"""Fixtures for the HTTP server tests: a tiny base, an adapters dir, tenants, a live server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from peft import LoraConfig
from serve_helpers import TARGETS, peft_adapter, tiny_base

from lorafleet.adapters import write_adapter
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

ADMIN = "admin-key-0123"
KEYS = {"acme": "acme-key-1", "globex": "globex-key-2"}
AUTH = {
    "admin_keys": [ADMIN],
    "tenants": {
        "acme": {"keys": [KEYS["acme"]], "private_adapters": ["acme-secret"]},
        "globex": {"keys": [KEYS["globex"]], "private_adapters": ["globex-secret"]},
    },
}
PUBLIC = ["alpha", "beta", "gamma"]
SETTINGS = EngineSettings(
    quantize="none",
    max_adapters=4,
    max_rank=8,
    max_batch_size=32,
    max_batch_tokens=512,
    max_seq_len=128,
)


@pytest.fixture(scope="session")
def api_fp(tokenizer) -> str:
    return fingerprint(tiny_llama(0, vocab_size=len(tokenizer)))


def make_adapter(tokenizer, fp, seed: int, rank: int = 4):
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return peft_adapter(tokenizer, config, seed, fp)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tokenizer, api_fp) -> Path:
    """alpha, beta, gamma (public), acme-secret and globex-secret (private): random LoRAs."""
    root = tmp_path_factory.mktemp("api-adapters")
    for i, name in enumerate([*PUBLIC, "acme-secret", "globex-secret"]):
        write_adapter(root / name, make_adapter(tokenizer, api_fp, 100 + i))
    return root


@pytest.fixture(scope="session")
def auth_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.json"
    path.write_text(json.dumps(AUTH))
    return path


def start(
    tokenizer, adapters_dir, auth=None, settings=SETTINGS, classifier=None, **config
) -> ServerThread:
    state = build_state(
        tiny_base(tokenizer),
        adapters_dir,
        auth or AuthConfig.off(),
        settings,
        ServerConfig(model_name="tiny", **config),
        classifier,
    )
    return ServerThread(state).start()


def sse_data_lines(url: str, body: dict, on_line=None) -> list[str]:
    """The `data:` lines of a streamed POST /v1/completions (answered 200), in order;
    `on_line(n)` is called after the n-th one (e.g. to signal the server mid-stream)."""
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if on_line is not None:
                    on_line(len(lines))
    return lines


@pytest.fixture(scope="module")
def server(tokenizer, adapters_dir):
    """No auth: every adapter is open to everyone."""
    srv = start(tokenizer, adapters_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tenant_server(tokenizer, adapters_dir, auth_file, tmp_path_factory):
    """Tenants and admin keys, on its own copy of the adapters dir (admin tests change it)."""
    own = tmp_path_factory.mktemp("tenant") / "adapters"
    shutil.copytree(adapters_dir, own)
    srv = start(tokenizer, own, AuthConfig.load(auth_file))
    yield srv
    srv.stop()
