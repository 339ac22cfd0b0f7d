"""End to end: the playground in a real JupyterLab, in headless Chromium driven by Playwright.

Starts JupyterLab on 127.0.0.1 (a free port, a random token, a temporary root folder holding a small notebook that
opens the playground), opens the notebook in Debian's `chromium` (Playwright drives that executable: no browser is
downloaded), runs it, clicks Generate, waits for the image, and saves a screenshot to tests/out/playground.png.

Needs /usr/bin/chromium (`apt-get install -y chromium` on Debian) and the `playwright` Python package. Without
them the test is skipped, except when the CI environment variable is set: there it fails, since CI must run it.
"""
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / 'tests' / 'out'
CHROMIUM = Path(os.environ.get('SD_INTRO_CHROMIUM', '/usr/bin/chromium'))
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
CELLS = ["from sd_intro.widgets import playground\n"
         "pg = playground(steps=20)\n"
         "pg"]


def _require(ok: bool, why: str):
    "Skip with `why` unless CI is set, where a missing requirement is a failure."
    if ok: return
    if os.environ.get('CI'): pytest.fail(f"{why}; CI is set, so this is a failure: .ci/run must install it")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _notebook(cells) -> dict:
    return {'nbformat': 4, 'nbformat_minor': 5,
            'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
            'cells': [{'cell_type': 'code', 'id': f'c{i}', 'metadata': {}, 'execution_count': None, 'outputs': [],
                       'source': src} for i, src in enumerate(cells)]}


def _tail(path: Path, n=3000) -> str:
    return path.read_text(errors='replace')[-n:] if path.exists() else ''


def _requirements():
    "Skip (or, under CI, fail) when the browser or Playwright is missing."
    _require(CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try: import playwright.sync_api  # noqa: F401
    except ImportError: _require(False, "the playwright Python package is missing: pip install playwright")


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 with the playground notebook in its root: yields (url, log path)."
    _requirements()
    root, cfg = tmp_path / 'root', tmp_path / 'config'
    root.mkdir()
    (root / 'playground.ipynb').write_text(json.dumps(_notebook(CELLS)))
    quiet = cfg / 'lab' / 'user-settings' / '@jupyterlab' / 'apputils-extension'
    quiet.mkdir(parents=True)  # no news or update toasts over the panel (and no requests for them)
    (quiet / 'notification.jupyterlab-settings').write_text(
        json.dumps({'fetchNews': 'false', 'checkForUpdates': False, 'doNotDisturbMode': True}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(cfg), 'JUPYTER_RUNTIME_DIR': str(tmp_path / 'runtime'),
           'JUPYTER_DATA_DIR': str(tmp_path / 'data'), 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    env.pop('SD_INTRO_MODEL', None)  # the embedded model
    log = tmp_path / 'lab.log'
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
           '--LabApp.expose_app_in_browser=True', f'--LabApp.workspaces_dir={tmp_path / "workspaces"}']
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f'http://127.0.0.1:{port}'
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None: pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=5) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.monotonic() > deadline: pytest.fail(f"JupyterLab did not answer on {url} in 90 s:\n{_tail(log)}")
            time.sleep(0.5)
        yield f'{url}/lab/tree/playground.ipynb?token={token}', log
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernel it started
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)


KERNEL_IDLE = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }"""


@pytest.mark.timeout(300)
def test_playground_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright, TimeoutError as PWTimeout
    url, log = lab
    OUT.mkdir(exist_ok=True)
    errors, times, t = [], {}, time.monotonic()
    def lap(name):
        nonlocal t
        times[name], t = round(time.monotonic() - t, 1), time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1500, 'height': 1100})
            page.on('pageerror', lambda e: errors.append(str(e)))
            def fail(what):
                text = page.locator('.jp-Notebook').inner_text() if page.locator('.jp-Notebook').count() else ''
                page.screenshot(path=str(OUT / 'playground-failed.png'))
                pytest.fail(f"{what}\n--- notebook text ---\n{text[-3000:]}\n--- page errors ---\n{errors[-5:]}\n"
                            f"--- JupyterLab log ---\n{_tail(log)}")
            try:
                page.goto(url, timeout=60_000)
                page.wait_for_selector('.jp-Notebook', timeout=60_000)
                page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            except PWTimeout: fail("The notebook or its kernel did not come up")
            lap('page and kernel')
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            generate = page.locator('.sd-generate')
            try: generate.wait_for(timeout=120_000)
            except PWTimeout: fail("The playground panel did not appear after running the notebook")
            lap('notebook run')
            generate.click()
            try:
                page.wait_for_selector('.sd-history img', timeout=120_000)
                page.wait_for_function("() => document.querySelector('.sd-message').innerText.includes('Done in')",
                                       timeout=30_000)
            except PWTimeout: fail("No image appeared after clicking Generate")
            lap('generate to image')
            panel = page.locator('.sd-playground')
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(OUT / 'playground.png'))
            size = 'e => [e.naturalWidth, e.naturalHeight]'
            thumb, view = page.eval_on_selector('.sd-history img', size), page.eval_on_selector('img.sd-view', size)
            assert thumb == [128, 128] and view == [384, 384], (thumb, view)  # the 64-pixel result, enlarged
            progress = page.locator('.sd-progress').inner_text()
            assert '20/20' in progress, progress
            message = page.locator('.sd-message').inner_text()
            assert message.startswith('Done in') and 'Traceback' not in message, message
            print(f"seconds: {times}; message: {message!r}")
        finally:
            browser.close()
    assert not errors, errors
