"""What `lorafleet serve` serves beside plain adapters, over a 2-replica Ray fleet of the tiny
model, each answer equal to the single-process server's over the same directory: a MoLE
(routed by its name, run by a replica's own gates), a ties merge (merged once by the ingress,
written to the shared directory, read by the replica), Laplace class_choices (on a replica),
a hub adapter (fetched by the ingress from an offline hub cache, copied to the shared
directory) and a LoRA of Change image edit (run by the ingress). One fleet for all of them."""

from __future__ import annotations

import copy
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("ray")  # the only reason these tests skip: `make install` installs Ray
pytest.importorskip("ray.serve")

from helpers import write_random_lora  # noqa: E402
from hub_cache import adapter_files, go_offline, put_repo  # noqa: E402
from PIL import Image  # noqa: E402

from lorafleet.adapters import attach, read_adapter  # noqa: E402
from lorafleet.bayes import calibrate  # noqa: E402
from lorafleet.bayes.serving import laplace_classifier  # noqa: E402
from lorafleet.change.serving import ChangeCatalog, ChangeEditor  # noqa: E402
from lorafleet.change.store import ChangeConfig, build, save_model  # noqa: E402
from lorafleet.compose import merge_adapters  # noqa: E402
from lorafleet.compose.mole import attach_mole, read_experts, save_mole  # noqa: E402
from lorafleet.compose.mole_serve import MoleCatalog  # noqa: E402
from lorafleet.data import load_examples  # noqa: E402
from lorafleet.errors import LorafleetError  # noqa: E402
from lorafleet.models import load_base  # noqa: E402
from lorafleet.serve.api import AuthConfig, ServerConfig  # noqa: E402
from lorafleet.serve.api.config import EngineSettings  # noqa: E402
from lorafleet.serve.api.server import ServerThread, build_state  # noqa: E402
from lorafleet.serve.ray import start_fleet  # noqa: E402
from lorafleet.serve.ray.ingress import HUB_DIR, MERGED_DIR  # noqa: E402
from lorafleet.serve.ray.wire import HUB_NEEDS_SHARED_DIR  # noqa: E402

SETTINGS = EngineSettings(
    quantize="none",
    max_adapters=3,
    max_rank=8,
    max_batch_size=16,
    max_batch_tokens=256,
    max_seq_len=512,
)
HUB_REPO = "acme/tiny-lora"
PROMPT = "Review: a warm, funny and moving film\nSentiment:"
CHOICES = [" negative", " positive"]
WAIT = 120


def write_mole(base, out, experts: dict) -> None:
    """A MoLE at `out` over {expert name: adapter dir}, with random input gates."""
    specs = [(name, str(path)) for name, path in experts.items()]
    mole = attach_mole(copy.deepcopy(base.model), read_experts(specs), variant="input")
    with torch.no_grad():
        for p in mole.gates.parameters():
            p.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
    save_mole(out, mole, read_experts(specs), base.fingerprint)


def png(seed: int, size=(24, 24)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ROOT/adapters (alpha, beta, calib: alpha calibrated, moe over alpha + beta), a LoC
    model (the --change dir) and an offline hub cache holding HUB_REPO (another LoRA);
    HF_HUB_OFFLINE on for the module (set before Ray starts: its workers inherit it)."""
    root = tmp_path_factory.mktemp("ray-features")
    adapters = root / "adapters"
    base = load_base("tiny", device="cpu")
    for seed, name in enumerate(["alpha", "beta"]):
        write_random_lora(base, adapters / name, 500 + seed)
    write_mole(base, adapters / "moe", {"a": adapters / "alpha", "b": adapters / "beta"})
    write_random_lora(base, adapters / "calib", 500)
    model = attach(copy.deepcopy(base.model), read_adapter(adapters / "calib"))
    train = load_examples("sst2", base.tokenizer, split="train", chat=False, limit=12)
    calibrate(model, base.tokenizer, adapters / "calib", train, max_length=96)
    cfg = ChangeConfig(image_size=16, width=4, dim=16, depth=1)
    save_model(root / "loc", cfg, *build(cfg))
    write_random_lora(base, root / "hub-src", 599)
    with pytest.MonkeyPatch.context() as mp:
        cache = go_offline(mp, root)
        commit = put_repo(cache, HUB_REPO, adapter_files(root / "hub-src"))
        yield {"root": root, "adapters": adapters, "loc": root / "loc", "commit": commit}


def features(env) -> dict:
    """What `lorafleet serve` injects (the CLI's own choices)."""
    return {
        "classifier": laplace_classifier,
        "merge": merge_adapters,
        "moles": MoleCatalog,
        "image_editor": ChangeEditor(env["loc"]),
        "image_editors": ChangeCatalog,
    }


@pytest.fixture(scope="module")
def single(env):
    config = ServerConfig(model_name="tiny", hub_adapters=True)
    loaded = load_base("tiny", device="cpu")
    state = build_state(
        loaded, env["adapters"], AuthConfig.off(), SETTINGS, config, **features(env)
    )
    with ServerThread(state) as srv:
        yield srv


@pytest.fixture(scope="module")
def fleet(env):
    config = ServerConfig(model_name="tiny", hub_adapters=True, drain_timeout_s=1.0)
    # float32 as the single server (bfloat16, `auto` on some CPUs, depends on the batching)
    with start_fleet(
        "tiny",
        env["adapters"],
        replicas=2,
        settings=SETTINGS,
        config=config,
        dtype="float32",
        **features(env),
    ) as fleet:
        fleet.start_http()
        yield fleet


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=WAIT)


def complete(url: str, model: str, **extra) -> str:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    r = post(url, "/v1/completions", {**body, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def models(url: str) -> list[dict]:
    data = httpx.get(url + "/v1/models", timeout=WAIT).json()["data"]
    return [{k: v for k, v in card.items() if k != "created"} for card in data]


def test_models_list_the_mole_as_lorafleet_serve_does(fleet, single):
    got = models(fleet.url)
    assert got == models(single.url)
    moe = next(card for card in got if card["id"] == "moe")
    assert moe["experts"] == ["a", "b"]


def test_a_mole_runs_on_a_replica_routed_by_its_name(fleet, single):
    for mask in (None, ["a"]):
        extra = {"mask": mask} if mask else {}
        got = complete(fleet.url, "moe", **extra)
        assert got == complete(single.url, "moe", **extra)
    assert complete(fleet.url, "moe") != complete(fleet.url, "alpha")
    # Both experts went into the slots of the one replica the MoLE's name routes to. Replicas
    # post their stats every REPORT_EVERY_S: a row read at once may predate the loads.
    deadline = time.monotonic() + 10
    while True:
        rows = fleet.replica_stats()
        if any({"moe.a", "moe.b"} <= set(row["resident"]) for row in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    r = post(fleet.url, "/v1/completions", {"model": "moe", "prompt": "Hi", "mask": ["zz"]})
    assert r.status_code == 400 and "not an expert of moe" in r.json()["error"]["message"]


def test_a_ties_merge_is_written_once_to_the_shared_dir_and_served(fleet, single, env):
    merged = {
        "ids": ["alpha", "beta"],
        "weights": [0.7, 0.5],
        "merge_strategy": "ties",
        "density": 0.5,
    }
    body = {"inputs": "Once upon a time", "parameters": {"merged_adapters": merged}}
    body["parameters"]["max_new_tokens"] = 8
    want = post(single.url, "/generate", body)
    assert want.status_code == 200, want.text
    for _ in range(2):
        r = post(fleet.url, "/generate", body)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == want.json()["generated_text"]
    written = list((env["adapters"] / MERGED_DIR).iterdir())
    assert [p.name[: len("merged-ties-")] for p in written] == ["merged-ties-"]
    assert (written[0] / "adapter_model.safetensors").is_file()
    assert "merged-ties" not in {card["id"][:11] for card in models(fleet.url)}


def test_class_choices_run_on_a_replica(fleet, single):
    body = {"model": "calib", "prompt": PROMPT, "class_choices": CHOICES}
    want = post(single.url, "/v1/completions", body).json()["choices"][0]
    r = post(fleet.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]
    assert got["class_probs"]["method"] == "laplace"
    assert got["class_probs"]["probs"] == pytest.approx(want["class_probs"]["probs"], abs=1e-5)
    assert got["text"] == want["text"]
    r = post(fleet.url, "/v1/completions", {**body, "model": "alpha"})  # not calibrated
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_calibrated"


def test_a_hub_adapter_is_fetched_by_the_ingress_into_the_shared_dir(fleet, single, env):
    got = complete(fleet.url, HUB_REPO)
    assert got == complete(single.url, HUB_REPO)
    assert got != complete(fleet.url, "tiny")
    copied = env["adapters"] / HUB_DIR / HUB_REPO / env["commit"]
    assert (copied / "adapter_model.safetensors").is_file()
    assert not (copied / "adapter_model.safetensors").is_symlink()  # the bytes, not a link
    assert HUB_REPO in [card["id"] for card in models(fleet.url)]


def test_an_image_edit_is_run_by_the_ingress(fleet, single):
    files = {k: (f"{k}.png", png(i), "image/png") for i, k in enumerate(("before", "after"))}
    files["image"] = ("image.png", png(7, (30, 22)), "image/png")
    want = httpx.post(single.url + "/v1/images/edits", files=files, timeout=WAIT)
    r = httpx.post(fleet.url + "/v1/images/edits", files=files, timeout=WAIT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content == want.content


def test_hub_adapters_on_a_cluster_need_a_shared_directory(tmp_path):
    from lorafleet.cli.ray_serve import check_ray_flags

    with pytest.raises(LorafleetError) as err:
        check_ray_flags(True, "auto", 2, hub_adapters=True, adapters=HUB_REPO)
    assert str(err.value) == HUB_NEEDS_SHARED_DIR and "\n" not in HUB_NEEDS_SHARED_DIR
    check_ray_flags(True, "auto", 2, hub_adapters=True, adapters=str(tmp_path))
    check_ray_flags(True, None, 2, hub_adapters=True, adapters=HUB_REPO)  # one machine
    with pytest.raises(LorafleetError, match="--adapters DIR"):
        start_fleet("tiny", None, address="auto", config=ServerConfig("tiny", hub_adapters=True))


def test_the_mole_request_is_sent_by_reference():
    """The ingress sends a MoLE by name (its gates stay out of the request's payload)."""
    from lorafleet.serve.ray.ingress import RoutedMoles
    from lorafleet.serve.ray.wire import MoleRef, route_id
    from lorafleet.serve.sequence import Mixture

    class Catalog:
        def __contains__(self, name):
            return name == "m"

        def spec(self, name, mask=()):
            if set(mask) - {"x", "y"}:
                raise LorafleetError("mask z: not an expert of m (x, y)")
            return Mixture((("m.x", 1.0), ("m.y", 1.0)), gate=object(), name="m")

    moles = RoutedMoles(Catalog())
    spec = moles.spec("m", ["y"])
    assert spec.gate == MoleRef("m", ("y",)) and spec.names == ("m.x", "m.y")
    assert route_id(spec) == "m"
    with pytest.raises(LorafleetError, match="not an expert"):
        moles.spec("m", ["z"])
    assert json.loads(json.dumps(list(spec.gate.mask))) == ["y"]
