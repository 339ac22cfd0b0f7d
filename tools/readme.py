"""Write README.md from nbs/index.ipynb, the docs site's home page: one source for both front pages.

nbdev's own `nbdev_readme` does this through Quarto; this does the same without it: the home page's Markdown cells, in
order, with the pictures' paths made relative to the repository root (`images/x.png` in nbs/ is `nbs/images/x.png`
in the README). `tests/test_readme.py` fails when README.md is not what this makes of the notebook.

    python tools/readme.py            # writes README.md
    python tools/readme.py --check    # exit status 1 if README.md is out of date
"""
from __future__ import annotations
import argparse, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / 'nbs' / 'index.ipynb'
README = ROOT / 'README.md'
NOTE = "<!-- Made from nbs/index.ipynb by `python tools/readme.py`: edit the notebook, not this file. -->"


def readme_from(nb: dict) -> str:
    "README.md's text from the home page notebook: its Markdown cells, picture paths from the repository root."
    cells = [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'markdown']
    text = '\n\n'.join(c for c in cells if c)
    text = re.sub(r'(!\[[^\]]*\]\()(images/)', r'\1nbs/\2', text)          # ![...](images/x.png)
    text = re.sub(r'(<img [^>]*src=")(images/)', r'\1nbs/\2', text)        # <img src="images/x.png">
    return f"{text}\n\n{NOTE}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--check', action='store_true', help='only check that README.md is up to date')
    a = ap.parse_args(argv)
    text = readme_from(json.loads(INDEX.read_text()))
    if a.check:
        ok = README.read_text() == text
        print('README.md is up to date' if ok else 'README.md is out of date: run python tools/readme.py')
        return 0 if ok else 1
    README.write_text(text)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == '__main__': sys.exit(main())
