"""Every figure in a lesson's prose is one the lesson printed, a setting it ran with, or a bench result it cites.

`tools/claims.py` reads the committed (rendered) notebooks, so these checks take a second; after `make render`
they say which prose no longer matches the new outputs: `python tools/claims.py` lists
"notebook, cell, figure, nearest printed values".
"""
import copy, json, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import claims  # noqa: E402

FIX = "state what the lesson prints (or print what the prose states); `python tools/claims.py` lists them all"


@pytest.mark.parametrize('nb', claims.checked_notebooks(), ids=lambda p: p.stem)
def test_figures_in_prose_are_printed(nb):
    found = claims.check_notebook(nb)
    assert not found, f"{len(found)} figure(s) in {nb.name}'s prose that it does not print ({FIX}):\n" + '\n'.join(map(str, found))


def test_readme_captions_state_what_the_lessons_print():
    found = claims.check_readme()
    assert not found, f"README captions not backed by their lesson's outputs ({FIX}):\n" + '\n'.join(map(str, found))


def test_every_lesson_is_checked():
    names = {p.name for p in claims.checked_notebooks()}
    assert {p.name for p in (ROOT / 'nbs').glob('0[1-9]_*.ipynb')} <= names
    assert {p.name for p in (ROOT / 'nbs').glob('00[a-z]_lib_*.ipynb')} <= names   # the library notebooks too
    assert 'index.ipynb' not in names


# --- the checker itself, on small made-up notebooks and on a planted mismatch -----------------------------------

def nb_of(markdown: str, printed: str = '', code: str = 'x = 1') -> dict:
    "A notebook with one code cell that printed `printed`, then one markdown cell."
    return {'cells': [{'cell_type': 'code', 'source': code, 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': printed}]},
                      {'cell_type': 'markdown', 'source': markdown}]}


def flagged(markdown, printed='', code='x = 1'):
    return [f.figure.text for f in claims.check_notebook(Path('t.ipynb'), nb_of(markdown, printed, code))]


def test_figures_are_found_with_their_units():
    figs = claims.figures_in("64x64 pictures, 8x8 latents; 43% of them, a 6.8x saving, 163 ms, about 15 MB, "
                             "`guidance_scale=7.5` and 20 steps in 0.39 s; three times as large", 'x')
    assert sorted((f.kind, f.value) for f in figs) == sorted([('percent', 43), ('times', 6.8), ('seconds', 0.163), ('steps', 20),
                                                              ('seconds', 0.39), ('bytes', 15), ('times', 3)])
    assert claims.figures_in("about 15 MB", 'x')[0].how == 'about'


def test_a_figure_holds_within_its_rounding():
    assert flagged("judged right 66% of the time", "LCM 1 step 66% vs base 5 steps 76%") == []
    assert flagged("judged right 43% of the time", "adherence 0.4296875") == []    # a printed fraction
    assert flagged("judged right 43.1% of the time", "adherence 0.4296875") == ['43.1%']
    assert flagged("every one: 100%", "judged small and top left: 8 of 8") == []
    assert flagged("it takes 163 ms", "base: 0.1634 s per picture") == []
    assert flagged("about 4 times too small", "raw std 4.30 times the scaled std") == []


def test_the_issues_examples_are_caught():
    # lesson 7: "a bit less than 15x" where the lesson measures 163 ms against 24 ms, ratio 0.15 (6.7 times)
    printed = "base, 30 steps: 163 ms per picture; LCM, 4 steps: 24 ms; ratio 0.15"
    assert flagged("so the saving is a bit less than 15x.", printed) == ['than 15x']
    assert flagged("so the saving is about 7x.", printed) == []
    # lesson 6: "about 3 times too small" where the lesson prints a raw std of 4.30 against 1.00
    assert flagged("(here about 3 times too small)", "std of the raw latents: 4.30 times the scaled ones") == ['about 3 times']
    # a typed figure from an earlier model
    assert flagged("one step is judged right 80% of the time", "LCM 1 step 66% vs base 5 steps 76%") == ['80%']


def test_settings_and_given_figures_are_not_claims():
    assert flagged("The embedded model gets by with 20 steps", code="generate(pipe, p, num_inference_steps=20)") == []
    assert flagged("at strength 60%", code="img2img(pipe, strength=0.6)") == []
    assert flagged("a ratio from code is not a result: 3 times", code="x = 3") == ['3 times']
    assert flagged("the A100 figure is 2.3 s <!-- given: 2.3 s -->") == []
    assert flagged("`num_inference_steps=50` in code is not prose") == []


def test_a_cited_bench_result_backs_a_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, 'RESULTS', tmp_path)
    (tmp_path / 'thing.json').write_text(json.dumps({'model': 'abc', 'after': 0.453125}))
    assert flagged("the bench (`bench/results/thing.json`) reads 45% after") == []
    assert flagged("the bench (`bench/results/thing.json`) reads 54% after") == ['54%']
    assert flagged("no bench cited: 45% after") == ['45%']


def test_a_planted_mismatch_in_a_committed_lesson_is_caught():
    path = ROOT / 'nbs' / '02_guidance.ipynb'
    nb = json.loads(path.read_text())
    assert claims.check_notebook(path, nb) == [], "lesson 2 must pass before the planted mismatch means anything"
    printed = ''.join(t for c in nb['cells'] if c['cell_type'] == 'code' for t in claims.outputs_of(c))
    pct = sorted({v for v, u, _ in claims._numbers(printed) if u == '%'})
    assert pct, "lesson 2 prints percentages"
    wrong = next(p + d for p in pct for d in (7, -7, 13) if 0 <= p + d <= 100 and
                 all(abs(p + d - q) > 0.5 for q in claims.Evidence([printed], [], []).values('percent')))
    planted = copy.deepcopy(nb)
    i = next(i for i, c in enumerate(planted['cells']) if c['cell_type'] == 'markdown' and 'Summary' in ''.join(c['source']))
    planted['cells'][i]['source'] = ''.join(planted['cells'][i]['source']) + f"\n- The judge agrees {wrong:.0f}% of the time.\n"
    found = claims.check_notebook(path, planted)
    assert [f.figure.text for f in found] == [f"{wrong:.0f}%"]
    assert f"cell {i}" in str(found[0]) and 'nearest printed values' in str(found[0])


def test_readme_comparisons_need_figures(tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text("**Lesson 7, few steps**: one step of the distilled model is judged right more often than five of the base model.\n")
    assert [f.figure.kind for f in claims.check_readme(readme)] == ['comparison']
    nb = json.loads((ROOT / 'nbs' / '07_few_steps.ipynb').read_text())
    printed = ''.join(t for c in nb['cells'] if c['cell_type'] == 'code' for t in claims.outputs_of(c))
    pct = [v for v, u, _ in claims._numbers(printed) if u == '%']
    readme.write_text(f"**Lesson 7, few steps**: one step is judged right {pct[0]:.0f}% of the time, more often than before.\n")
    assert claims.check_readme(readme) == []
    readme.write_text(f"**Lesson 7, few steps**: one step is judged right 101% of the time, more often than before.\n")
    assert [f.figure.text for f in claims.check_readme(readme)] == ['101%']
