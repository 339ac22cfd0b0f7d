"""Put an "Open in Colab" badge and the Colab set-up cell at the top of lessons (idempotent: run it again any time).

Usage: python tools/colab.py [NOTEBOOK ...]    (default: every lesson, nbs/01_* to nbs/09_*)

Right under the title cell each lesson gets a markdown cell with the badge (its link names the notebook's own file
in the repository of settings.ini) and a code cell that installs sd_intro when it runs on Colab and does nothing
anywhere else. A new lesson needs only `python tools/colab.py nbs/04_new_lesson.ipynb`.
"""
from __future__ import annotations
import configparser, json, re, sys, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE_MARK = 'colab-badge.svg'
CELL_MARK = "'google.colab' in sys.modules"


def repo() -> tuple[str, str, str]:
    "(user, repo, branch) from settings.ini."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'settings.ini')
    d = cfg['DEFAULT']
    return d['user'], d['repo'], d.get('branch', 'main')


def colab_url(path: Path) -> str:
    "The Colab address that opens `path` (a notebook of this repository) from GitHub."
    user, name, branch = repo()
    rel = Path(path).resolve().relative_to(ROOT).as_posix()
    return f"https://colab.research.google.com/github/{user}/{name}/blob/{branch}/{rel}"


def badge_source(path: Path) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/{BADGE_MARK})]({colab_url(path)})\n\n"
            "Runs anywhere: on a laptop's CPU with the small model that ships with the course (cells for a real "
            "checkpoint skip themselves without a CUDA GPU), or on Colab, where the next cell installs the course.")


def setup_source() -> str:
    user, name, branch = repo()
    return ("#| hide\n"
            "# On Colab this cell installs the course; anywhere else it does nothing.\n"
            "# On a Colab GPU, name a real checkpoint here to run the lessons on it, e.g. 'CompVis/stable-diffusion-v1-4'.\n"
            "REAL_MODEL = ''\n"
            "import os, sys\n"
            f"if {CELL_MARK}:\n"
            f"    %pip install -q \"sd_intro @ git+https://github.com/{user}/{name}@{branch}\"\n"
            "    if REAL_MODEL: os.environ['SD_INTRO_MODEL'] = REAL_MODEL")


def _lines(s: str) -> list[str]: return s.splitlines(True)


def add(path: Path) -> bool:
    "Insert or refresh the badge and set-up cells of notebook `path`: True if the file changed."
    path = Path(path)
    text = path.read_text()
    nb = json.loads(text)
    cells = nb['cells']
    if not cells or cells[0]['cell_type'] != 'markdown' or not ''.join(cells[0]['source']).startswith('# '):
        raise ValueError(f"{path}: the first cell must be the markdown title ('# Lesson ...'); add one first")
    cells[:] = [c for c in cells if not (c['cell_type'] == 'markdown' and BADGE_MARK in ''.join(c['source']))
                and not (c['cell_type'] == 'code' and CELL_MARK in ''.join(c['source']))]
    new = lambda t, s: {'cell_type': t, 'id': uuid.uuid4().hex[:8], 'metadata': {}, 'source': _lines(s),
                        **({'execution_count': None, 'outputs': []} if t == 'code' else {})}
    old = {c.get('id') for c in cells}
    cells[1:1] = [new('markdown', badge_source(path)), new('code', setup_source())]
    out = json.dumps(nb, indent=1, ensure_ascii=False) + '\n'
    if _same(json.loads(text), nb): return False
    path.write_text(out)
    return True


def _same(a, b) -> bool:
    strip = lambda nb: [(c['cell_type'], ''.join(c['source'])) for c in nb['cells']]
    return strip(a) == strip(b)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if re.match(r'0[1-9]_', p.name))
    for p in paths: print(f"{p}: {'updated' if add(p) else 'already up to date'}")


if __name__ == '__main__': main()
