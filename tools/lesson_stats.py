"""How a lesson reads: where its first picture comes, and how much code and prose its teaching part holds.

Usage: python tools/lesson_stats.py [--rev GIT_REV] [NOTEBOOK ...]   (default: every lesson, nbs/01_* to nbs/09_*)

- teaching part: the cells before the markdown heading '## Reference' (all cells when there is none);
- first picture: the first code cell with a PNG output; a notebook without outputs is read from its source (a cell
  whose last line shows a grid, a strip or a resized image, `#| gpu` cells excepted), marked '(from source)';
- code lines: non-blank lines of the teaching part's code cells, `#|` directives left out, of which 'library' are in
  `#| export` cells; prose lines: non-blank lines of its markdown cells.
With --rev, the notebooks are read as they were at that git revision (e.g. to compare before and after).
"""
from __future__ import annotations
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWS = re.compile(r"^(image_grid\(|[\w.\[\]()']+\.(grid|strip|resize)\(|\w+\s*$)")


def _src(c) -> str: return ''.join(c['source'])


def is_picture(c) -> tuple[bool, bool]:
    "(is it a picture, was it read from the source rather than from an output)"
    if any('image/png' in o.get('data', {}) for o in c.get('outputs', [])): return True, False
    s = _src(c)
    if c.get('outputs') or re.search(r'^#\|\s*(gpu|slow)', s, re.M): return False, False
    lines = [l for l in s.split('\n') if l.strip() and not l.startswith(('#', ' ', ')'))]
    return (bool(lines) and bool(SHOWS.match(lines[-1])) and '=' not in lines[-1].split('(')[0]), True


def stats(nb: dict) -> dict:
    cells = nb['cells']
    end = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and _src(c).startswith('## Reference')), len(cells))
    teach = cells[:end]
    rendered = any(c.get('outputs') for c in cells if c['cell_type'] == 'code')
    first, from_src, code_before = None, False, 0
    for i, c in enumerate(cells):
        if c['cell_type'] != 'code': continue
        pic, src = is_picture(c) if not rendered else (is_picture(c)[0] and not is_picture(c)[1], False)
        if pic: first, from_src = i, src; break
        code_before += 1
    lines = lambda c: [l for l in _src(c).split('\n') if l.strip() and not l.startswith('#|')]
    code = sum(len(lines(c)) for c in teach if c['cell_type'] == 'code')
    lib = sum(len(lines(c)) for c in teach if c['cell_type'] == 'code' and re.search(r'^#\|\s*export', _src(c), re.M))
    prose = sum(len(lines(c)) for c in teach if c['cell_type'] == 'markdown')
    return dict(cells=len(cells), teaching_cells=len(teach), first_picture_cell=first,
                first_picture_fraction=None if first is None else round(first / len(cells), 3),
                code_cells_before_picture=code_before, from_source=from_src,
                teaching_code_lines=code, teaching_library_lines=lib, teaching_prose_lines=prose)


def load(path: Path, rev: str | None) -> dict:
    if rev is None: return json.loads(Path(path).read_text())
    rel = Path(path).resolve().relative_to(ROOT).as_posix()
    return json.loads(subprocess.run(['git', 'show', f'{rev}:{rel}'], cwd=ROOT, check=True, capture_output=True, text=True).stdout)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    rev = None
    if '--rev' in args: k = args.index('--rev'); rev = args[k + 1]; args = args[:k] + args[k + 2:]
    paths = [Path(a) for a in args] or sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if re.match(r'0[1-9]_', p.name))
    print(f"{'lesson':16} {'cells':>5} {'1st picture':>12} {'code cells before':>17} {'code lines':>10} {'of library':>10} {'prose lines':>11}"
          + (f"   (at {rev})" if rev else ''))
    for p in paths:
        try: s = stats(load(p, rev))
        except subprocess.CalledProcessError: print(f"{p.stem:16} (not at {rev})"); continue
        pic = '-' if s['first_picture_cell'] is None else f"{s['first_picture_cell']} ({s['first_picture_fraction']:.0%})" + ('*' if s['from_source'] else '')
        print(f"{p.stem:16} {s['cells']:>5} {pic:>12} {s['code_cells_before_picture']:>17} {s['teaching_code_lines']:>10} "
              f"{s['teaching_library_lines']:>10} {s['teaching_prose_lines']:>11}")
    print("* read from the source: the notebook has no outputs")


if __name__ == '__main__': main()
