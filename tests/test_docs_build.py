"""The docs site's build, without Quarto: nbdev's processing step (`nbdev_proc_nbs`, the first half of `nbdev_docs`).

`nbdev_docs` executes every notebook cell that holds an import (and every exported or `show_doc` cell) while it
builds the pages. A cell that mixes an import with other code therefore runs without the cells before it and fails
(nbdev warns "Found cells containing imports and other code"). These tests keep the build clean:

- `test_no_cell_mixes_imports_and_code`: nbdev's own rule, applied to every notebook without running anything;
- `test_docs_build_processes_every_notebook`: `nbdev_proc_nbs` itself, with Quarto's install step switched off
  (nbdev would otherwise try `sudo` and then `pip install -e .` into whatever `pip` is on the PATH).

`python tests/test_docs_build.py --fix` splits each offending cell where it can: its top-level statements go into
consecutive cells of imports and of other code, in their original order, with the cell's directives on each.
"""
import ast, json, os, signal, subprocess, sys, uuid, warnings
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))
WARNING = 'Found cells containing imports and other code'


def mixed_cells(nb: Path) -> list:
    "(index, source) of each cell of `nb` that nbdev's docs build would execute and flag as imports mixed with code."
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    hits = []
    def check(cell):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            _do_eval(cell)
        if any(WARNING in str(w.message) for w in caught): hits.append((cell.idx_, cell.source))
    NBProcessor(nb, [check]).process()
    return hits


def test_no_cell_mixes_imports_and_code():
    bad = {nb.name: [i for i, _ in mixed_cells(nb)] for nb in NOTEBOOKS}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, (f"cells that mix imports with other code (notebook: cell indices): {bad}. The docs build runs "
                     "them without the cells before them. Put the imports in a cell of their own: "
                     "`python tests/test_docs_build.py --fix` does it")


PROC = """
import nbdev.quarto as q
q._ensure_quarto = lambda: None   # no Quarto needed to process notebooks, and no `sudo`/`pip install` attempt
# n_workers=0: every notebook in this one process (a pool of spawned workers loads the libraries again in each: twice
# the CPU, while the other tests run side by side); an error in any notebook still fails the build
q.nbdev_proc_nbs.__wrapped__(force=True, n_workers=0)
"""


def test_docs_build_processes_every_notebook():
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'PYTHONWARNINGS': 'default'}
    env.pop('SD_INTRO_MODEL', None)
    # its own process group: nbdev's worker processes go too if it has to be stopped
    p = subprocess.Popen([sys.executable, '-c', PROC], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: out, _ = p.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"nbdev_proc_nbs ran past 1800 s; processed so far: {sorted(q.name for q in (ROOT / '_proc').glob('*.ipynb'))}\n{out[-3000:]}")
    assert p.returncode == 0, f"nbdev_proc_nbs failed (exit {p.returncode}):\n{out[-6000:]}"
    assert WARNING not in out, f"nbdev warned about mixed import cells:\n{out[-6000:]}"
    missing = [nb.name for nb in NOTEBOOKS if not (ROOT / '_proc' / nb.name).exists()]
    assert not missing, f"not processed: {missing}\n{out[-3000:]}"


# ---- the fixer -------------------------------------------------------------------------------------------------

def _split(src: str):
    "The parts of a mixed cell's source: runs of top-level imports and of other code, or None where it cannot split."
    lines = src.splitlines(keepends=True)
    directives = []
    while lines and lines[0].startswith('#|'): directives.append(lines.pop(0))
    body = ''.join(lines)
    try: tree = ast.parse(body)
    except SyntaxError: return None
    if not tree.body: return None
    runs, prev_end = [], 0
    for stmt in tree.body:
        kind = isinstance(stmt, (ast.Import, ast.ImportFrom))
        chunk = ''.join(lines[prev_end:stmt.end_lineno])
        prev_end = stmt.end_lineno
        if runs and runs[-1][0] == kind: runs[-1][1] += chunk
        else: runs.append([kind, chunk])
    runs[-1][1] += ''.join(lines[prev_end:])
    if len(runs) < 2: return None   # only nested imports: split by hand
    return [(kind, ''.join(directives) + chunk.strip('\n')) for kind, chunk in runs]


def fix(nb: Path) -> int:
    "Split the mixed cells of `nb` in place; return how many cells were split."
    bad = {i for i, _ in mixed_cells(nb)}   # indices into the notebook's cells
    if not bad: return 0
    d = json.loads(nb.read_text(encoding='utf-8'))
    cells, n = [], 0
    for idx, c in enumerate(d['cells']):
        src = ''.join(c['source'])
        parts = _split(src) if idx in bad else None
        if not parts:
            if idx in bad: print(f"{nb.name}: split by hand (nested imports):\n{src}\n")
            cells.append(c); continue
        n += 1
        keep = max(i for i, (kind, _) in enumerate(parts) if not kind)  # outputs stay with the last code part
        for i, (kind, text) in enumerate(parts):
            new = {**c, 'source': text.splitlines(keepends=True)}
            if i != keep:
                new.update(id=uuid.uuid4().hex[:8], outputs=[], execution_count=None)
            cells.append(new)
    d['cells'] = cells
    nb.write_text(json.dumps(d, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    return n


if __name__ == '__main__':
    if sys.argv[1:2] != ['--fix']: sys.exit(__doc__)
    for nb in [Path(a) for a in sys.argv[2:]] or NOTEBOOKS:   # --fix [notebook ...]
        if n := fix(nb): print(f"{nb.name}: {n} cells split")
    print("now run nbdev_clean, then check: python -m pytest tests/test_docs_build.py")
