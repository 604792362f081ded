"""A MoLE served by the engine: greedy tokens equal the plain PyTorch + PEFT reference, next to
plain-adapter rows in the same batch; masking per request; all-but-one mask = that expert."""

from __future__ import annotations

import pytest
import torch
from compose_helpers import make_adapter, tiny
from mole_helpers import reference_model

from lorafleet.adapters import write_adapter
from lorafleet.compose.mole import MoleError, attach_mole, read_experts, save_mole
from lorafleet.compose.mole_serve import read_gates, serve_mole
from lorafleet.models.fingerprint import fingerprint
from lorafleet.models.loader import Base
from lorafleet.serve import Engine, SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["The film was a delight", "2 plus 2 is", "Tell me about rivers"]


def _base(tokenizer) -> Base:
    model = tiny(tokenizer)
    return Base("tiny", model, tokenizer, fingerprint(model), None, False, 0.0)


@pytest.fixture(scope="module")
def moles(tokenizer, tmp_path_factory):
    """Three experts and a MoLE over them per gate variant, with sharp random gates."""
    fp = _base(tokenizer).fingerprint
    root = tmp_path_factory.mktemp("served-mole")
    specs = []
    kinds = [
        dict(r=4, lora_alpha=8),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
        dict(r=8, lora_alpha=8),
    ]
    for i, lora in enumerate(kinds):
        adapter = make_adapter(tokenizer, seed=50 + i, **lora)
        adapter.meta = {"base_fingerprint": fp}
        write_adapter(root / f"e{i}", adapter)
        specs.append((f"e{i}", str(root / f"e{i}")))
    gen = torch.Generator().manual_seed(7)
    for variant in ("block", "outputs", "input"):
        mole = attach_mole(tiny(tokenizer), read_experts(specs), variant=variant, temperature=0.7)
        with torch.no_grad():
            for p in mole.gates.parameters():
                p.copy_(3.0 * torch.randn(p.shape, generator=gen))
        save_mole(root / f"mole-{variant}", mole, read_experts(specs), fp)
    plain = make_adapter(tokenizer, seed=60, r=4, lora_alpha=8)
    plain.meta = {"base_fingerprint": fp}
    return root, specs, plain


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    ids, out = torch.tensor([ids]), []
    for _ in range(n):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("variant", ["block", "outputs", "input"])
def test_served_mole_equals_the_reference_next_to_plain_rows(tokenizer, moles, variant):
    root, specs, plain = moles
    path = root / f"mole-{variant}"
    gates = read_gates(path)
    engine = Engine(_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=64)
    try:
        engine.load_adapter("plain", plain)
        served = serve_mole(engine, "mix", path)
        assert served.adapters == ["mix/e0", "mix/e1", "mix/e2"]
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        requests = [
            (prompts[0], served.mixture(), PARAMS),
            (prompts[1], "plain", PARAMS),
            (prompts[2], served.mixture(["e1"]), PARAMS),
            (prompts[1], served.mixture(["e0", "e2"]), PARAMS),
            (prompts[1], "mix/e1", PARAMS),
            (prompts[2], served.mixture(), PARAMS),
        ]
        together = engine.generate(requests)  # one batch: MoLE rows next to plain rows
        alone = [engine.generate([r])[0] for r in requests]
    finally:
        engine.close()
    # Rows 0 and 5 share one gate object: the batch coalesces them into one gate call.
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[0].adapter == "mix"
    keep = torch.tensor([True, False, True])
    want = [
        greedy(reference_model(tokenizer, specs, gates), prompts[0], 6),
        greedy(reference_model(tokenizer, specs, gates, keep), prompts[2], 6),
    ]
    assert [together[0].token_ids, together[2].token_ids] == want
    assert together[3].token_ids == together[4].token_ids  # all but e1 masked = e1 alone
    assert together[3].token_ids != together[1].token_ids  # not vacuous


def test_served_mole_refusals(tokenizer, moles):
    root, _, _ = moles
    engine = Engine(_base(tokenizer), max_slots=4, max_rank=8, max_seq_len=64)
    try:
        served = serve_mole(engine, "mix", root / "mole-input")
        with pytest.raises(MoleError, match="mask nope: not an expert of mix"):
            served.mixture(["nope"])
        with pytest.raises(MoleError, match="drops every expert"):
            served.mixture(["e0", "e1", "e2"])
    finally:
        engine.close()
    other = Engine(
        Base("tiny", tiny(tokenizer), tokenizer, "another", None, False, 0.0),
        max_slots=4,
        max_rank=8,
        max_seq_len=64,
    )
    try:
        with pytest.raises(MoleError, match="gates trained on another base"):
            serve_mole(other, "mix", root / "mole-input")
    finally:
        other.close()


def test_http_serves_a_mole_dir_by_name_with_masks(tokenizer, moles):
    import httpx

    from lorafleet.compose.mole_serve import MoleCatalog
    from lorafleet.serve.api import AuthConfig, ServerConfig
    from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

    root, _, _ = (
        moles  # e0, e1, e2 and the MoLE dirs mole-block, mole-outputs, mole-input side by side
    )
    settings = EngineSettings(
        quantize="none",
        max_adapters=4,
        max_rank=8,
        max_batch_size=8,
        max_batch_tokens=256,
        max_seq_len=64,
    )
    state = build_state(
        _base(tokenizer),
        root,
        AuthConfig.off(),
        settings,
        ServerConfig(model_name="tiny"),
        None,
        None,
        MoleCatalog,
    )
    srv = ServerThread(state).start()
    try:
        cards = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
        card = next(c for c in cards if c["id"] == "mole-block")
        assert card["experts"] == ["e0", "e1", "e2"]

        def text(model, **extra):
            body = {
                "model": model,
                "prompt": PROMPTS[1],
                "max_tokens": 6,
                "temperature": 0,
                **extra,
            }
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        full, only_e1, e1 = text("mole-block"), text("mole-block", mask=["e0", "e2"]), text("e1")
        assert only_e1 == e1 and full != e1
        for model, mask, message in (
            ("mole-block", ["nope"], "not an expert of mole-block"),
            ("e1", ["e0"], "is not one"),
        ):
            body = {"model": model, "prompt": "hi", "max_tokens": 2, "mask": mask}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 400 and message in r.json()["error"]["message"]
            assert r.json()["error"]["param"] == "mask"

        # LoRAX's /generate: the MoLE by adapter_id, parameters.mask as the OpenAI mask.
        def generated(adapter_id, **extra):
            params = {"adapter_id": adapter_id, "max_new_tokens": 6, **extra}
            r = httpx.post(
                srv.url + "/generate", json={"inputs": PROMPTS[1], "parameters": params}, timeout=60
            )
            assert r.status_code == 200, r.text
            return r.json()["generated_text"]

        assert generated("mole-block", mask=["e0", "e2"]) == generated("e1") == e1
        assert generated("mole-block") == full
        body = {"inputs": "hi", "parameters": {"adapter_id": "e1", "mask": ["e0"]}}
        r = httpx.post(srv.url + "/generate", json=body, timeout=60)
        assert r.status_code == 400 and "is not one" in r.json()["error"]["message"]
    finally:
        srv.stop()
