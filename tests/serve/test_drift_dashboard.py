"""The conversations page in headless Chromium: the list with sparklines and alerts, then one trajectory."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from servers import MODEL, ThreadServer, tiny_vectors

from personascope.monitor import DriftRule, DriftVector, Normal
from personascope.serve import DriftService, DriftStore, Engine, ServeConfig, create_app, load_serving_model
from personascope.vectors.file import load_vector

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "conv-key"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium "
                                "(apt-get install -y chromium)")


def test_conversations_page(tmp_path):
    from playwright.sync_api import sync_playwright

    paths = tiny_vectors(tmp_path)
    vecs = {n: load_vector(p) for n, p in paths.items()}
    engine = Engine(load_serving_model(MODEL), vecs, ServeConfig(api_key=KEY), model_id=MODEL)
    unit = Normal(0.0, 1.0, 0.0, 1.0)  # z = the raw projection
    dvs = [DriftVector("opt", vecs["opt"], 2, unit), DriftVector("hum", vecs["hum"], 3, unit)]
    drift = DriftService(engine, DriftStore(tmp_path / "d.sqlite3"), dvs, DriftRule(z=-1e9, turns=2))
    auth = {"Authorization": f"Bearer {KEY}"}
    with ThreadServer(create_app(engine, drift)) as srv:
        for cid in ("alpha", "beta"):
            msgs = [{"role": "user", "content": f"hello {cid}"}]
            for t in range(3 if cid == "alpha" else 1):
                r = httpx.post(srv.url + "/v1/chat/completions", headers={**auth, "X-Conversation-Id": cid},
                               json={"model": MODEL, "messages": msgs, "max_tokens": 5, "temperature": 0})
                msgs += [r.json()["choices"][0]["message"], {"role": "user", "content": f"turn {t}"}]
        html = httpx.get(srv.url + "/conversations").text
        assert "http://" not in html and "https://" not in html
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/conversations")
            page.wait_for_selector("#keyrow:not([hidden])")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_selector('tr.conv[data-id="alpha"]')
            assert page.locator("tr.conv").count() == 2
            row = page.locator('tr.conv[data-id="alpha"]')
            assert row.locator("polyline").count() == 2 and row.locator(".badge").count() == 2  # opt, hum
            assert page.locator('tr.conv[data-id="beta"] .badge').count() == 0
            row.click()
            page.wait_for_selector("#trajectory svg")
            assert page.locator(".turn").count() == 3
            assert page.locator("#trajectory circle").count() == 6
            assert "alert" in page.inner_text("#detail") and "turn 1" in page.inner_text("#detail")
            assert not errors, errors
            browser.close()
