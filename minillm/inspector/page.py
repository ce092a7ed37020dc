"""The inspector's page as one HTML document: for the server, and as a static file that opens offline.

The page lives in minillm/serve/page/ as three plain files (index.html, app.js, style.css; no build
step, no library). page_html() puts the script and the style inline; given views (views.py) it also
embeds them, with the source of every function the page cites, as JSON in
<script type="application/json" id="minillm-data">: app.js finds that element and steps through the
recorded run instead of asking the server (the static export, `python -m minillm.inspector --html`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .sources import all_sources

PAGE_DIR = Path(__file__).resolve().parents[1] / "serve" / "page"
STYLE_TAG = '<link rel="stylesheet" href="page/style.css">'  # exactly as index.html writes them
SCRIPT_TAG = '<script src="page/app.js"></script>'


def _inline_json(data) -> str:
    """JSON that cannot end the <script> element holding it (no '</', no '<!--')."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def page_html(views: dict | None = None) -> str:
    """index.html with app.js and style.css inline; with `views`, the recorded run and the cited
    functions' sources embedded (the page then needs no server)."""
    html = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    css = (PAGE_DIR / "style.css").read_text(encoding="utf-8")
    js = (PAGE_DIR / "app.js").read_text(encoding="utf-8")
    if STYLE_TAG not in html or SCRIPT_TAG not in html or "</script" in js.lower():
        raise RuntimeError(f"{PAGE_DIR}: index.html must link style.css and app.js as page.py expects")
    data = ""
    if views is not None:
        payload = {"views": views, "sources": all_sources()}
        data = f'<script type="application/json" id="minillm-data">{_inline_json(payload)}</script>\n'
    html = html.replace(STYLE_TAG, f"<style>\n{css}</style>")
    return html.replace(SCRIPT_TAG, f"{data}<script>\n{js}</script>")


def write_html(views: dict, path: str | Path) -> Path:
    """The static page for one recorded run, written to `path` (its folder must exist)."""
    path = Path(path)
    path.write_text(page_html(views), encoding="utf-8")
    return path
