"""The committed notebooks carry fresh outputs, the README shows them, and every lesson opens in Colab.

`make render` executes every notebook and writes `nbs/_rendered.json`: a hash of each notebook's code cells, its
number of pictures and its size. A notebook whose code changed since (or that lost its outputs) fails here until
`make render` is run again. These checks read files only: they take a second.
"""
import json, os, re, sys, types
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render, colab  # noqa: E402
from test_run_all import spam_in  # noqa: E402

MANIFEST = json.loads(render.MANIFEST.read_text()) if render.MANIFEST.exists() else {}
NOTEBOOKS = render.notebooks()
RENDER = "run `make render` and commit the notebooks, nbs/_rendered.json and nbs/images/"


def load(p): return json.loads(p.read_text())


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_committed_and_fresh(nb):
    assert nb.name in MANIFEST, f"{nb.name} was never rendered: {RENDER}"
    d, entry = load(nb), MANIFEST[nb.name]
    assert render.code_hash(d) == entry['code'], f"{nb.name}: a code cell changed since its outputs were made: {RENDER}"
    assert render.images_in(d) == entry['images'], f"{nb.name}: {render.images_in(d)} pictures, {entry['images']} when rendered: {RENDER}"
    if nb in render.lessons(): assert entry['images'] > 0, f"{nb.name} shows no picture"
    errors = [i for i, c in enumerate(d['cells']) for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors, f"{nb.name}: error outputs in cells {errors}"
    assert not spam_in(d), f"{nb.name}: warning or progress spam:\n" + '\n'.join(spam_in(d))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_stay_small(nb):
    assert nb.stat().st_size < render.MAX_BYTES, f"{nb.name} is {nb.stat().st_size / 1e6:.1f} MB: show fewer or smaller pictures"


def test_readme_opens_with_a_picture_and_shows_each_lesson():
    readme = (ROOT / 'README.md').read_text()
    pics = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', readme)
    assert pics and readme.find(pics[0]) < readme.find('## '), "the README must open with a picture from the course"
    for stem in render.HEADLINES:
        if (render.NBS / f"{stem}.ipynb").exists():
            assert f"nbs/images/{stem}.png" in pics, f"the README does not show {stem}'s headline picture"
    for p in pics:
        if not p.startswith('http'): assert (ROOT / p).exists(), f"README shows {p}, which does not exist: {RENDER}"


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_colab_badge_opens_this_file(nb):
    cells = load(nb)['cells']
    badges = [re.findall(r'\((https://colab\.research\.google\.com/github/[^)]+)\)', ''.join(c['source'])) for c in cells[:3]
              if c['cell_type'] == 'markdown' and colab.BADGE_MARK in ''.join(c['source'])]
    assert badges and badges[0], f"{nb.name} has no Colab badge at its top: python tools/colab.py {nb.relative_to(ROOT)}"
    url = badges[0][0]
    user, repo, branch = colab.repo()
    prefix = f"https://colab.research.google.com/github/{user}/{repo}/blob/{branch}/"
    assert url.startswith(prefix) and (ROOT / url[len(prefix):]).resolve() == nb.resolve(), f"{nb.name}: the badge opens {url}"


def _run_setup_cell(src: str, on_colab: bool, monkeypatch) -> list:
    "Run the Colab cell's code as IPython would, with IPython's magics recorded instead of run: the magics called."
    from IPython.core.inputtransformer2 import TransformerManager
    calls = []
    shell = types.SimpleNamespace(run_line_magic=lambda name, line, *a: calls.append((name, line)),
                                  system=lambda cmd: calls.append(('!', cmd)))
    if on_colab: monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
    else: monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
    exec(compile(TransformerManager().transform_cell(src), 'colab-cell', 'exec'), {'get_ipython': lambda: shell})
    return calls


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_colab_cell_installs_on_colab_and_does_nothing_elsewhere(nb, monkeypatch):
    cells = load(nb)['cells']
    setup = [c for c in cells[:4] if c['cell_type'] == 'code' and colab.CELL_MARK in ''.join(c['source'])]
    assert setup, f"{nb.name} has no Colab set-up cell at its top: python tools/colab.py {nb.relative_to(ROOT)}"
    src = ''.join(setup[0]['source'])
    monkeypatch.delenv('SD_INTRO_MODEL', raising=False)
    before = dict(os.environ)
    assert _run_setup_cell(src, on_colab=False, monkeypatch=monkeypatch) == [], "the cell must do nothing outside Colab"
    assert dict(os.environ) == before
    calls = _run_setup_cell(src, on_colab=True, monkeypatch=monkeypatch)
    assert len(calls) == 1 and calls[0][0] == 'pip' and 'sd_intro' in calls[0][1], calls
    try:
        real = _run_setup_cell(src.replace("REAL_MODEL = ''", "REAL_MODEL = 'CompVis/stable-diffusion-v1-4'"), True, monkeypatch)
        assert real and os.environ.get('SD_INTRO_MODEL') == 'CompVis/stable-diffusion-v1-4', "REAL_MODEL must switch the checkpoint"
    finally: os.environ.pop('SD_INTRO_MODEL', None)


def test_colab_tool_is_idempotent(tmp_path):
    nb = render.lessons()[0]
    copy = ROOT / 'nbs' / f"_tmp_colab_{os.getpid()}.ipynb"   # in nbs/ so the badge path is computed the same way
    try:
        copy.write_text(nb.read_text())
        assert colab.add(copy) is True   # the path changed, so the badge changes
        assert colab.add(copy) is False
        assert copy.name in ''.join(load(copy)['cells'][1]['source'])
    finally: copy.unlink(missing_ok=True)
