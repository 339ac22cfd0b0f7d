"""Quality and speed of the embedded model, measured by the judge and the clock in one run (issue: shapes world 2).

Prints, each row against its target: adherence at guidance 7.5 on 256 images (64 fixed prompts x 4 seeds, 64x64,
30 steps), shape for each base shape separately; size and place words on 128 images of prompts that name them; the
curve over guidance 1, 1.5, 3, 7.5, 14; how much the seed moves the object (8 full prompts x 8 seeds: mean pairwise
IoU of the objects' masks and the spread of their centres); the negative-prompt effect; and medians of load / one
image / the seed's 4x4 grid on this machine.
Usage: python bench/bench_embedded.py [--model FOLDER] [--json OUT.json] [--skip-speed] [--quick]
"""
import argparse, json, os, platform, time
import torch
from sd_intro.core import load_pipeline, EMBEDDED_MODEL
from sd_intro.shapes import BASE_SHAPES
from sd_intro.embedded import (judged_quality, guidance_curve, negative_prompt_effect, speed_report,
                               size_position_quality, seed_diversity)

TARGETS = dict(colour=0.90, **{f"shape: {s}": 0.90 for s in BASE_SHAPES}, background=0.90)
WORD_TARGETS = dict(size=0.80, position=0.80)
SPEED_TARGETS = dict(load=1.0, one_image_30_steps=0.5, grid_16_images_50_steps=6.0)


def row(name, value, target, better='>='):
    ok = value >= target if better == '>=' else value <= target
    fmt = (lambda v: f"{v:.1%}") if target <= 1 and better == '>=' and name not in ('centre_std_px',) else (lambda v: f"{v:.2f}")
    print(f"{name:<26}{fmt(value):>10}  {better} {fmt(target):<8} {'yes' if ok else 'NO'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default=EMBEDDED_MODEL)
    ap.add_argument('--json', default=None, help='also write the figures here (bench/results/embedded.json is the shipped model\'s)')
    ap.add_argument('--skip-speed', action='store_true')
    ap.add_argument('--quick', action='store_true', help='the 7.5 table, words and seed spread only (no guidance curve)')
    ap.add_argument('--device', default='cpu', help="'cuda' to judge a model quickly on a GPU (speed is measured on the CPU)")
    a = ap.parse_args()
    pipe = load_pipeline(a.model, device=a.device, dtype=torch.float32)
    from provenance import stamp
    out = stamp(dict(date=time.strftime('%Y-%m-%d')), model=a.model)
    out.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    ok = []
    t = time.time()
    q = judged_quality(pipe)
    out['quality'] = q
    print(f"\nJudged adherence, 256 images (64 prompts x 4 seeds), 30 steps, guidance 7.5  [{time.time() - t:.0f}s]")
    for k, target in TARGETS.items(): ok.append(row(k, q[k], target))
    t = time.time()
    w = size_position_quality(pipe)
    out['size_position'] = w
    print(f"\nPrompts that name a size or a place, 128 images (64 prompts x 2 seeds)  [{time.time() - t:.0f}s]")
    for k, target in WORD_TARGETS.items(): ok.append(row(k, w[k], target))
    t = time.time()
    d = seed_diversity(pipe)
    out['seed_diversity'] = d
    print(f"\nWhat the seed decides: 8 full prompts without size or place words x 8 seeds  [{time.time() - t:.0f}s]")
    ok.append(row('mean_iou', d['mean_iou'], 0.30, '<='))
    ok.append(row('centre_std_px', d['centre_std_px'], 10.0))
    print(f"{'mean object area':<26}{d['mean_area']:>10.1%}")

    if not a.quick:
        curve = guidance_curve(pipe)
        out['guidance_curve'] = {str(g): v for g, v in curve.items()}
        print("\nAdherence against guidance scale (256 images each)")
        keys = ('colour', 'shape', 'background')
        print(f"{'guidance':<10}" + ''.join(f"{k:>12}" for k in keys) + f"{'mean':>10}")
        for g, v in curve.items():
            print(f"{g:<10}" + ''.join(f"{v[k]:>12.1%}" for k in keys) + f"{sum(v[k] for k in keys) / 3:>10.1%}")
        m = {g: sum(v[k] for k in keys) / 3 for g, v in curve.items()}
        lower = m[1] <= m[7.5] - 0.10
        print(f"adherence clearly lower at guidance 1 (>= 10 points under 7.5): {'yes' if lower else 'NO'}")
        ok.append(lower)

        neg = negative_prompt_effect(pipe)
        out['negative_prompt'] = neg
        print("\nShapes of a colour on prompts that name no colour (64 images each), without and with it as negative prompt")
        print(f"{'colour':<10}{'without':>10}{'with':>8}")
        for c, (wo, wi) in neg.items(): print(f"{c:<10}{wo:>10.1%}{wi:>8.1%}")

    if not a.skip_speed:
        sp = speed_report(a.model)
        out['speed'] = sp
        print(f"\nSpeed on this machine ({out['machine']}), medians of 5 runs")
        for k, target in SPEED_TARGETS.items():
            print(f"{k:<26}{sp[k]:>8.2f} s   target <= {target} s  {'yes' if sp[k] <= target else 'NO'}")
            ok.append(sp[k] <= target)
    size_mb = sum(f.stat().st_size for f in __import__('pathlib').Path(a.model).rglob('*') if f.is_file()) / 1e6
    out['model_mb'] = size_mb
    print(f"\nmodel folder {size_mb:.1f} MB (target <= 20 MB): {'yes' if size_mb <= 20 else 'NO'}")
    ok.append(size_mb <= 20)
    print(f"\nall targets met: {'yes' if all(ok) else 'NO'}")
    if a.json: open(a.json, 'w').write(json.dumps(out, indent=1))


if __name__ == '__main__': main()
