"""Calibrate the shipped judge on the pictures it reads: VAE round trips and generated pictures (issue 27, point 2).

The judge (sd_intro/assets/judge.safetensors) learnt from clean renders. This tunes it with
`sd_intro.shapes.calibrate_judge` on (a) rendered pictures, (b) their VAE round trips, where a creature that lost its
ears is no longer a creature, and (c) pictures drawn by the embedded model and by the shipped creature LoRA
(sd_intro/models/shapes-creature-lora), labelled creature or not by the outline (`shows_ears`). It then measures on
pictures from other prompts and seeds: agreement of the judge's creature verdict with the outline (target >= 90%),
and accuracy on 1000 held-out clean renders (target >= 98% for every attribute), before and after; writes the judge
only if both hold (atomically), and the figures to bench/results/judge.json.

`--creature-row` tunes only the creature row of the shape head (weights and bias: 129 numbers) on the judge's frozen
features (`sd_intro.shapes.refit_creature_row`), so no other verdict can move but "creature or not"; its settings (weight of the clean renders, steps) are
chosen by 3-fold cross-validation on the tuning pictures and a clean validation set of its own, never on the held-out
pictures. With the first 432 tuning pictures (session 11): 98.3% clean, 89.8% agreement (one picture short of 90%); with
12 more batches of 432 from other seeds (`--more 12`, the default: 5616 in all, session 12): 98.5% clean, 90.7% agreement: written.

    python tools/calibrate_judge.py --creature-row --more 12 [--pool FILE] [--dry-run] [--threads 1]
"""
import argparse, json, os, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
import numpy as np, torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def prompts(n, seed, large):
    from sd_intro.creatures import creature_prompts
    ps = creature_prompts(n, seed=seed)
    return [p.replace('a ', 'a large ', 1).replace('an ', 'a large ', 1) if large and i % 2 else p for i, p in enumerate(ps)]


BATCH = 192   # `--more`'s batches: pool(..., BATCH) each


def pool_size(n):
    "How many pictures `pool(..., n)` makes: n // 2 creature and n // 4 base prompts from the base model, n and n // 2 from the LoRA."
    return n // 2 + n // 4 + n + n // 2


def pool(base, lora, seed0, prompt_seed, n):
    "Pictures from both models: creature prompts (with and without 'large') and the base shapes' prompts."
    from sd_intro.core import generate
    from sd_intro.embedded import EVAL_PROMPTS
    out = []
    for pipe, k in ((base, n // 2), (lora, n)):
        ps = prompts(k, prompt_seed, True) + [EVAL_PROMPTS[(prompt_seed + i) % len(EVAL_PROMPTS)] for i in range(k // 2)]
        imgs = generate(pipe, ps, seed=seed0, num_inference_steps=20, guidance_scale=7.5).images
        out += list(zip(imgs, ps)); seed0 += len(ps)
    return out


def clean_accuracy(net):
    from sd_intro.shapes import make_dataset, judge, scene_attributes, ATTRIBUTES, SHAPES
    imgs, scenes, _ = make_dataset(1000, seed=424242, shapes=SHAPES)
    v = judge(imgs, net)
    return {k: float(np.mean([a[k][0] == scene_attributes(s)[k] for a, s in zip(v, scenes)])) for k in ATTRIBUTES}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=400)
    ap.add_argument('--n', type=int, default=192, help='generated pictures per model for tuning (half as many from the base model)')
    ap.add_argument('--more', type=int, default=12, help='batches of tuning pictures to add, 432 each, from other seeds and prompts')
    ap.add_argument('--eval-n', type=int, default=96)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--pool', default=None, help='a file to keep the generated pictures in between runs (made if absent)')
    ap.add_argument('--lr', type=float, default=1e-4)
    ap.add_argument('--base', default=None, help="the judge to start from (default: the shipped one; the shipped judge was refitted "
                    "from the one of commit 785d8f7: `git show 785d8f7:sd_intro/assets/judge.safetensors > base.safetensors`)")
    ap.add_argument('--dry-run', action='store_true', help='measure and tune, but do not write the judge')
    ap.add_argument('--creature-row', action='store_true', help="refit only the shape head's creature row on frozen features")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import save_file
    from sd_intro.core import load_pipeline, load_lora
    from sd_intro.shapes import JUDGE_PATH, JudgeNet, load_judge, calibrate_judge, creature_verdicts, refit_creature_row
    from sd_intro.finetune import model_fingerprint
    lora_dir = ROOT / 'sd_intro' / 'models' / 'shapes-creature-lora'
    base, lora = load_pipeline(), load_lora(load_pipeline(), str(lora_dir))
    t0 = time.time()
    cache = Path(a.pool) if a.pool else None
    if cache and cache.exists():   # pictures as uint8 arrays, prompts as text: nothing pickled
        z = np.load(cache)
        if len(z['tune_prompts']) != pool_size(a.n) + pool_size(BATCH) * a.more: sys.exit(f"{cache} holds {len(z['tune_prompts'])} tuning pictures, not those of --n {a.n} --more {a.more}")
        tune, held = ([(Image.fromarray(i), str(p)) for i, p in zip(z[f'{k}_images'], z[f'{k}_prompts'])] for k in ('tune', 'held'))
    else:
        tune = pool(base, lora, 20000, 11, a.n)
        for k in range(0, BATCH * a.more, BATCH): tune += pool(base, lora, 200000 + 1000 * k, 11 + k, BATCH)
        held = pool(base, lora, 90000, 29, a.eval_n)
        if cache: np.savez(cache, **{f'{k}_{w}': np.stack([np.asarray(i) for i, _ in v]) if w == 'images' else np.array([p for _, p in v])
                                     for k, v in (('tune', tune), ('held', held)) for w in ('images', 'prompts')})
    old = load_judge(a.base)   # (None: the shipped one)
    before = dict(clean=clean_accuracy(old), generated=creature_verdicts([i for i, _ in held], [p for _, p in held], old))
    net = JudgeNet(); net.load_state_dict(old.state_dict())
    net = refit_creature_row(net, tune) if a.creature_row else calibrate_judge(net, tune, vae=base.vae, steps=a.steps, lr=a.lr)
    after = dict(clean=clean_accuracy(net), generated=creature_verdicts([i for i, _ in held], [p for _, p in held], net))
    ok = after['generated']['agree'] >= 0.9 and min(after['clean'].values()) >= 0.98
    r = dict(model=model_fingerprint(), method='creature row' if a.creature_row else 'whole judge', steps=None if a.creature_row else a.steps, lr=None if a.creature_row else a.lr, n_tune=len(tune), n_held_out=len(held), seconds=round(time.time() - t0),
             before=before, after=after, targets_met=ok, written=ok and not a.dry_run)
    print(json.dumps(r, indent=1))
    if ok and not a.dry_run:
        tmp = JUDGE_PATH.with_name(JUDGE_PATH.name + '.tmp')
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp)); os.replace(tmp, JUDGE_PATH)
    out = ROOT / 'bench' / 'results' / 'judge.json'
    out.write_text(json.dumps(r, indent=1) + '\n')
    if not ok: sys.exit("targets not met: the shipped judge is unchanged")


if __name__ == '__main__': main()
