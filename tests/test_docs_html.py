"""The rendered lessons as web pages: converted to HTML offline and opened in headless Chromium, every page shows
its pictures, and the playground's page shows a picture of its panel (a static page cannot run the widget).

Quarto (what `nbdev_docs` uses) cannot be installed offline, so the pages are made by `jupyter nbconvert --to html`
from the committed notebooks, with their outputs: the same outputs the docs site publishes. Needs Debian's chromium
and the playwright package (see tests/test_playground_e2e.py): skipped without them, except under CI.
"""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render  # noqa: E402
from test_playground_e2e import CHROMIUM, CHROMIUM_ARGS, _requirements  # noqa: E402

PAGES = render.lessons() + [p for p in render.notebooks() if p.stem == '10_tool_playground']
IMAGES = """() => Array.from(document.images).filter(i => !/^https?:/.test(i.getAttribute('src') || ''))
  .map(i => ({src: (i.getAttribute('src') || '').slice(0, 60), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))"""


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Every page as HTML in one folder, next to a copy of nbs/images/ (what markdown cells link to)."
    _requirements()
    out = tmp_path_factory.mktemp('site')
    if render.IMAGES.exists(): shutil.copytree(render.IMAGES, out / 'images')
    cmd = [sys.executable, '-m', 'nbconvert', '--to', 'html', '--output-dir', str(out)] + [str(p) for p in PAGES]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope='module')
def browser():
    _requirements()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


def shown(browser, page_path: Path) -> list[dict]:
    page = browser.new_page()
    try:
        page.route('http*://**', lambda route: route.abort())   # offline: no CDN, no badge from the web
        page.goto(page_path.as_uri(), wait_until='load', timeout=60_000)
        return page.evaluate(IMAGES)
    finally: page.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize('nb', PAGES, ids=lambda p: p.stem)
def test_page_shows_its_pictures(site, browser, nb):
    imgs = shown(browser, site / f"{nb.stem}.html")
    broken = [i['src'] for i in imgs if not i['ok']]
    assert not broken, f"{nb.name}: pictures that do not load on its page: {broken}"
    expected = render.images_in(json.loads(nb.read_text()))
    assert len(imgs) >= max(expected, 1), f"{nb.name}: {len(imgs)} pictures on its page, {expected} in its outputs: run `make render`"
    if nb.stem == '10_tool_playground':
        assert any('images/playground' in i['src'] for i in imgs), "the playground page must show a picture of the panel"
