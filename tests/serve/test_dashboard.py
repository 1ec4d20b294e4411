"""The dashboard in headless Chromium: chat, steer with a slider, see the coloured answer and the meters move."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from servers import ThreadServer, tiny_vectors

from personascope.serve import Engine, ServeConfig, create_app, load_serving_model
from personascope.vectors.file import load_vector

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "dash-key"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium "
                                "(apt-get install -y chromium)")


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    paths = tiny_vectors(tmp_path_factory.mktemp("vec"))
    vecs = {name: load_vector(p) for name, p in paths.items()}
    engine = Engine(load_serving_model("tiny-random-qwen2"), vecs, ServeConfig(api_key=KEY),
                    model_id="tiny-random-qwen2")
    with ThreadServer(create_app(engine)) as srv:
        yield srv.url


def test_page_is_self_contained(dash):
    html = httpx.get(dash + "/").text
    assert "<script>" in html and "/v1/chat/completions" in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing fetched from elsewhere


def test_chat_steer_and_meter(dash, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash + "/")
        page.wait_for_selector("#keyrow:not([hidden])")  # the server wants a key: the page asks for it
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        page.wait_for_selector('.vec[data-vector="opt"]')
        assert page.locator(".vec").count() == 2

        def ask(text: str) -> dict:
            done = page.locator('.msg.assistant[data-done="1"]').count()
            page.fill("#input", text)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant[data-done=\"1\"]').length > {done}",
                                   timeout=30_000)
            last = page.locator(".msg.assistant").last
            assert last.locator(".error").count() == 0, last.inner_text()
            toks = last.locator(".tok")
            return {"tokens": toks.count(), "text": last.locator(".body").inner_text(),
                    "bg": toks.first.evaluate("e => e.style.background"),
                    "meter": float(page.get_attribute("#meter-opt", "data-value")),
                    "prompt": float(page.get_attribute("#meter-opt", "data-prompt")),
                    "label": page.inner_text("#meterval-opt")}

        plain = ask("Tell me about the sea.")
        assert plain["tokens"] > 0 and plain["bg"].startswith("rgba(")
        assert math.isfinite(plain["meter"]) and plain["label"] != "–"
        # steer with the opt slider (α 1) at layer 2, same prompt (history cleared): the answer changes, while the
        # meter's prompt tick stays, since the monitor reads layer 2 before steering is added there
        page.click("#clear")
        page.eval_on_selector("#coef-opt", "e => { e.value = 1; e.dispatchEvent(new Event('input')); }")
        assert page.is_checked("#steer-opt")
        steered = ask("Tell me about the sea.")
        assert steered["prompt"] == pytest.approx(plain["prompt"], abs=1e-3)
        assert steered["text"] != plain["text"]
        assert math.isfinite(steered["meter"]) and steered["tokens"] > 0
        info = page.locator(".msg.assistant .info").last.inner_text()
        assert "opt@2" in info
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert not errors, errors
        browser.close()


def test_guard_marks_tokens(dash):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash + "/")
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        page.wait_for_selector('.vec[data-vector="opt"]')
        assert page.locator("#guard-opt").count() == 1 and page.locator("#guard-hum").count() == 0  # calibrated only
        page.fill("#temp", "0")
        page.fill("#maxtok", "16")
        page.select_option("#guard-opt", "cap")
        page.fill("#coef-opt", "0.5")
        page.dispatch_event("#coef-opt", "input")
        page.evaluate("init()")  # the cards rebuilt (as when the key is entered again) keep the user's settings
        assert page.input_value("#guard-opt") == "cap" and page.input_value("#coef-opt") == "0.5"
        assert page.is_checked("#steer-opt")
        page.fill("#coef-opt", "0")
        page.dispatch_event("#coef-opt", "input")
        page.fill("#input", "Tell me about the sea.")
        page.click("#send")
        page.wait_for_selector('.msg.assistant[data-done="1"]', timeout=30_000)
        info = page.locator(".msg.assistant .info").last.inner_text()
        marked = page.locator(".msg.assistant .tok.guarded").count()
        # the same request through the API: the dashboard marks the tokens the server reports
        r = httpx.post(dash + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "tiny-random-qwen2", "temperature": 0, "max_tokens": 16,
                             "messages": [{"role": "user", "content": "Tell me about the sea."}],
                             "guard": {"vector": "opt", "mode": "cap"}}).json()
        fired = r["choices"][0]["guard"]["fired"]
        assert f"guard cap on opt: {sum(fired)} tokens touched" in info
        assert 0 < marked <= sum(fired)
        assert not errors, errors
        browser.close()
