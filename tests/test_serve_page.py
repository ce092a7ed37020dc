"""The inspector page in a real browser (Chromium headless, driven by Playwright), on a tiny char model
and on SmolLM2-135M, served in-process on a loopback port (tests/live_server.py), and as the static
file `python -m minillm.inspector --html` writes, opened from file:// with the network cut.

What the page shows is held against the library, computed here in the test's own process: the
prefill table against the inspector's JSON (report_dict), each speculative call's verdicts and
tokens and each contrastive step's |V_head| against traces.trace_decoding. The heatmaps must draw
(the canvas pixels are read back), a bad request's message must appear on the page, and the page
must raise no JavaScript error. Screenshots go to tmp_path and a few to /tmp/page-shots/.

Chromium comes from Debian (`apt-get install chromium`), never downloaded at test time. Without it
these tests skip saying so; MINILLM_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import Loaded, empty_model, load_model, save_model
from minillm.inspector import inspect_prompt, report_dict
from minillm.inspector.traces import trace_decoding
from minillm.methods import Method
from minillm.sampling import SamplingParams
from minillm.tokenizer import CharTokenizer

from needs import missing
from tiny import tiny_model

CHARS = " \nabcdefghijklmnopqrstuvwxyzABCDE:.,!?'"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path("/tmp/page-shots")
PROMPTS = {"char": "to be, or not to be:\nthat is", "smollm2": "The capital of France is Paris, and of Italy"}


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


def no_browser(why: str):
    msg = f"{why}: install Debian's Chromium with `apt-get install chromium` (and `pip install playwright`); " \
          "no browser is downloaded at test time"
    missing(msg, "MINILLM_REQUIRE_BROWSER", "browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("playwright is not installed")
    path = chromium_path()
    if path is None:
        no_browser("chromium is not on PATH")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page; any uncaught JavaScript error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(pg, tmp_path: Path, name: str, keep: bool = False, locator=None) -> None:
    """A screenshot under tmp_path; keep=True also copies it to /tmp/page-shots/ for people to look at."""
    path = tmp_path / f"{name}.png"
    (locator or pg).screenshot(path=str(path))
    if keep:
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / path.name)


# ---------------------------------------------------------------- the models and the servers

def sharpened(family: str, seed: int, scale: float = 6.0):
    """A random tiny model whose output head is scaled up: peaked distributions, so a draft's
    guesses are sometimes accepted and sometimes not."""
    model = tiny_model(family, seed, vocab_size=len(CHARS), block_size=128, n_kv_head=2 if family == "llama" else None)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def shallow(loaded: Loaded, n_layer: int) -> Loaded:
    """The model's first n_layer blocks with its embedding and head (shared tensors, no copy): a cheap
    draft / amateur with the same tokenizer."""
    cfg = dataclasses.replace(loaded.config, n_layer=n_layer)
    model = empty_model(cfg)
    keep = {k: v for k, v in loaded.model.state_dict().items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < n_layer}
    model.load_state_dict(keep, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if hasattr(loaded.model, "rope_cos"):
        model.rope_cos, model.rope_sin = loaded.model.rope_cos, loaded.model.rope_sin
    return Loaded(model.eval(), loaded.tokenizer, cfg, {})


@pytest.fixture(scope="module")
def char_models():
    tok = CharTokenizer(CHARS)
    target, draft = sharpened("llama", 0), sharpened("gpt2", 1)
    return {"model": Loaded(target, tok, target.config, {}), "partner": Loaded(draft, tok, draft.config, {})}


@pytest.fixture(scope="module")
def models(request, char_models):
    """{"model", "partner"} for the parametrised name: the partner serves as draft and as amateur."""
    if request.param == "char":
        return char_models
    loaded = load_model(request.getfixturevalue("smollm2_converted"))
    return {"model": loaded, "partner": shallow(loaded, 8)}


@pytest.fixture(scope="module")
def url(models):
    from live_server import live_server
    from minillm.serve.state import Limits, Served
    served = Served(models["model"], draft=models["partner"], amateur=models["partner"], limits=Limits(),
                    model_path="page-test.safetensors")
    with live_server(served) as address:
        yield address


BOTH = pytest.mark.parametrize("models", ["char", "smollm2"], indirect=True, scope="module")


# ---------------------------------------------------------------- driving the page

def open_page(pg, url: str) -> None:
    pg.goto(url + "/")
    pg.wait_for_selector("body[data-state=idle]", timeout=20_000)


def run(pg, prompt: str, method: str, expect: str = "ready", **fields) -> None:
    """Fill the form and press Run; wait until the views are drawn (or the error shows)."""
    runs = pg.evaluate("document.body.dataset.runs || '0'")
    pg.fill("#prompt", prompt)
    pg.select_option("#method", method)
    for name, value in fields.items():
        pg.fill(f"#{name.replace('_', '-')}", str(value))
    pg.click("#run")
    if expect == "ready":
        pg.wait_for_function(f"document.body.dataset.runs === '{int(runs) + 1}'", timeout=60_000)
    else:
        pg.wait_for_selector("#error:not([hidden])", timeout=30_000)


def table_rows(pg, selector: str) -> list[dict]:
    return pg.eval_on_selector_all(f"{selector} tbody tr", "rows => rows.map(r => ({...r.dataset}))")


def canvas_colours(pg, canvas: str) -> tuple[int, int]:
    """(pixels that are not white, distinct colours) of a canvas, read back from its pixel data."""
    return tuple(pg.evaluate("""id => {
        const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let inked = 0; const colours = new Set();
        for (let i = 0; i < d.length; i += 4) {
            if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) inked++;
            colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        }
        return [inked, colours.size];
    }""", canvas))


def library_trace(models, prompt: str, method: Method, n: int, seed: int):
    m = models["model"]
    ids = m.tokenizer.encode(prompt)
    partner = models["partner"].model if method.partner else None
    return trace_decoding(method, m.model, m.tokenizer, ids, n, partner, seed, top=5)


# ---------------------------------------------------------------- the tests

@BOTH
def test_prefill_and_sampling_step_equal_the_library(page, url, models, tmp_path, request):
    prompt = PROMPTS[request.node.callspec.params["models"]]
    open_page(page, url)
    run(page, prompt, "sample", temperature=0.8, top_k=5, seed=7, max_tokens=3)
    m = models["model"]
    want = report_dict(inspect_prompt(m.model, m.tokenizer, prompt, top=5))
    rows = table_rows(page, "#prefill-table")
    assert [r["token"] for r in rows] == want["tokens"]
    for r, w in zip(rows, want["prefill"]):
        if w["next"] is None:
            assert r["p"] == ""
        else:
            assert r["next"] == w["next"]["token"] and float(r["p"]) == w["next"]["p"]
    assert f"perplexity {want['perplexity']:.3f}" in page.inner_text("#perplexity")
    page.hover("#prefill-tokens .tok[data-pos='2']")
    assert want["prefill"][2]["top"][0]["token"] in page.inner_text("#tooltip")
    steps, _ = library_trace(models, prompt, Method("sample", SamplingParams(0.8, top_k=5)), 3, 7)
    assert page.get_attribute("#step-token", "data-token") == steps[0]["token"]
    processed = table_rows(page, "#processed-table")
    assert len(processed) == 5 and steps[0]["token"] in [r["token"] for r in processed]
    name = request.node.callspec.params["models"]
    shot(page, tmp_path, f"prefill-{name}", keep=True, locator=page.locator("#prefill-panel"))
    shot(page, tmp_path, f"lens-{name}", keep=name == "smollm2", locator=page.locator("#lens-panel"))
    shot(page, tmp_path, f"sampling-step-{name}", keep=True, locator=page.locator("#trace-panel"))


@BOTH
def test_prompt_lookup_runs_from_the_page_as_the_library_runs_it(page, url, models, request):
    """"speculative (prompt lookup)": the same loop with no draft model; each target call's drafts and
    verdicts are the library's."""
    prompt, n = PROMPTS[request.node.callspec.params["models"]] * 2, 10  # repeated: lookup finds matches
    open_page(page, url)
    run(page, prompt, "lookup", temperature=0, k=3, max_tokens=n)
    steps, stats = library_trace(models, prompt, Method("speculative", SamplingParams(0.0), k=3, draft_lookup=True), n,
                                 1337)
    assert page.get_attribute("#trace-panel", "data-steps") == str(len(steps)) and stats.drafts_proposed > 0
    for i, want in enumerate(steps):
        drafts = table_rows(page, "#spec-drafts")
        assert [(d["token"], d["verdict"]) for d in drafts] == [(d["token"], d["verdict"]) for d in want["drafts"]]
        if i < len(steps) - 1:
            page.click("#step-next")


@BOTH
def test_speculative_steps_show_the_traces_verdicts(page, url, models, tmp_path, request):
    name = request.node.callspec.params["models"]
    prompt, n = PROMPTS[name], 12
    open_page(page, url)
    run(page, prompt, "speculative", temperature=1.0, k=3, seed=2, max_tokens=n)
    steps, stats = library_trace(models, prompt, Method("speculative", SamplingParams(1.0), k=3), n, 2)
    assert page.get_attribute("#trace-panel", "data-steps") == str(len(steps))
    rejection_shown = False
    for i, want in enumerate(steps):
        assert page.get_attribute("#trace-panel", "data-step") == str(i)
        drafts = table_rows(page, "#spec-drafts")
        assert [(d["token"], d["verdict"]) for d in drafts] == [(d["token"], d["verdict"]) for d in want["drafts"]]
        last = page.locator("#spec-last")
        assert (last.get_attribute("data-kind"), last.get_attribute("data-token")) == (want["last"]["kind"],
                                                                                      want["last"]["token"])
        if want["last"]["kind"] == "residual" and not rejection_shown:
            shot(page, tmp_path, f"speculative-rejection-{name}", keep=True, locator=page.locator("#trace-panel"))
            rejection_shown = True
        if i < len(steps) - 1:
            page.click("#step-next")
    assert page.is_disabled("#step-next")
    assert page.get_attribute("#spec-stats", "data-accepted") == str(stats.drafts_accepted)
    assert page.get_attribute("#spec-stats", "data-proposed") == str(stats.drafts_proposed)
    emitted = page.eval_on_selector_all("#trace-tokens .tok.new", "s => s.map(e => e.textContent)")
    assert emitted == [e["token"] for s in steps for e in s["emitted"]] + (["⟨eos⟩"] if steps[-1]["eos"] else [])
    assert rejection_shown or name == "smollm2", "the char models were chosen to show a rejection"


@BOTH
def test_contrastive_head_sizes_equal_the_trace(page, url, models, tmp_path, request):
    name = request.node.callspec.params["models"]
    prompt, n = PROMPTS[name], 6
    open_page(page, url)
    run(page, prompt, "contrastive", alpha=0.05, beta=1.0, max_tokens=n)
    method = Method("contrastive", SamplingParams(0.0), alpha=0.05, beta=1.0)
    steps, stats = library_trace(models, prompt, method, n, 1337)
    sizes, changed = [], []
    for i in range(len(steps)):
        summary = page.locator("#cd-summary")
        sizes.append(int(summary.get_attribute("data-head-size")))
        changed.append(summary.get_attribute("data-changed") == "true")
        assert summary.get_attribute("data-token") == steps[i]["token"]
        if i < len(steps) - 1:  # the arrow keys step too
            page.keyboard.press("ArrowRight") if i % 2 else page.click("#step-next")
    assert sizes == stats.head_sizes == [s["head_size"] for s in steps]
    assert changed == [s["changed"] for s in steps]
    page.click("#step-first")
    shot(page, tmp_path, f"contrastive-{name}", keep=name == "smollm2", locator=page.locator("#trace-panel"))


@pytest.mark.parametrize("models", ["char"], indirect=True, scope="module")
def test_heatmaps_draw_and_sources_open(page, url, tmp_path):
    open_page(page, url)
    run(page, PROMPTS["char"], "greedy", max_tokens=2)
    for canvas in ("lens-canvas", "attn-canvas"):
        inked, colours = canvas_colours(page, canvas)
        assert inked > 2000 and colours > 10, (canvas, inked, colours)
    before = page.evaluate("document.getElementById('attn-canvas').toDataURL()")
    page.select_option("#attn-layer", "1")
    page.select_option("#attn-head", "2")
    assert page.evaluate("document.getElementById('attn-canvas').toDataURL()") != before
    assert page.get_attribute("#heads-table tr.selected", "data-layer") == "1"
    page.click("#heads-table th[data-sort=prev_token]")  # first click on a score: highest first
    scores = [float(r) for r in page.eval_on_selector_all("#heads-table tbody tr td:nth-child(4)",
                                                          "cells => cells.map(c => c.textContent)")]
    assert scores == sorted(scores, reverse=True) and len(scores) == 2 * 4
    shot(page, tmp_path, "lens", keep=True, locator=page.locator("#lens-panel"))
    shot(page, tmp_path, "attention", keep=True, locator=page.locator("#attention-panel"))
    page.click("#prefill-panel .source-link[data-source='minillm.inspector.analysis.prefill_view']")
    page.wait_for_selector("#source-dialog[open]")
    assert "def prefill_view(" in page.inner_text("#source-code")
    assert page.inner_text("#source-file").startswith("minillm/inspector/analysis.py:")
    page.click("#source-close")


@pytest.mark.parametrize("models", ["char"], indirect=True, scope="module")
def test_bad_input_shows_its_message_and_the_server_goes_on(page, url, tmp_path):
    open_page(page, url)
    run(page, "to be", "sample", expect="error", temperature=-1)
    assert "temperature must be a finite number >= 0" in page.inner_text("#error")
    shot(page, tmp_path, "error", keep=True)
    run(page, "x" * 200, "greedy", expect="error")
    assert "context" in page.inner_text("#error") and "prompt" in page.inner_text("#error")
    run(page, "", "greedy", expect="error")
    assert "prompt is empty" in page.inner_text("#error")
    run(page, "to be", "greedy", max_tokens=2)  # and the next good request is served
    assert page.is_hidden("#error") and page.get_attribute("#trace-panel", "data-steps") == "2"


def test_static_html_opens_offline_and_steps(page, tmp_path, char_models):
    from minillm.inspector.cli import main
    target, draft, html, js = (tmp_path / n for n in ("t.safetensors", "d.safetensors", "page.html", "r.json"))
    save_model(target, char_models["model"].model, char_models["model"].tokenizer)
    save_model(draft, char_models["partner"].model, char_models["partner"].tokenizer)
    main(["--model", str(target), "--prompt", "to be, or not", "--generate", "10", "--method", "speculative",
          "--draft", str(draft), "--k", "3", "--temperature", "1", "--seed", "5", "--html", str(html), "--json", str(js)])
    want = json.loads(js.read_text())
    page.context.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-state=ready]")
    assert page.is_hidden("#run-form") and "static page" in page.inner_text("#mode")
    assert [r["token"] for r in table_rows(page, "#prefill-table")] == want["tokens"]
    for i, step in enumerate(want["trace"]):
        assert [d["verdict"] for d in table_rows(page, "#spec-drafts")] == [d["verdict"] for d in step["drafts"]]
        page.click("#step-next") if i < len(want["trace"]) - 1 else None
    assert page.is_disabled("#step-next")
    page.click("#step-play")  # from the end, play starts again at the first call
    page.wait_for_function("document.getElementById('trace-panel').dataset.step === '1'", timeout=5_000)
    page.click("#step-play")
    assert canvas_colours(page, "attn-canvas")[0] > 1000
    page.click("#trace-panel .source-link[data-source='minillm.speculative.SpeculativeDecoder.step']")
    assert "u * q_d < p_d" in page.inner_text("#source-code")
    shot(page, tmp_path, "static", keep=True)


def test_api_refuses_bad_requests_by_field(char_models):
    """No browser needed: the /api routes answer bad input with a 4xx naming the field, and go on."""
    import urllib.error
    import urllib.request
    from live_server import live_server
    from minillm.serve.state import Served

    def call(address, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(address + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with live_server(Served(char_models["model"])) as address:  # no draft, no amateur
        status, m = call(address, "/api/methods")
        assert status == 200 and m["methods"] == {"sample": True, "greedy": True, "speculative": False,
                                                  "contrastive": False, "lookup": True}
        for body, param in [({"prompt": "to be", "method": "speculative"}, "method"),
                            ({"prompt": "to be", "colour": 1}, "colour"),
                            ({"prompt": "to be", "top_k": 0}, "top_k"),
                            ({"prompt": "to be", "max_tokens": 10_000}, "max_tokens"),
                            ({"prompt": "to be", "max_tokens": 125}, "max_tokens"),  # 5 + 125 - 1 > the context of 128
                            ({"prompt": 5}, "prompt")]:
            status, reply = call(address, "/api/inspect", body)
            assert status == 400 and reply["error"]["param"] == param, (body, reply)
        status, reply = call(address, "/api/source?name=os.system")
        assert status == 404 and "not a function the page cites" in reply["error"]["message"]
        status, views = call(address, "/api/inspect", {"prompt": "to be", "max_tokens": 3})
        assert status == 200 and views["format"] == "minillm-views-1" and len(views["trace"]["steps"]) == 3
        lookup = {"prompt": "to be, or not to be, or not", "method": "speculative", "draft_lookup": True, "k": 3,
                  "temperature": 0, "max_tokens": 6}  # prompt lookup: speculative with no draft model
        status, views = call(address, "/api/inspect", lookup)
        assert status == 200 and views["trace"]["steps"][0]["k"] == 3, views["trace"]["steps"][:1]
        status, reply = call(address, "/api/inspect", {**lookup, "method": "greedy"})
        assert status == 400 and reply["error"]["param"] == "draft_lookup"
        status, src = call(address, "/api/source?name=minillm.sampling.choose")
        assert status == 200 and src["source"].startswith("def choose(")
