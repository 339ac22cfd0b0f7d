"""Run All on a laptop: every lesson, executed exactly as committed, must finish without an error.

Each lesson runs top to bottom in a fresh kernel through nbclient (not nbdev's runner: no cell is skipped and no tag
is honoured), with CUDA hidden, the Hugging Face Hub offline and the kernel's working folder in nbs/, as on a laptop
without a GPU or internet. Cells for a real checkpoint must skip themselves there with one printed line, and no
cell may print warning spam. `make render` uses the same execution (tools/render.py) to write the outputs that are
committed; tests/test_notebooks.py leaves the lessons to this test, so each notebook runs once in `make test`.
"""
import os, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render  # noqa: E402

SKIP_LINE = 'skipped: needs a CUDA GPU'
# what a student must not have to read through: library warnings that are not about their code, and progress bars
SPAM = re.compile(r"No LoRA keys associated|torchvision|it/s\]|s/it\]|\d+%\|[█▏▎▍▌▋▊▉ ]*\||Loading pipeline components|"
                  r"Map: |Fetching \d+ files|UserWarning|FutureWarning|DeprecationWarning")


def stream_text(cell) -> str:
    return ''.join(''.join(o.get('text', '')) for o in cell.get('outputs', []) if o.get('output_type') == 'stream')


def shown_text(cell) -> str:
    "Printed text and the text of displayed widgets (a progress bar is a widget whose text GitHub shows)."
    return stream_text(cell) + ''.join(''.join(o['data'].get('text/plain', '')) + '\n' for o in cell.get('outputs', [])
                                       if o.get('output_type') == 'display_data' and
                                       'application/vnd.jupyter.widget-view+json' in o.get('data', {}))


def spam_in(nb) -> list[str]:
    "'cell N: line' for every output line of `nb` that is warning or progress-bar spam."
    return [f"cell {i}: {line[:200]}" for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code'
            for line in shown_text(c).splitlines() if SPAM.search(line)]


def test_there_are_lessons():
    assert len(render.lessons()) >= 4, render.lessons()


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_lesson_runs_as_committed_without_a_gpu(nb):
    threads = 1 if os.environ.get('PYTEST_XDIST_WORKER') else None   # side by side with other tests: a core each
    out, secs = render.execute(nb, threads=threads)   # raises nbclient's CellExecutionError, naming the cell, on any error
    gpu = [c for c in out['cells'] if c['cell_type'] == 'code' and re.search(r'^#\|\s*gpu', ''.join(c['source']), re.M)]
    for c in gpu:
        text = stream_text(c).strip()
        assert text.startswith(SKIP_LINE) and '\n' not in text and not any('data' in o for o in c['outputs']), \
            f"{nb.name}: a `#| gpu` cell ran or said more than one line without a GPU:\n{''.join(c['source'])}\n---\n{text}"
    assert not spam_in(out), f"{nb.name}: warning or progress spam in the outputs:\n" + '\n'.join(spam_in(out))
