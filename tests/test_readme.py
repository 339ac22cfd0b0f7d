"""README.md and the docs site's home page (nbs/index.ipynb) are one source: the README is made from the notebook
(`python tools/readme.py`), says how to install today, and keeps its two set-up commands."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import readme  # noqa: E402

README = (ROOT / 'README.md').read_text()


def test_readme_is_made_from_the_home_page():
    assert README == readme.readme_from(json.loads(readme.INDEX.read_text())), \
        "README.md differs from nbs/index.ipynb: edit the notebook, then run `python tools/readme.py`"


def test_picture_paths_work_from_both_places():
    nb = {'cells': [{'cell_type': 'markdown', 'source': '# t\n\n![a picture](images/02_guidance.png) <img src="images/x.png">'},
                    {'cell_type': 'code', 'source': 'print(1)', 'outputs': []}]}
    out = readme.readme_from(nb)
    assert '](nbs/images/02_guidance.png)' in out and 'src="nbs/images/x.png"' in out and 'print(1)' not in out
    index = ''.join(''.join(c['source']) for c in json.loads(readme.INDEX.read_text())['cells'])
    for p in re.findall(r'!\[[^\]]*\]\(([^)]+)\)', index):   # the home page's pictures, from nbs/
        assert p.startswith('http') or (ROOT / 'nbs' / p).exists(), f"the home page shows {p}, which is not in nbs/"


def test_readme_says_how_to_install_today():
    assert 'git+https://github.com/sd-intro/sd_intro' in README, "say how to install from the repository"
    for m in re.finditer(r'pip install sd_intro\b', README):   # PyPI only as what comes after the first release
        sentence = README[max(README.rfind('.', 0, m.start()), README.rfind('\n\n', 0, m.start()), 0):m.start()]
        assert re.search(r'\b(once|after|when)\b', sentence), f"`pip install sd_intro` is given as the way to install today: {sentence!r}"


def test_two_set_up_commands_and_ci_runs_the_test_command():
    block = re.search(r'## Set up: two commands.*?```sh\n(.*?)```', README, re.S)
    assert block, "the README's set-up section with its commands"
    assert [l.split('#')[0].strip() for l in block.group(1).strip().splitlines()] == ['make course', 'make test']
    ci = (ROOT / '.ci' / 'run').read_text()
    assert re.search(r'^make test\s*$', ci, re.M), ".ci/run must run the README's test command"
