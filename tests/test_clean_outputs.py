"""What a reader sees in the committed notebooks is the lesson, not the machine: no library warnings, no machine
paths, and (in a lesson's teaching part, before its Summary) no timing lines or cells that only test; the Summary
comes before the Reference part. These read the committed outputs: a second."""
import json, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render  # noqa: E402

WARNING = re.compile(r'(\b\w*Warning\b|\bwarn(ing)?:|should be kept in float32|mean_resizing|Token indices sequence length|'
                     r'is deprecated|will be removed in)', re.I)
PATH = re.compile(r'(?<![\w.])(/tmp/|/var/folders/|/work/|/root/|/home/\w|/Users/\w|[A-Z]:\\\\Users|site-packages/|'
                  r'/build/|/_proc/|/\.cache/|ipykernel_\d+)')
TIMING = re.compile(r'\b(ran|took|finished|done) in \d+(\.\d+)? ?(s|ms|sec|seconds|min|minutes)\b|\[\d+(\.\d+)? ?s\]', re.I)
TEST_LINE = re.compile(r'(test_(eq|ne|fail|close|is|warns|stdout|shuffled|eq_type)\(|assert\b)')


def cells_of(nb): return json.loads(nb.read_text())['cells']


def shown(cell) -> list[tuple[str, str]]:
    "(stream name or output kind, text) of what a code cell shows."
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': out.append((o.get('name', ''), ''.join(o.get('text', ''))))
        elif 'data' in o:
            for k in ('text/plain', 'text/markdown', 'text/html'):
                if k in o['data'] and not (k == 'text/plain' and 'image/png' in o['data']): out.append((k, ''.join(o['data'][k])))
        elif o.get('output_type') == 'error': out.append(('error', o.get('ename', '')))
    return out


def teaching_end(cells) -> int:
    "Index of the first cell of the Summary or Reference part (the end of the teaching part)."
    for i, c in enumerate(cells):
        if c['cell_type'] == 'markdown' and re.search(r'^#+\s*(Summary|Reference)', ''.join(c['source']), re.M): return i
    return len(cells)


def only_checks(src: str) -> bool:
    "Whether a cell's code is nothing but checks (test_eq, test_fail, assert ...)."
    lines = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith('#')]
    tops = [l for l in lines if not l[0].isspace() and not l.startswith((')', ']', '}'))]
    return bool(tops) and all(TEST_LINE.match(l) for l in tops)


def warnings_in(cells):
    return [f"cell {i}: {line[:160]}" for i, c in enumerate(cells) if c['cell_type'] == 'code' for name, t in shown(c)
            for line in t.splitlines() if line.strip() and (name == 'stderr' or WARNING.search(line))]


def paths_in(cells):
    return [f"cell {i}: {line[:160]}" for i, c in enumerate(cells) if c['cell_type'] == 'code' for _, t in shown(c)
            for line in t.splitlines() if PATH.search(line)]


def teaching_noise(cells):
    end, out = teaching_end(cells), []
    for i, c in enumerate(cells[:end]):
        if c['cell_type'] != 'code': continue
        out += [f"cell {i}: timing line {line.strip()[:120]!r}" for _, t in shown(c) for line in t.splitlines() if TIMING.search(line)]
        if only_checks(''.join(c['source'])): out.append(f"cell {i}: only checks, {''.join(c['source'])[:80]!r}")
    return out


@pytest.mark.parametrize('nb', render.notebooks(), ids=lambda p: p.stem)
def test_no_library_warnings_in_outputs(nb):
    found = warnings_in(cells_of(nb))
    assert not found, f"{nb.name} shows warnings: silence them where they start (library code), then re-render:\n" + '\n'.join(found)


@pytest.mark.parametrize('nb', render.notebooks(), ids=lambda p: p.stem)
def test_no_machine_paths_in_outputs(nb):
    found = paths_in(cells_of(nb))
    assert not found, f"{nb.name} prints paths of the machine that rendered it (say the file's name instead):\n" + '\n'.join(found)


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_teaching_part_has_no_timing_lines_or_test_only_cells(nb):
    found = teaching_noise(cells_of(nb))
    assert not found, f"{nb.name}: move these after the Summary (the Reference part) or show what they check:\n" + '\n'.join(found)


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_summary_comes_before_the_reference_part(nb):
    heads = [(i, l) for i, c in enumerate(cells_of(nb)) if c['cell_type'] == 'markdown'
             for l in ''.join(c['source']).splitlines() if re.match(r'#+\s', l)]
    summary = [i for i, l in heads if re.match(r'#+\s*Summary', l)]
    reference = [i for i, l in heads if re.match(r'#+\s*Reference', l)]
    assert summary and reference, f"{nb.name} needs a '## Summary' and a '## Reference' part"
    assert summary[0] < reference[0], f"{nb.name}: the Summary (cell {summary[0]}) comes after the Reference part (cell {reference[0]})"


def test_the_checks_catch_what_they_should():
    cell = lambda src, *outs: {'cell_type': 'code', 'source': src, 'outputs': [
        {'output_type': 'stream', 'name': n, 'text': t} for n, t in outs]}
    md = lambda s: {'cell_type': 'markdown', 'source': s}
    assert warnings_in([cell('x', ('stderr', 'There are modules in UNet2DConditionModel that should be kept in float32: []'))])
    assert warnings_in([cell('x', ('stdout', "/tmp/x.py:4: ResizeNote: resized"))]) == []   # a note without "Warning"...
    assert paths_in([cell('x', ('stdout', "/tmp/x.py:4: ResizeNote: resized"))])           # ...still shows a path
    assert paths_in([cell('x', ('stdout', 'CaptionedImages(256 pictures of /tmp/tmpgx08ah66/creatures)'))])
    assert not paths_in([cell('x', ('stdout', 'saved creatures/lora after 2 steps; 64/255 levels'))])
    nb = [md('## Lesson'), cell('test_eq(1, 1)\nassert 2 > 1'), cell('print(1)', ('stdout', 'lesson ran in 30 s')),
          cell('a = 1\ntest_eq(a, 1)'), md('## Summary'), cell('test_eq(2, 2)', ('stdout', 'lesson ran in 30 s'))]
    assert [f.split(':')[0] for f in teaching_noise(nb)] == ['cell 1', 'cell 2']
