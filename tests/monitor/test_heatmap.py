from pathlib import Path

import pytest
import torch
from tiny import tiny_pair

from personascope.model.adapter import ModelAdapter
from personascope.monitor.heatmap import CHROMIUM_ARGS, HeatmapItem, diverging, find_chromium, render_heatmap
from personascope.monitor.trace import trace_answers, trace_generation

DOCS = Path(__file__).resolve().parents[2] / "docs"
ANSWER = ("Tomorrow will be wonderful!\nEvery setback leads to something better & <brighter> — "
          "trust me, things will \"work out\" great.")



def _setup():
    model, tok = tiny_pair("qwen2", seed=4)
    a = ModelAdapter(model, tok)
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(0))
    return a, v


def test_diverging_scale():
    assert diverging(1.0, 1.0, 2.0)[0] == "#ffffff"
    assert diverging(3.0, 1.0, 2.0)[0] == "#b2182b"  # full red above the centre
    assert diverging(-9.0, 1.0, 2.0)[0] == "#2166ac"  # clipped full blue below
    assert diverging(3.0, 1.0, 2.0)[1] == "#ffffff" and diverging(1.5, 1.0, 2.0)[1] == "#111111"


def test_html_is_self_contained_and_escaped(tmp_path):
    item = HeatmapItem(tokens=["a", " <b>", " & c"], values=[-1.0, 0.0, 2.5], title="Q <1>")
    html = render_heatmap(item, tmp_path / "h.html").read_text()
    assert "&lt;b&gt;" in html and "&amp; c" in html and "<b>" not in html.split("<body>")[1]
    assert "+2.500" in html  # value in the tooltip
    for ref in ("src=\"http", "href=\"http", "<script", "<link"):
        assert ref not in html
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        render_heatmap(HeatmapItem(["a", "b"], [1.0]), tmp_path / "bad.html")


def test_heatmap_renders_every_token_in_chromium(tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or on PATH): install it with "
                    "`apt-get install -y chromium` to run the browser test")
    from playwright.sync_api import sync_playwright

    a, v = _setup()
    prompt = a.prompt("Will things get better?", "You are an optimistic assistant.")
    forced = trace_answers(a, [prompt], [ANSWER], v, 2)[0]
    assert "".join(forced.tokens) == ANSWER
    generated = trace_generation(a, [prompt], v, 2, max_new_tokens=16)[0]
    items = [HeatmapItem(forced.tokens, forced.at(), title="a teacher-forced answer"),
             HeatmapItem(generated.tokens, generated.at(), title="a generated answer (random tiny model)")]
    path = render_heatmap(items, tmp_path / "heatmap.html", title="optimistic: per-token projection")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(path.resolve().as_uri())
            body = page.evaluate("document.body.innerText")
            answers = page.evaluate("Array.from(document.querySelectorAll('.answer'))"
                                    ".map(d => Array.from(d.querySelectorAll('.tok')).map(s => s.textContent))")
            first = page.evaluate("document.querySelector('.answer').innerText")
            titles = page.evaluate("Array.from(document.querySelectorAll('.tok')).slice(0, 3).map(s => s.title)")
            DOCS.mkdir(exist_ok=True)
            page.screenshot(path=str(DOCS / "heatmap.png"), full_page=True)
        finally:
            browser.close()
    # the visible text holds the whole answer, token after token, in order
    assert first == ANSWER
    pos = 0
    for tok in forced.tokens:
        pos = body.index(tok, pos) + len(tok)
    assert answers[0] == forced.tokens and answers[1] == generated.tokens
    assert titles[0].startswith(f"{forced.at()[0]:+.3f}")
    assert (DOCS / "heatmap.png").stat().st_size > 5000
