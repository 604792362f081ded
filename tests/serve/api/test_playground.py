"""The playground page in headless Debian chromium: adapter chat streams, tokens/s, side by side."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Offline machines: no sandbox (root in CI), no GPU, no background calls home.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TPS = re.compile(r"^(\d+) tokens · (\d+(?:\.\d+)?) tok/s · \d+\.\d+ s$")
DONE = '.answer[data-model="{}"][data-state="done"]'
MISSING = (
    f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) "
    "to run the playground tests"
)


def test_chromium_is_installed():
    # CI installs it (.ci/run); a missing browser is a broken setup: a failure, never a skip.
    assert CHROMIUM.exists(), MISSING


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():  # the tests below then error; test_chromium_is_installed fails
        pytest.fail(MISSING, pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the playground, its model list loaded; checks it made no outside calls."""
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    page.set_default_timeout(20_000)
    urls, errors = [], []
    page.on("request", lambda r: urls.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("#model option[value=alpha]", state="attached")
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
    outside = [u for u in urls if not u.startswith(server.url)]
    assert outside == [], f"the page reached outside the server: {outside}"


def api_chat(server, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if os.environ.get("LORAFLEET_SCREENSHOT_DIR"):  # the demo keeps a copy
        out = Path(os.environ["LORAFLEET_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def ask(page, prompt: str, *, temperature: str = "0", max_tokens: str = "12") -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#prompt", prompt)
    page.click("#send")


def check_answer(page, server, model: str, history: list[dict], nth: int = 0) -> str:
    """The nth answer of `model` finishes and equals the API's greedy answer; tokens/s shown."""
    answer = page.locator(DONE.format(model)).nth(nth)
    answer.wait_for()
    text = answer.text_content()
    ref = api_chat(server, model, history, 12)
    assert text and text == ref["choices"][0]["message"]["content"]
    assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces, streamed
    stats = page.locator(f"{DONE.format(model)} + .stats").nth(nth).text_content()
    match = TPS.match(stats)
    assert match, f"no tokens/s figure: {stats!r}"
    assert int(match.group(1)) == ref["usage"]["completion_tokens"] and float(match.group(2)) > 0
    return text


def test_adapter_chat_streams_the_api_answer_and_keeps_history(page, server, tmp_path):
    page.select_option("#model", "alpha")
    ask(page, "Tell me about cats.")
    history = [{"role": "user", "content": "Tell me about cats."}]
    first = check_answer(page, server, "alpha", history)
    page.wait_for_selector("#send:not([disabled])")
    # The second turn sends the whole conversation: same answer as the API given that history.
    ask(page, "And dogs?")
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And dogs?"}]
    check_answer(page, server, "alpha", history, nth=1)
    assert page.locator(".answer").count() == 2 and page.locator(".msg.user").count() == 2
    screenshot(page, tmp_path, "playground-alpha-chat.png")


def test_side_by_side_streams_two_models_at_once(page, server, tmp_path):
    page.select_option("#model", "alpha")
    assert page.locator("#model-b").is_hidden()
    page.check("#compare")
    assert page.locator("#model-b").is_visible()
    assert page.locator("#model-b").input_value() == "tiny"  # the base by default
    prompt = [{"role": "user", "content": "Name a color."}]
    ask(page, prompt[0]["content"])
    base = check_answer(page, server, "tiny", prompt)
    adapter = check_answer(page, server, "alpha", prompt)
    assert base != adapter
    columns = page.locator(".column")
    assert columns.count() == 2
    assert columns.nth(0).locator(".answer").get_attribute("data-model") == "tiny"
    screenshot(page, tmp_path, "playground-side-by-side-base-alpha.png")
    # Two adapters side by side (the demo's screenshot): a fresh conversation, beta vs alpha.
    page.click("#clear")
    page.select_option("#model-b", "beta")
    ask(page, prompt[0]["content"])
    beta = check_answer(page, server, "beta", prompt)
    alpha = check_answer(page, server, "alpha", prompt)
    assert beta != alpha and alpha == adapter
    assert page.locator(".answer").count() == 2  # cleared: only the new pair
    screenshot(page, tmp_path, "playground-side-by-side-beta-alpha.png")


def test_errors_stop_and_api_key(page, server, tmp_path):
    assert page.locator("#stop").is_disabled() and page.locator("#error").is_hidden()
    # Prompt + max_tokens beyond the tiny server's 128-token context: the server's 400 is shown.
    ask(page, "Hello", max_tokens="500")
    page.wait_for_selector('.answer[data-state="error"]', state="attached")
    error = page.locator("#error")
    error.wait_for()
    assert "400" in error.text_content() and "maximum context length" in error.text_content()
    assert "maximum context length" in page.locator(".turn-error").text_content()
    screenshot(page, tmp_path, "playground-error.png")
    # Stop: hold the request in flight (never answered), then abort it from the page.
    page.route("**/v1/chat/completions", lambda route: None)
    ask(page, "Hello")
    page.wait_for_selector("#stop:not([disabled])")
    page.click("#stop")
    page.wait_for_selector('.answer[data-state="stopped"]')
    page.wait_for_selector("#send:not([disabled])")
    assert "stopped" in page.locator('.answer[data-state="stopped"] + .stats').text_content()
    page.unroute("**/v1/chat/completions")
    # The API key is remembered in localStorage and sent as a Bearer token.
    with page.expect_request("**/v1/models") as req:
        page.fill("#api-key", "k-123")
        page.locator("#api-key").dispatch_event("change")
    assert req.value.headers.get("authorization") == "Bearer k-123"
    assert page.evaluate("localStorage.getItem('lorafleet.apiKey')") == "k-123"


def test_mix_slider_compares_the_mix_with_each_adapter(page, server, tmp_path):
    page.check("#mix")
    assert page.locator("#mix-weight").is_visible()
    page.select_option("#mix-a", "alpha")
    page.select_option("#mix-b", "beta")
    page.fill("#mix-weight", "0.7")  # a range input: sets the slider and fires input
    assert page.locator("#mix-label").text_content().strip() == "0.70 A + 0.30 B"
    mix = "mix:alpha*0.7+beta*0.3"
    prompt = [{"role": "user", "content": "Name a color."}]
    ask(page, prompt[0]["content"])
    alpha = check_answer(page, server, "alpha", prompt)
    mixed = check_answer(page, server, mix, prompt)
    beta = check_answer(page, server, "beta", prompt)
    columns = page.locator(".column")
    assert columns.count() == 3
    assert [columns.nth(i).locator(".answer").get_attribute("data-model") for i in range(3)] == [
        "alpha",
        mix,
        "beta",
    ]
    assert alpha != beta and mixed  # the mix column equals the API's mix answer (checked above)
    screenshot(page, tmp_path, "playground-mix-alpha-beta.png")
    # The slider moves the mix; the conversation goes on with the new weights.
    page.wait_for_selector("#send:not([disabled])")
    page.fill("#mix-weight", "0.2")
    assert page.locator(".column").nth(1).locator("h2").text_content() == "mix:alpha*0.2+beta*0.8"
