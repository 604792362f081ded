"""POST /v1/images/edits (LoRA of Change in the server): the same pixels as `change apply`, bad
images answered 400 in OpenAI's shape, a clear 404 without a LoC model, off the event loop."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import tiny_base

import lorafleet.serve.api.image_edits as image_edits
from lorafleet.change.run import apply_change, example_images
from lorafleet.change.serving import ChangeEditor
from lorafleet.change.store import ChangeConfig, build, save_model
from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

TINY = ChangeConfig(image_size=16, width=4, dim=16, depth=1)
URL = "/v1/images/edits"
WAIT = 180  # seconds per HTTP call: generous, the test machine may be heavily loaded


def tiny_loc(folder):
    """A tiny LoC model whose hypernetwork emits non-zero LoRAs (random head weights)."""
    editor, hyper = build(TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hyper.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_model(folder, TINY, editor, hyper)


def png(path, size, seed, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def loc(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    files = {
        "before": png(root / "a.png", (24, 24), 0),
        "after": png(root / "a2.png", (24, 24), 1),
        "image": png(root / "b.png", (30, 22), 2),
    }
    (root / "loras").mkdir()
    return {"model": tiny_loc(root / "model"), "loras": root / "loras", "root": root, **files}


@pytest.fixture(scope="module")
def loc_server(tokenizer, loc):
    settings = EngineSettings(quantize="none", max_adapters=2, max_rank=8, max_seq_len=128)
    state = build_state(
        tiny_base(tokenizer),
        None,
        AuthConfig.off(),
        settings,
        ServerConfig(model_name="tiny"),
        image_editor=ChangeEditor(loc["model"], loc["loras"]),
    )
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


def post(srv, files=None, data=None, **kw):
    return httpx.post(srv.url + URL, files=files, data=data, timeout=WAIT, **kw)


def pair_files(loc, **override):
    names = {"before": loc["before"], "after": loc["after"], "image": loc["image"], **override}
    return {
        k: (f"{k}.png", v.read_bytes() if hasattr(v, "read_bytes") else v, "image/png")
        for k, v in names.items()
        if v is not None
    }


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def assert_openai_error(r, status, needle, param="missing"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert needle in err["message"], err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    if param != "missing":
        assert err["param"] == param, err


def test_edit_equals_the_python_apply_api_and_saved_loras_reuse_it(loc_server, loc, tmp_path):
    r = post(loc_server, pair_files(loc))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-lorafleet-model"] == "model"
    got = pixels(r.content)
    assert got.shape == (22, 30, 3)  # B's own size
    apply_change(
        loc["model"],
        loc["image"],
        tmp_path / "ref.png",
        loc["before"],
        loc["after"],
        save_lora=loc["loras"] / "warm",
    )
    ref = pixels((tmp_path / "ref.png").read_bytes())
    assert np.array_equal(got, ref)
    assert not np.array_equal(got, pixels(loc["image"].read_bytes()))  # it did edit the image
    # OpenAI's JSON shape: the same PNG as base64.
    r = post(loc_server, pair_files(loc), data={"response_format": "b64_json", "model": "model"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    assert np.array_equal(pixels(base64.b64decode(body["data"][0]["b64_json"])), ref)
    # The saved LoRA by name, without a pair: the same edit.
    info = httpx.get(loc_server.url + "/v1/images/editor", timeout=WAIT).json()
    assert (
        info["loras"] == ["warm"] and info["model"] == "model" and "unseen:hue" in info["examples"]
    )
    r = post(loc_server, pair_files(loc, before=None, after=None), data={"lora": "warm"})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.content), ref)


def test_bad_images_and_fields_get_400_in_openai_shape(loc_server, loc, tmp_path, monkeypatch):
    jpeg, deep, wide = io.BytesIO(), tmp_path / "deep.png", tmp_path / "wide.png"
    Image.new("RGB", (20, 20)).save(jpeg, format="JPEG")
    Image.new("I;16", (20, 20)).save(deep)
    Image.new("RGB", (2100, 10)).save(wide)
    cases = [  # (files override, extra data, needle, param)
        ({"image": b"just some text, not an image"}, {}, "not a readable image", "image"),
        ({"before": b""}, {}, "empty file", "before"),
        ({"after": jpeg.getvalue()}, {}, "not a PNG image (JPEG)", "after"),
        ({"image": deep.read_bytes()}, {}, "unsupported PNG mode I;16", "image"),
        ({"image": wide.read_bytes()}, {}, "2100x10 px; sides must be 8-2048 px", "image"),
        ({"image": None}, {}, "image: missing", "image"),
        ({"after": None}, {}, "give both before and after", None),
        ({}, {"lora": "warm"}, "give either an example pair", None),
        ({}, {"n": "2"}, "only n=1", "n"),
        ({}, {"response_format": "url"}, "one of png, b64_json", "response_format"),
        ({}, {"style": "x"}, "unknown field 'style'", "style"),
    ]
    loc["loras"].joinpath("warm").mkdir(exist_ok=True)
    (loc["loras"] / "warm" / "adapter_config.json").touch(exist_ok=True)
    for override, data, needle, param in cases:
        r = post(loc_server, pair_files(loc, **override), data)
        assert_openai_error(r, 400, needle, param)
    # An image as a text field, and a JSON body instead of multipart.
    r = post(loc_server, pair_files(loc, image=None), {"image": "b.png"})
    assert_openai_error(r, 400, "image: must be a file", "image")
    r = httpx.post(loc_server.url + URL, json={"image": "x"}, timeout=WAIT)
    assert_openai_error(r, 400, "send multipart/form-data")
    # Over the byte limit (lowered here to 1 KB): refused before decoding.
    monkeypatch.setattr(image_edits, "MAX_IMAGE_MB", 1 / 1024)
    r = post(loc_server, pair_files(loc))
    assert_openai_error(r, 400, "the image is over", "before")
    monkeypatch.undo()
    # Unknown names: 404s.
    assert_openai_error(post(loc_server, pair_files(loc), {"model": "other"}), 404, "`other`")
    r = post(loc_server, pair_files(loc, before=None, after=None), {"lora": "nope"})
    assert_openai_error(r, 404, "no saved LoRA named 'nope'", "lora")
    # The server is still fine.
    assert post(loc_server, pair_files(loc)).status_code == 200


def test_without_a_loc_model_the_routes_say_how_to_start_one(loc_server, loc, monkeypatch):
    monkeypatch.setattr(loc_server.state, "image_editor", None)
    r = post(loc_server, pair_files(loc))
    assert_openai_error(r, 404, "start it with `lorafleet serve --change DIR`")
    assert r.json()["error"]["code"] == "no_image_editor"
    r = httpx.get(loc_server.url + "/v1/images/editor", timeout=WAIT)
    assert_openai_error(r, 404, "--change DIR")


def test_bundled_examples_are_the_cli_examples(loc_server):
    r = httpx.get(loc_server.url + "/v1/images/examples/tint", timeout=WAIT)
    assert r.status_code == 200, r.text
    body = r.json()
    label, ref = example_images("tint")
    assert body["label"] == label and set(body["images"]) == {"before", "after", "image", "truth"}
    for name, x in ref.items():
        want = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(pixels(base64.b64decode(body["images"][name])), want)
    r = httpx.get(loc_server.url + "/v1/images/examples/unseen:posterize", timeout=WAIT)
    assert r.status_code == 200 and "posterize" in r.json()["label"]
    r = httpx.get(loc_server.url + "/v1/images/examples/posterize", timeout=WAIT)
    assert_openai_error(r, 404, "no example 'posterize'")  # held out of training: unseen only


class SlowEditor:
    """An editor that blocks until released: the edit must run on a worker thread."""

    name = "slow"

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def info(self):
        return {"loras": [], "examples": []}

    def edit(self, image, before, after, lora):
        self.started.set()
        assert self.release.wait(WAIT)
        return image

    def example(self, example_id):
        raise AssertionError("not used")


def test_an_edit_in_progress_blocks_neither_http_nor_the_engine(loc_server, loc, monkeypatch):
    slow = SlowEditor()
    monkeypatch.setattr(loc_server.state, "image_editor", slow)
    result = {}

    def run():
        result["r"] = post(loc_server, pair_files(loc))

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert slow.started.wait(WAIT)
        assert httpx.get(loc_server.url + "/health", timeout=WAIT).status_code == 200
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0}
        r = httpx.post(loc_server.url + "/v1/completions", json=body, timeout=WAIT)
        assert r.status_code == 200 and not result  # generated while the edit still waits
    finally:
        slow.release.set()
        thread.join(30)
    assert result["r"].status_code == 200 and result["r"].content == loc["image"].read_bytes()


def test_cli_serve_refuses_bad_loc_options_in_one_line(run_cli, tmp_path):
    code, _, err = run_cli("serve", "--base", "tiny", "--change-loras", tmp_path)
    assert code == 2 and "--change-loras needs --change" in err and len(err.splitlines()) == 1
    code, _, err = run_cli("serve", "--base", "tiny", "--change", tmp_path)
    assert code == 2 and "not a `lorafleet change train` directory" in err


def test_fuzzed_image_requests_never_give_a_server_error(loc_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from test_api_fuzz import _check

    schema = schemathesis.openapi.from_url(loc_server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.path.startswith("/v1/images/")]
    assert len(operations) == 3
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case):
            _check(case)  # no 5xx; every JSON error in OpenAI's shape

        fuzz()


# --- the playground's "Edit by example" tab, in headless Debian chromium ---


@pytest.fixture(scope="module")
def edit_page(loc_server):
    from playwright.sync_api import sync_playwright
    from test_playground import ARGS, CHROMIUM, MISSING

    if not CHROMIUM.exists():  # test_playground's test_chromium_is_installed fails then
        pytest.fail(MISSING, pytrace=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.set_default_timeout(60_000)
        urls, errors = [], []
        page.on("request", lambda r: urls.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(loc_server.url)
        yield page
        browser.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
    outside = [u for u in urls if not u.startswith((loc_server.url, "blob:"))]
    assert outside == [], f"the page reached outside the server: {outside}"


def shown_result(page) -> bytes:
    """The PNG the tab shows as the result (read back from its blob: URL)."""
    page.wait_for_selector('#edit-result[data-state="done"]')
    b64 = page.evaluate("""async () => {
        const buf = await (await fetch(document.getElementById("edit-result").src)).arrayBuffer();
        return btoa(String.fromCharCode(...new Uint8Array(buf))); }""")
    return base64.b64decode(b64)


def test_playground_tab_edits_an_example_and_uploads(edit_page, loc_server, loc, tmp_path):
    from test_playground import screenshot

    page = edit_page
    page.click("#tab-edit")
    assert page.locator("#edit").is_visible() and page.locator("#chat").is_hidden()
    assert page.locator("#prompt").is_hidden()
    # A bundled example: the pair and the image appear, the result equals the API's answer.
    page.select_option("#edit-example", "tint")
    page.wait_for_selector('#edit[data-example="tint"]')
    assert page.locator("#edit-fig-truth").is_visible()
    page.click("#edit-run")
    got = shown_result(page)
    ex = httpx.get(loc_server.url + "/v1/images/examples/tint", timeout=WAIT).json()["images"]
    files = {
        k: (f"{k}.png", base64.b64decode(ex[k]), "image/png") for k in ("before", "after", "image")
    }
    assert np.array_equal(pixels(got), pixels(post(loc_server, files).content))
    assert page.locator("#edit-stats").text_content().startswith("64×64 px · ")
    screenshot(page, tmp_path, "playground-edit-by-example.png")
    # Uploaded images: the result is `change apply`'s (the same pixels as the Python API).
    for key in ("before", "after", "image"):
        page.set_input_files(f"#edit-{key}", str(loc[key]))
    assert page.locator("#edit-example").input_value() == ""
    page.click("#edit-run")
    apply_change(loc["model"], loc["image"], tmp_path / "ref.png", loc["before"], loc["after"])
    assert np.array_equal(pixels(shown_result(page)), pixels((tmp_path / "ref.png").read_bytes()))
    # A text file as the image: the server's one-line 400 is shown, no result.
    (tmp_path / "notes.png").write_text("not an image")
    page.set_input_files("#edit-image", str(tmp_path / "notes.png"))
    page.click("#edit-run")
    page.wait_for_selector('#edit-result[data-state="error"]', state="attached")
    assert "400: image: not a readable image" in page.locator("#error").text_content()
    # Back to the chat tab: the chat is there again.
    page.click("#tab-chat")
    assert page.locator("#prompt").is_visible() and page.locator("#edit").is_hidden()
