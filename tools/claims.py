"""Every figure stated in a lesson's prose is one that the lesson printed (or a setting it ran with, or a bench result it cites).

The course promises that a figure in prose is computed by a cell, never typed in. This checker holds it to that after
every re-render, without a list of numbers kept by hand:

- a *figure* is a number with a unit of result in a markdown cell (or a README caption): a percentage (`43%`), a
  ratio (`6.8x`, `4 times`), a time (`0.39 s`, `163 ms`, `25 minutes`), a size in pixels (`15 px`), a count of
  steps (`20 steps`), a size in bytes (`15 MB`);
- it *holds* when a value printed by the same notebook's committed outputs (text, tables, Markdown outputs) agrees
  with it within its rounding (`43%` is 42.5% to 43.5%; `about`, `roughly` and `~` widen that to 10%; `under 5 s`,
  `more than 90%` are bounds that a printed value must meet, within a factor of 1.5), or when it is a setting: a
  number written in one of the notebook's code cells (`num_inference_steps=20`, `strength=0.6` for `60%`), or a
  result of a bench file the notebook cites (`bench/results/NAME.json`, by name);
- a figure that is neither, such as one taken from a paper or a target, is marked where it stands: listed in an
  HTML comment in the same cell, `<!-- given: 2.3 s, 312 TFLOP/s -->`, invisible on GitHub and the docs site.
  Figures inside backticks are code, not claims.

A comparison without a figure in a README caption ("judged right more often than") is flagged too: the caption must
say the figures, so that they are checked.

Usage: python tools/claims.py [NOTEBOOK ...]   prints "notebook, cell, figure, nearest printed values" for each
figure that does not hold (default: every lesson, library and tool notebook, and the README's captions); exit status 1 if any.
"""
from __future__ import annotations
import json, math, re, sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
RESULTS = ROOT / 'bench' / 'results'

NUM = r'(?<![\w.])(\d+(?:,\d{3})*(?:\.\d+)?)'
WORDS = {'two': 2, 'three': 3, 'four': 4, 'five': 5, 'six': 6, 'seven': 7, 'eight': 8, 'nine': 9, 'ten': 10,
         'twice': 2, 'thrice': 3}
# kind -> (regex with the number as group 1 and the unit as group 2, {unit: factor to the kind's base unit})
UNITS = {
    'percent': (NUM + r'\s?(%|per ?cent\b|percent\b)', {}),
    'times': (NUM + r'\s?(x|×|times)(?![\w\d])(?!\s*\d)', {}),
    'seconds': (NUM + r'\s?(ms|µs|us|s|sec|secs|seconds?|min|mins|minutes?|h|hours?)(?![\w/])',
                {'ms': 1e-3, 'µs': 1e-6, 'us': 1e-6, 'min': 60, 'mins': 60, 'minute': 60, 'minutes': 60,
                 'h': 3600, 'hour': 3600, 'hours': 3600}),
    'pixels': (NUM + r'\s?(px|pixels?)\b', {}),
    'steps': (NUM + r'\s?(steps?)\b', {}),
    'bytes': (NUM + r'\s?(MB|GB|kB|KB|MiB|GiB)\b', {'GB': 1e3, 'kB': 1e-3, 'KB': 1e-3, 'GiB': 1024, 'MiB': 1}),
}
WORD_TIMES = re.compile(r'\b(' + '|'.join(WORDS) + r')(?:\s+times)?\b', re.I)
HEDGE = re.compile(r'(about|roughly|around|approximately|nearly|almost|some|close to|~|≈)\s*$', re.I)
BELOW = re.compile(r'(under|below|less than|fewer than|at most|up to|within|no more than|<=?|≤)\s*$', re.I)
ABOVE = re.compile(r'(over|above|more than|at least|beyond|>=?|≥)\s*$', re.I)
GIVEN = re.compile(r'<!--\s*given:(.*?)-->', re.S)
COMPARE = re.compile(r'\b(more often than|less often than|better than|worse than|faster than|slower than|'
                     r'more than|less than|fewer than|as often as)\b', re.I)
CITE = re.compile(r'bench/results/([\w.-]+\.json)|bench/bench_(\w+)\.py')


@dataclass
class Figure:
    "A figure stated in prose: where, what it says, its value in the kind's base unit, and how it is meant."
    where: str         # 'NN_name.ipynb cell 12' or 'README.md line 80'
    text: str          # the figure as written, e.g. 'about 15x'
    kind: str          # one of UNITS
    value: float
    decimals: int      # digits after the point as written (its rounding)
    how: str = 'equal' # 'equal', 'about', 'below' or 'above'
    context: str = ''  # the sentence around it

    def holds(self, v: float) -> bool:
        "Whether a printed value `v` (same kind and unit) backs this figure."
        half = 0.5 * 10 ** -self.decimals * (1e-3 if self.text.rstrip().endswith('ms') else 1) + 1e-9
        if self.kind == 'seconds' and re.search(r'(min|minutes?|h|hours?)$', self.text): half *= 60
        if self.how == 'equal': return abs(v - self.value) <= half * max(1, _unit_scale(self))
        if self.how == 'about': return abs(v - self.value) <= max(half * _unit_scale(self), 0.1 * abs(self.value))
        if self.how == 'below': return self.value / 1.5 <= v <= self.value + half
        return self.value - half <= v <= 1.5 * self.value


def _unit_scale(f: Figure) -> float:
    "The factor from the figure's own unit to its kind's base unit (1 for most)."
    m = re.search(r'([a-zA-Zµ%×]+)\s*$', f.text)
    return UNITS[f.kind][1].get(m.group(1), 1) if m else 1


@dataclass
class Finding:
    "A figure that no printed value, setting or cited bench result backs."
    figure: Figure
    nearest: list = field(default_factory=list)

    def __str__(self):
        f = self.figure
        near = ', '.join(_fmt(v) for v in self.nearest) or 'nothing of this kind printed'
        why = 'a comparison with no figure' if f.kind == 'comparison' else f"nearest printed values: {near}"
        return f"{f.where}: {f.text!r} ({f.kind}) in \"{f.context}\"; {why}"


def _fmt(v: float) -> str: return f"{v:.4g}"


def prose(src: str) -> str:
    "Markdown without what is not prose: code blocks and spans, HTML comments, link targets, LaTeX."
    src = re.sub(r'```.*?```', ' ', src, flags=re.S)
    src = re.sub(r'<!--.*?-->', ' ', src, flags=re.S)
    src = re.sub(r'`[^`]*`', ' ', src)
    src = re.sub(r'\]\([^)]*\)', ']', src)
    src = re.sub(r'\$[^$]*\$', ' ', src)
    src = re.sub(r'https?://\S+', ' ', src)
    return src


def _sentence(text: str, i: int, j: int) -> str:
    a = max(text.rfind('. ', 0, i), text.rfind('\n\n', 0, i), text.rfind(': ', 0, i - 1), -2) + 2
    b = min([k for k in (text.find('. ', j), text.find('\n\n', j)) if k >= 0] or [len(text)])
    return ' '.join(text[a:b + 1].split())[:200]


def figures_in(src: str, where: str) -> list[Figure]:
    "The figures a markdown text states (figures listed in its `<!-- given: ... -->` comments left out)."
    given = {g.strip() for m in GIVEN.finditer(src) for g in m.group(1).split(',')}
    if any(g.startswith('record') for g in given): return []   # a record of earlier measurements, said so in the text
    text, out = prose(src), []
    for kind, (rx, _) in UNITS.items():
        for m in re.finditer(rx, text):
            num, unit = m.group(1), m.group(2)
            if kind == 'times' and unit == 'x' and re.match(r'\s?x\s?\d', text[m.start(2) - 1:m.start(2) + 3]): continue
            if kind == 'seconds' and unit == 's' and text[m.end(2):m.end(2) + 1] in ("'", '’'): continue
            before = text[max(0, m.start() - 24):m.start()]
            how = 'about' if HEDGE.search(before) else 'below' if BELOW.search(before) else 'above' if ABOVE.search(before) else 'equal'
            written = text[m.start():m.end()]
            if written in given or num in given: continue
            value = float(num.replace(',', '')) * UNITS[kind][1].get(unit, 1)
            decimals = len(num.split('.')[1]) if '.' in num else 0
            out.append(Figure(where, (before.split()[-1] + ' ' if how != 'equal' and before.split() else '') + written,
                              kind, value, decimals, how, _sentence(text, m.start(), m.end())))
    for m in re.finditer(r'\b(' + '|'.join(k for k in WORDS if k not in ('twice', 'thrice')) + r')\s+times\b|\b(twice|thrice)\b', text, re.I):
        w = (m.group(1) or m.group(2)).lower()
        if m.group(2) and not re.match(r'\s+(as|the|faster|slower|larger|smaller|bigger)', text[m.end():m.end() + 9]): continue
        before = text[max(0, m.start() - 24):m.start()]
        how = 'about' if HEDGE.search(before) else 'below' if BELOW.search(before) else 'above' if ABOVE.search(before) else 'equal'
        if m.group(0) in given: continue
        out.append(Figure(where, m.group(0), 'times', WORDS[w], 0, how, _sentence(text, m.start(), m.end())))
    return out


def _numbers(text: str):
    "(value, unit or '', whether written with a decimal point) for every number in a printed text."
    for m in re.finditer(r'(?<![\w.])(-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?)\s?(%|x\b|×|times\b|ms\b|µs\b|s\b|seconds?\b|'
                         r'min\b|minutes?\b|px\b|pixels?\b|MB\b|GB\b|kB\b|steps?\b)?', text):
        try: v = float(m.group(1).replace(',', ''))
        except ValueError: continue
        u = m.group(2) or ''
        yield v, ('steps' if u.startswith('step') else u), bool(re.search(r'[.e]', m.group(1)))
    for m in re.finditer(r'(\d+) (?:of|out of) (\d+)\b', text):   # "8 of 8": a share
        if int(m.group(2)): yield 100 * int(m.group(1)) / int(m.group(2)), '%', True
    for m in re.finditer(r'\bratio:? (\d*\.\d+)', text):   # "ratio 0.15": also 1/0.15 = 6.7 times
        if float(m.group(1)): yield 1 / float(m.group(1)), 'x', True


def candidates(texts, kind: str, bare: str = 'decimal') -> list[float]:
    "The values of `kind` (in its base unit) that `texts` print: numbers with that unit, or bare ones (`bare`: 'all', 'decimal' or 'none')."
    out = []
    for t in texts:
        for v, u, dec in _numbers(t):
            ok_bare = not u and (bare == 'all' or bare == 'decimal' and dec)
            if kind == 'percent':
                if u == '%': out.append(v)
                elif ok_bare and 0 <= v <= 1 and dec: out.append(100 * v)
                elif ok_bare and bare == 'all': out.append(v)
            elif kind == 'seconds':
                f = {'ms': 1e-3, 'µs': 1e-6, 'min': 60, 'minute': 60, 'minutes': 60}.get(u)
                if f: out.append(v * f)
                elif u in ('s', 'second', 'seconds') or ok_bare: out.append(v)
            elif kind == 'bytes':
                if u in ('MB', 'GB', 'kB'): out.append(v * {'GB': 1e3, 'kB': 1e-3}.get(u, 1))
                elif ok_bare: out.append(v)
            elif kind == 'times':
                if u in ('x', '×', 'times') or ok_bare and bare == 'all': out.append(v)
            elif kind == 'pixels':
                if u in ('px', 'pixel', 'pixels') or ok_bare or not u and not dec: out.append(v)
            elif kind == 'steps':
                if not u or u == 'steps': out.append(v)
    return out


def _json_values(obj, out, key=''):
    "Every number in a result file as 'key: value' (so that a ratio is known by its key), and its strings."
    if isinstance(obj, bool) or obj is None: return out
    if isinstance(obj, (int, float)): out.append(f"{key}: {obj!r};")
    elif isinstance(obj, dict):
        for k, v in obj.items(): _json_values(v, out, str(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj: _json_values(v, out, key)
    elif isinstance(obj, str): out.append(obj)
    return out


def cited_results(texts) -> list[Path]:
    "The bench result files that `texts` cite by name (`bench/results/NAME.json` or `bench/bench_NAME.py`)."
    out = []
    for t in texts:
        for m in CITE.finditer(t):
            p = RESULTS / (m.group(1) or f"{m.group(2)}.json")
            if p.exists() and p not in out: out.append(p)
    return out


def outputs_of(cell) -> list[str]:
    "The text a code cell printed or displayed (Markdown and plain-text outputs, streams)."
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': out.append(''.join(o.get('text', '')))
        for k in ('text/markdown', 'text/plain', 'text/html'):
            if k in o.get('data', {}) and not (k == 'text/plain' and 'image/png' in o['data']):
                out.append(''.join(o['data'][k]))
    return out


@dataclass
class Evidence:
    "What backs figures in one notebook: printed texts, code (settings) and cited bench results."
    printed: list
    code: list
    bench: list

    def values(self, kind: str) -> list[float]:
        "Printed values of `kind`, cited bench results, and (for settings) numbers written in code."
        v = candidates(self.printed, kind) + candidates(self.bench, kind, bare={'times': 'none', 'percent': 'decimal'}.get(kind, 'all'))
        if kind != 'times': v += candidates(self.code, kind, bare='all' if kind in ('steps', 'pixels', 'seconds') else 'decimal')
        return v


def evidence(nb: dict) -> Evidence:
    "The printed outputs, code cells and cited bench results of a notebook."
    cells = nb['cells']
    printed = [t for c in cells if c['cell_type'] == 'code' for t in outputs_of(c)]
    code = [''.join(c['source']) for c in cells if c['cell_type'] == 'code']
    bench = [' '.join(_json_values(json.loads(p.read_text()), [])) for p in
             cited_results([''.join(c['source']) for c in cells] + printed)]
    return Evidence(printed, code, bench)


def check(figures: list[Figure], ev: Evidence) -> list[Finding]:
    "The figures that no value in `ev` backs, each with the nearest values of its kind."
    out, cache = [], {}
    for f in figures:
        if f.kind == 'comparison': out.append(Finding(f)); continue
        vals = cache.setdefault(f.kind, ev.values(f.kind))
        if any(f.holds(v) for v in vals): continue
        near = sorted(set(vals), key=lambda v: abs(v - f.value))[:4]
        out.append(Finding(f, near))
    return out


def check_notebook(path: Path, nb: dict | None = None) -> list[Finding]:
    "The figures in a notebook's markdown that its outputs, code and cited bench results do not back."
    nb = nb or json.loads(Path(path).read_text())
    figs = [f for i, c in enumerate(nb['cells']) if c['cell_type'] == 'markdown'
            for f in figures_in(''.join(c['source']), f"{Path(path).name} cell {i}")]
    return check(figs, evidence(nb))


def readme_captions(readme: str) -> dict[str, list[tuple[int, str]]]:
    "The README's text about each lesson: {notebook stem: [(line, paragraph or picture caption)]}."
    out, lines = {}, readme.splitlines()
    para, start = [], 0
    for i, line in enumerate(lines + [''], 1):
        if line.strip(): para.append(line); start = start or i; continue
        text = '\n'.join(para)
        m = re.match(r'\*\*Lesson (\d+)', text) or re.match(r'!\[Lesson (\d+)', text)
        if m:
            stems = [p.stem for p in NBS.glob(f"{int(m.group(1)):02d}_*.ipynb")]
            if stems: out.setdefault(stems[0], []).append((start, text))
        para, start = [], 0
    return out


def comparisons_without_figures(src: str, where: str) -> list[Figure]:
    "Comparisons ('more often than', 'faster than') in sentences that state no percentage, ratio or time."
    text, out = prose(src), []
    for m in COMPARE.finditer(text):
        sentence = _sentence(text, m.start(), m.end())
        if not [f for f in figures_in(sentence, where) if f.kind in ('percent', 'times', 'seconds')]:
            out.append(Figure(where, m.group(0), 'comparison', 0, 0, context=sentence))
    return out


def check_readme(path: Path = ROOT / 'README.md') -> list[Finding]:
    "The README's lesson captions, each checked against its lesson's outputs (and comparisons that state no figure)."
    out = []
    for stem, paras in readme_captions(Path(path).read_text()).items():
        nb = json.loads((NBS / f"{stem}.ipynb").read_text())
        figs = []
        for line, text in paras:
            where = f"{Path(path).name} line {line} ({stem})"
            found = figures_in(text, where)
            figs += found
            figs += comparisons_without_figures(text, where)
        out += check(figs, evidence(nb))
    return out


def checked_notebooks() -> list[Path]:
    "Every lesson (nbs/0[1-9]_*.ipynb), library notebook (nbs/00x_lib_*.ipynb) and tool (nbs/1[0-9]_tool_*.ipynb)."
    return sorted(p for p in NBS.glob('*.ipynb') if re.match(r'(0[1-9]|1\d)_|00[a-z]_lib_', p.name))


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or checked_notebooks()
    findings = [f for p in paths for f in check_notebook(p)] + ([] if args else check_readme())
    for f in findings: print(f)
    print(f"{len(findings)} figure(s) in prose not backed by a printed value, a setting or a cited bench result")
    return 1 if findings else 0


if __name__ == '__main__': sys.exit(main())
