"""The documentation site in a real browser (slow suite): the built site
(``docs/_build/html``, built first if missing) served on localhost and opened in
headless Chromium (Debian's, driven by Playwright): the home page, an API page and a
gallery page load without console errors, their figures load, every internal link on
them resolves (page and anchor), and the search finds ``KFACPreconditioner``."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES = ("index.html", "api.html", "gallery/plot_kfac_mlp.html")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("playwright")
    if not (SITE / "index.html").exists():
        built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                                "-b", "html", "docs", str(SITE)], cwd=ROOT,
                               capture_output=True, text=True, timeout=900,
                               env={**os.environ, "MPLBACKEND": "Agg"})
        assert built.returncode == 0, built.stderr[-3000:]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def browser(site: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.parametrize("path", PAGES)
def test_pages_load_cleanly_with_their_figures_and_links(site, browser, path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    response = page.goto(site + path, wait_until="networkidle")
    assert response is not None and response.status == 200
    assert not errors, errors
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.src, e.naturalWidth])")
    broken = [src for src, width in images if width == 0]
    assert not broken, broken
    if path == "index.html":
        assert images, "the home page shows its figure"
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    internal = sorted({link for link in links if link.startswith(site)})
    assert internal
    targets: dict[str, set[str]] = {}
    for link in internal:
        target, anchor = urldefrag(link)
        targets.setdefault(target, set()).add(anchor)
    unresolved = []
    for target, anchors in sorted(targets.items()):
        answer = page.request.get(target)  # a request, not a navigation (downloads)
        if answer.status != 200:
            unresolved.append(f"{target}: status {answer.status}")
            continue
        if urlparse(target).path.endswith(".html") or target.endswith("/"):
            ids = set(re.findall(r'id="([^"]+)"', answer.text()))
            unresolved += [f"{target}#{a}" for a in sorted(anchors) if a and a not in ids]
    assert not unresolved, unresolved
    page.close()


def test_the_search_finds_the_preconditioner(site, browser):
    page = browser.new_page()
    page.goto(site + "search.html?q=KFACPreconditioner")
    page.wait_for_selector("#search-results li a", timeout=30_000)
    found = page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.textContent)")
    assert any(text.strip() == "thermokfac.KFACPreconditioner" for text in found), found
    page.close()
