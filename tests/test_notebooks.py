"""Every notebook in nbs/ but the lessons, executed through nbdev's runner: one pytest case per notebook, honouring `tst_flags`.

The lessons run in tests/test_run_all.py instead, as committed with no cell skipped (a superset of this run), so
that `make test` executes each notebook once."""
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it as a test

ROOT = Path(__file__).resolve().parents[1]
LESSONS = {p.name for p in (ROOT / 'nbs').glob('0[1-9]_*.ipynb')}   # tools/render.py's lessons(): run by test_run_all.py
NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_') and p.name not in LESSONS)
SKIP_FLAGS = get_config(path=ROOT).tst_flags.split()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3 and LESSONS, NOTEBOOKS


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    ok, secs = run_notebook(nb, skip_flags=SKIP_FLAGS)
    assert ok, f"{nb.name} failed after {secs:.0f}s: its traceback is in the captured stderr above"
