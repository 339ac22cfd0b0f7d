"""Which model a bench result was measured on: the fingerprints every file in bench/results/ records.

A result records `model`, the fingerprint of the embedded model's UNet weights (`sd_intro.finetune.model_fingerprint`),
`judge`, that of the judge shipped when it was measured (`judge_fingerprint`; results from before session 12 lack it),
and, when it measured the shipped LCM-LoRA, `lora`, the fingerprint of its weights (`lora_fingerprint`). A lesson or
README that cites a result whose fingerprints are not the shipped model's fails `tests/test_bench_results.py`:
re-run the bench script after retraining. Results of other models say so: `model` is then a name such as
'sd15-random' (Stable Diffusion 1.5's architecture with random weights) or 'unknown' (measured before results
recorded their model).
"""
from __future__ import annotations
import hashlib, json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'bench' / 'results'
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
OTHER_MODELS = {'sd15-random': "Stable Diffusion 1.5's architecture with random weights (no download)",
                'unknown': 'not recorded: measured before bench results recorded their model'}


def file_fingerprint(path: str | os.PathLike) -> str:
    "A short hash of a file's bytes ('unknown' if it is missing)."
    path = Path(path)
    if not path.is_file(): return 'unknown'
    h = hashlib.sha256()
    with open(path, 'rb') as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b''): h.update(chunk)
    return h.hexdigest()[:12]


def lora_fingerprint(folder: str | os.PathLike | None = None) -> str:
    "A short hash of a LoRA folder's weights (default: the shipped LCM-LoRA), to tell which LoRA figures belong to."
    from sd_intro.distill import LCM_LORA
    return file_fingerprint(Path(folder or LCM_LORA) / 'pytorch_lora_weights.safetensors')


def judge_fingerprint() -> str:
    "A short hash of the shipped judge's weights: judged figures (adherence, creature verdicts) belong to one judge."
    from sd_intro.shapes import JUDGE_PATH
    return file_fingerprint(JUDGE_PATH)


def shipped() -> dict:
    "The fingerprints of what ships: {'model': the embedded UNet's, 'lora': the LCM-LoRA's, 'judge': the judge's}."
    from sd_intro.finetune import model_fingerprint
    return dict(model=model_fingerprint(), lora=lora_fingerprint(), judge=judge_fingerprint())


def stamp(result: dict, model=None, lora=None) -> dict:
    "`result` with the fingerprints of the model (a folder, default the embedded one), the shipped judge and the LoRA folder it measured, first."
    from sd_intro.finetune import model_fingerprint
    out = dict(model=model_fingerprint(model), judge=judge_fingerprint())
    if lora is not None: out['lora'] = lora_fingerprint(lora)
    return {**out, **{k: v for k, v in result.items() if k not in out}}


def results() -> dict[str, dict]:
    "Every result file in bench/results/: {name: its figures}."
    return {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob('*.json'))}


def stale(result: dict, now: dict | None = None) -> list[str]:
    "Why `result` is not of the shipped model and LoRA (empty if it is, or if it measured another model on purpose)."
    now = now or shipped()
    model = result.get('model')
    if model in OTHER_MODELS and model != 'unknown': return []
    out = []
    if model != now['model']: out.append(f"model {model} (shipped: {now['model']})")
    if 'lora' in result and result['lora'] != now['lora']: out.append(f"LoRA {result['lora']} (shipped: {now['lora']})")
    if 'judge' in result and result['judge'] != now['judge']: out.append(f"judge {result['judge']} (shipped: {now['judge']})")
    return out


def write_json(path: str | os.PathLike, result: dict):
    "Write a result file (whole or not at all: a temporary file renamed into place)."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(result, indent=1, default=str) + '\n')
    tmp.replace(path)
    print(f"wrote {path}")
