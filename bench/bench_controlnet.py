"""ControlNet (lesson 8): the shipped shapes-world ControlNet measured on held-out controls.

Measures, on held-out silhouettes, outlines and scribbles (`heldout_controls`: scenes no training batch draws) with the
prompts of their colours and shapes, one seed each (seeds 1000+, never a training seed):
  IoU table      the base model (no ControlNet: where the seed alone puts the object) and the ControlNet at
                 controlnet_conditioning_scale 0 to 1.5: mean IoU of object and control, share of pictures with
                 IoU >= 0.8, the judge's colour, shape and background adherence
                 targets: IoU >= 0.8 at scale 1.0 on silhouettes; colour and background adherence >= 90%
  by kind        IoU at scale 1.0 for each control kind
  conflict       a star's outline with the prompt "a ... circle": the judge's shape at each scale
  VAE ceiling    the held-out scenes rendered exactly and sent through the VAE and back: the IoU the decoder itself
                 allows (no ControlNet's pictures can be much sharper than the decoder draws)
  IoU by step    with the weights of each snapshot of a training run (--run FOLDER, from its snapshots/)
Writes bench/results/controlnet.json with the fingerprints of the embedded model and the ControlNet.

    python bench/bench_controlnet.py [--threads 2] [--n 64] [--steps 20] [--run RUN_FOLDER] [--quick]
"""
import argparse, hashlib, json, os, platform, sys, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / 'bench' / 'results' / 'controlnet.json'
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


CARD = """---
library_name: diffusers
tags: [controlnet, stable-diffusion, sd_intro, shapes-world]
base_model: sd_intro embedded model (sd_intro/models/shapes-sd)
---
# shapes-controlnet

A ControlNet for the embedded model of the [sd_intro](https://github.com/sd-intro/sd_intro) course (a 64x64 Stable
Diffusion pipeline of a world of coloured shapes, 8x8x4 latents). It reads a control picture, white on black at
64x64: the object filled in (silhouette), its outline, or a hand-drawn scribble, and puts the prompt's shape there.
Lesson 8 (`nbs/08_controlnet.ipynb`) trains it, explains it and measures it.

- Made with `ControlNetModel.from_unet` from the embedded model's UNet (UNet fingerprint `{fingerprint}`), control
  encoder channels {channels} (three halvings: 64 px controls to the 8x8 latents).
- Trained by `python -m sd_intro.controlnet --out runs/controlnet --threads {threads} {flags}`
  ({steps} steps of {batch_size} fresh shapes-world scenes, each with a silhouette, outline or scribble and a caption;
  AdamW, lr {lr}, constant after {warmup} warm-up steps) in {minutes:.0f} minutes on {device} ({threads} torch
  thread(s); {load}).
- Its run's validation IoU (8 held-out silhouettes, 20 steps, scale 1.0) by step, and its losses, are in `training.json`.
- Measured by `bench/bench_controlnet.py` (bench/results/controlnet.json).

Plain diffusers, no sd_intro needed:

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
cn = ControlNetModel.from_pretrained('path/to/shapes-controlnet')
pipe = StableDiffusionControlNetPipeline.from_pretrained('path/to/shapes-sd', controlnet=cn, safety_checker=None)
image = pipe('a red star on a blue background', image=control_64x64_rgb, num_inference_steps=20).images[0]
```

Licence: as the course (Apache 2.0). Everything it was trained on is drawn by the course's own code.
"""


def ship(src: Path, load: str):
    "Put a run's ControlNet (its finished result, or a snapshot: the same as a run of that many steps) into the package."
    import shutil
    from safetensors.torch import load_file
    from sd_intro.core import atomic_dir, load_pipeline, EMBEDDED_MODEL
    from sd_intro.controlnet import CONTROLNET_MODEL, make_controlnet
    from sd_intro.finetune import model_fingerprint
    run = src.parent.parent if src.suffix == '.safetensors' else src
    settings = json.loads((run / 'run.json').read_text())
    ck = json.loads(sorted((run / 'checkpoints').glob('step-*/state.json'))[-1].read_text()) if (run / 'checkpoints').is_dir() else {}
    hist = json.loads((run / 'history.json').read_text()) if (run / 'history.json').exists() else \
        dict(losses=ck.get('losses', []), validation_iou=ck.get('history', {}))
    if src.suffix == '.safetensors':
        steps = int(src.stem[5:])
        cn = make_controlnet(load_pipeline(EMBEDDED_MODEL).unet, settings['conditioning_channels'],
                             zero_embedding_out=settings.get('zero_embedding_out', True))
        cn.load_state_dict(load_file(str(src)))
        hist = dict(losses=hist['losses'][:steps], validation_iou={k: v for k, v in hist['validation_iou'].items() if int(k) <= steps})
        settings['steps'] = steps
    else:
        from diffusers import ControlNetModel
        cn, steps = ControlNetModel.from_pretrained(run / 'controlnet'), settings['steps']
    assert settings['fingerprint'] == model_fingerprint(), 'the run trained on another embedded model'
    seconds = hist.get('seconds') or float(os.environ.get('CONTROLNET_SECONDS', 'nan'))
    record = dict(settings={k: settings[k] for k in ('steps', 'batch_size', 'lr', 'warmup_steps', 'weight_decay', 'max_grad_norm',
                                                     'snr_gamma', 'kinds', 'conditioning_channels', 'zero_embedding_out', 'seed')
                            if k in settings},
                  model_fingerprint=settings['fingerprint'], seconds=seconds, device='cpu',
                  torch_threads=int(os.environ.get('CONTROLNET_THREADS', 1)), load=load,
                  validation_iou=hist['validation_iou'], losses=[round(l, 6) for l in hist['losses']])
    defaults = dict(steps=2000, batch_size=16, lr=1e-3)
    flags = ' '.join(f"--{k} {settings[k]}" for k in ('steps', 'batch_size', 'lr'))   # (call_parse's option names)
    if not settings.get('zero_embedding_out', True): flags += ' --no-zero_embedding_out'
    with atomic_dir(CONTROLNET_MODEL) as tmp:
        cn.save_pretrained(tmp, safe_serialization=True)
        cfg = json.loads((tmp / 'config.json').read_text()); cfg.pop('_name_or_path', None)   # no machine path in the package
        (tmp / 'config.json').write_text(json.dumps(cfg, indent=2, sort_keys=True) + '\n')
        (tmp / 'training.json').write_text(json.dumps(record, indent=1))
        (tmp / 'README.md').write_text(CARD.format(fingerprint=settings['fingerprint'], channels=tuple(settings['conditioning_channels']),
                                                   flags=flags, steps=steps, batch_size=settings['batch_size'], lr=settings['lr'],
                                                   warmup=settings['warmup_steps'], minutes=seconds / 60, device='a CPU',
                                                   threads=record['torch_threads'], load=load or 'load not recorded'))
    print('shipped', src, '->', CONTROLNET_MODEL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--n', type=int, default=64, help='held-out controls per measure')
    ap.add_argument('--steps', type=int, default=20, help='sampler steps (DDIM)')
    ap.add_argument('--run', default=None, help='a training run folder: measure IoU against steps from its snapshots/')
    ap.add_argument('--every', type=int, default=1, help='with --run: every this many snapshots')
    ap.add_argument('--quick', action='store_true', help='8 controls, scales 0/1/1.5 (a smoke test, not the figures)')
    ap.add_argument('--json', default=str(RESULTS))
    ap.add_argument('--ship', default=None, help='a finished run folder (or one of its snapshots/step-N.safetensors): put it '
                                                  'into the package as the shipped ControlNet, with its record and model card, then measure')
    ap.add_argument('--load', default='', help='with --ship: the machine load the run had, for its record')
    a = ap.parse_args()
    if a.ship: ship(Path(a.ship), a.load)
    torch.set_num_threads(a.threads)
    warnings.simplefilter('ignore')
    from sd_intro.core import load_pipeline, EMBEDDED_MODEL
    from sd_intro.finetune import model_fingerprint
    from sd_intro.controlnet import CONTROLNET_MODEL, controlnet_pipeline
    from sd_intro.controls import (CONTROL_KINDS, control_scores, conflict, heldout_controls, iou_by_step, scale_sweep,
                                   snapshot_steps)
    n, scales = (8, (0.0, 1.0, 1.5)) if a.quick else (a.n, SCALES)
    weights = Path(CONTROLNET_MODEL) / 'diffusion_pytorch_model.safetensors'
    from provenance import stamp   # `model`: the fingerprint of the embedded model measured (bench/provenance.py)
    res = stamp(dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", threads=a.threads,
               controlnet_fingerprint=hashlib.sha256(weights.read_bytes()).hexdigest()[:12],
               n=n, sampler_steps=a.steps, guidance_scale=7.5,
               controlnet_mb=round(sum(f.stat().st_size for f in Path(CONTROLNET_MODEL).iterdir()) / 2 ** 20, 2)))
    record = json.loads((Path(CONTROLNET_MODEL) / 'training.json').read_text())
    assert record['model_fingerprint'] == res['model'], "the shipped ControlNet belongs to another embedded model"
    res['training'] = {k: record[k] for k in ('settings', 'seconds', 'device', 'torch_threads', 'load') if k in record}
    pipe = load_pipeline(EMBEDDED_MODEL)
    cpipe = controlnet_pipeline(pipe)
    t0 = time.time()
    scenes, controls, prompts = heldout_controls(n, 'silhouette')
    base = control_scores(pipe, controls, prompts, num_inference_steps=a.steps)
    sweep = scale_sweep(cpipe, controls, prompts, scales, num_inference_steps=a.steps)
    rows = [base.row()] + [s.row() for s in sweep.values()]
    res['silhouette'] = rows
    # What the decoder can draw at all: each held-out scene rendered exactly as its control asks, through the VAE and
    # back. No ControlNet can beat this by much: its pictures come out of the same decoder.
    from sd_intro.shapes import render, to_pil
    from sd_intro.inpainting import vae_round_trip
    from sd_intro.controls import control_iou
    ceil = np.array(control_iou([vae_round_trip(pipe, to_pil(render(s))) for s in scenes], controls, prompts))
    styles = sorted({s.style for s in scenes})
    res['vae_ceiling'] = dict(iou=round(float(ceil.mean()), 3), iou_08=round(float((ceil >= 0.8).mean()), 3),
                              by_style={k: round(float(ceil[[s.style == k for s in scenes]].mean()), 3) for k in styles})
    print(f"\n{n} held-out silhouettes, {a.steps} DDIM steps, guidance 7.5, one seed each\n")
    print('| scale | mean IoU | IoU >= 0.8 | colour | shape | background |\n|---|---|---|---|---|---|')
    for r in rows: print(f"| {r['scale']} | {r['iou']:.3f} | {r['iou_08']:.0%} | {r['colour']:.0%} | {r['shape']:.0%} | {r['background']:.0%} |")
    v = res['vae_ceiling']
    print(f"\nthe scenes themselves through the VAE (the decoder's ceiling): IoU {v['iou']:.3f}, >= 0.8 on {v['iou_08']:.0%}; by style {v['by_style']}")
    res['by_kind'] = {}
    for kind in CONTROL_KINDS:
        _, cs, ps = heldout_controls(n, kind, seed=1)
        res['by_kind'][kind] = dict(controlnet=control_scores(cpipe, cs, ps, 1.0, num_inference_steps=a.steps).row(),
                                    base=control_scores(pipe, cs, ps, num_inference_steps=a.steps).row())
    print('\n| control kind | IoU, scale 1.0 | IoU, no ControlNet | colour | background |\n|---|---|---|---|---|')
    for k, r in res['by_kind'].items():
        print(f"| {k} | {r['controlnet']['iou']:.3f} | {r['base']['iou']:.3f} | {r['controlnet']['colour']:.0%} | {r['controlnet']['background']:.0%} |")
    fight = conflict(cpipe, 'star', 'circle', scales, n=min(n, 32), num_inference_steps=a.steps)
    res['conflict'] = {str(s): {k: v for k, v in r.items() if k not in ('images', 'controls')} for s, r in fight.items()}
    print('\nstar outline, prompt "a ... circle":\n\n| scale | read as star | read as circle | IoU with the star |\n|---|---|---|---|')
    for s, r in fight.items(): print(f"| {s} | {r['star']:.0%} | {r['circle']:.0%} | {r['iou']:.3f} |")
    if a.run:
        steps = snapshot_steps(a.run)[::a.every]
        curve = iou_by_step(controlnet_pipeline(pipe, controlnet_pipeline(pipe).controlnet), a.run, controls[:32], prompts[:32],
                            steps, num_inference_steps=a.steps)
        res['iou_by_step'] = {str(k): round(v, 4) for k, v in curve.items()}
        print('\nIoU at scale 1.0 by training step (32 held-out silhouettes):', res['iou_by_step'])
    res['seconds'] = round(time.time() - t0, 1)
    at1 = sweep[1.0]
    res['targets'] = dict(iou_at_1=at1.mean_iou >= 0.8, adherence=min(at1.adherence['colour'], at1.adherence['background']) >= 0.9)
    print('\ntargets met:', res['targets'])
    if a.json and not a.quick:
        Path(a.json).write_text(json.dumps(res, indent=1))
        print('wrote', a.json)


if __name__ == '__main__': main()
