"Every notebook in nbs/, executed through nbdev's runner: one pytest case per notebook, honouring `tst_flags`."
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it as a test

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))
SKIP_FLAGS = get_config(path=ROOT).tst_flags.split()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    ok, secs = run_notebook(nb, skip_flags=SKIP_FLAGS)
    assert ok, f"{nb.name} failed after {secs:.0f}s: its traceback is in the captured stderr above"
