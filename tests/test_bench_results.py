"""Bench results carry the model they were measured on, lessons cite only results of the shipped model, and
bench/RESULTS.md is made from the result files (`python bench/results_md.py`), never typed."""
import json, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench')); sys.path.insert(0, str(ROOT / 'tools'))
import provenance, results_md, claims  # noqa: E402

RESULTS = sorted(provenance.RESULTS.glob('*.json'))
NOW = provenance.shipped()


@pytest.mark.parametrize('path', RESULTS, ids=lambda p: p.stem)
def test_every_result_records_its_model(path):
    r = json.loads(path.read_text())
    model = r.get('model')
    assert isinstance(model, str) and (len(model) == 12 or model in provenance.OTHER_MODELS), \
        f"{path.name} does not say which model it measured: its bench script must write `model` (bench/provenance.py stamp)"
    if 'distill' in r: assert 'lora' in r, f"{path.name} measured an LCM-LoRA but does not record its fingerprint"


def test_fingerprints_tell_models_apart(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    for d, data in ((a, b'one'), (b, b'two')):
        d.mkdir(); (d / 'pytorch_lora_weights.safetensors').write_bytes(data)
    assert provenance.lora_fingerprint(a) != provenance.lora_fingerprint(b)
    assert provenance.lora_fingerprint(a) == provenance.file_fingerprint(a / 'pytorch_lora_weights.safetensors')
    assert provenance.lora_fingerprint(tmp_path) == 'unknown'
    assert len(NOW['model']) == 12 and len(NOW['lora']) == 12 and len(NOW['judge']) == 12


def test_stale_results_are_told_apart():
    assert provenance.stale(dict(model=NOW['model']), NOW) == []
    assert provenance.stale(dict(model=NOW['model'], lora=NOW['lora']), NOW) == []
    assert provenance.stale(dict(model='000000000000'), NOW)
    assert provenance.stale(dict(model=NOW['model'], lora='000000000000'), NOW)
    assert provenance.stale(dict(model='unknown'), NOW)
    assert provenance.stale(dict(model='sd15-random'), NOW) == []   # another model, on purpose
    assert provenance.stale(dict(model=NOW['model'], judge='000000000000'), NOW)   # judged by another judge
    assert provenance.stale(dict(model=NOW['model'], judge=NOW['judge']), NOW) == []
    assert provenance.stamp(dict(x=1))['model'] == NOW['model'] and provenance.stamp(dict(x=1))['judge'] == NOW['judge']


def citers():
    "Every lesson, appendix, the home page and the README: (name, the texts that may cite a result)."
    out = []
    for nb in claims.checked_notebooks() + [ROOT / 'nbs' / 'index.ipynb']:
        cells = json.loads(nb.read_text())['cells']
        out.append((nb.name, [''.join(c['source']) for c in cells] +
                    [t for c in cells if c['cell_type'] == 'code' for t in claims.outputs_of(c)]))
    out.append(('README.md', [(ROOT / 'README.md').read_text()]))
    return out


@pytest.mark.parametrize('name,texts', citers(), ids=lambda x: x if isinstance(x, str) else '')
def test_cited_results_are_of_the_shipped_model(name, texts):
    bad = {p.name: provenance.stale(json.loads(p.read_text()), NOW) for p in claims.cited_results(texts)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{name} cites results measured on another model: {bad}; re-run their bench scripts"


def test_results_md_is_made_from_the_files():
    assert (ROOT / 'bench' / 'RESULTS.md').read_text() == results_md.render_md(NOW), \
        "bench/RESULTS.md is not what the result files say: run `python bench/results_md.py` (never edit it by hand)"


def test_results_md_says_when_a_result_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, 'RESULTS', tmp_path)
    monkeypatch.setattr(results_md, 'results', lambda: {'inversion.json': dict(json.loads((ROOT / 'bench' / 'results' / 'inversion.json').read_text()), model='000000000000')})
    text = results_md.render_md(NOW)
    assert '**not the shipped model**' in text and 'bench_inversion.py' in text


def test_every_bench_script_that_writes_results_records_the_model():
    for script in sorted((ROOT / 'bench').glob('bench_*.py')):
        src = script.read_text()
        if '.json' in src:
            assert 'stamp(' in src or 'model_fingerprint()' in src, \
                f"{script.name} writes results without the model's fingerprint: use provenance.stamp"
