"""Quality and speed of the embedded model, measured by the judge and the clock in one run (issue: shapes world).

Prints: adherence at guidance 7.5 on 256 images (64 fixed prompts x 4 seeds, 64x64, 30 steps); the curve over guidance
1, 1.5, 3, 7.5, 14; the negative-prompt effect; and medians of load / one image / the seed's 4x4 grid on this machine.
Usage: python bench/bench_embedded.py [--model FOLDER] [--json OUT.json]
"""
import argparse, json, os, platform, time
import torch
from sd_intro.core import load_pipeline, EMBEDDED_MODEL
from sd_intro.embedded import judged_quality, guidance_curve, negative_prompt_effect, speed_report

TARGETS = dict(colour=0.90, shape=0.85, background=0.90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default=EMBEDDED_MODEL)
    ap.add_argument('--json', default=None, help='also write the figures here')
    ap.add_argument('--skip-speed', action='store_true')
    ap.add_argument('--device', default='cpu', help="'cuda' to judge a model quickly on a GPU (speed is measured on the CPU)")
    a = ap.parse_args()
    pipe = load_pipeline(a.model, device=a.device, dtype=torch.float32)
    out = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    t = time.time()
    q = judged_quality(pipe)
    out['quality'] = q
    print(f"\nJudged adherence, 256 images (64 prompts x 4 seeds), 30 steps, guidance 7.5  [{time.time() - t:.0f}s]")
    print(f"{'attribute':<12}{'adherence':>10}{'target':>8}  ok")
    for k, target in TARGETS.items():
        print(f"{k:<12}{q[k]:>10.1%}{target:>8.0%}  {'yes' if q[k] >= target else 'NO'}")

    curve = guidance_curve(pipe)
    out['guidance_curve'] = {str(g): v for g, v in curve.items()}
    print("\nAdherence against guidance scale (256 images each)")
    print(f"{'guidance':<10}" + ''.join(f"{k:>12}" for k in TARGETS))
    for g, v in curve.items(): print(f"{g:<10}" + ''.join(f"{v[k]:>12.1%}" for k in TARGETS))

    neg = negative_prompt_effect(pipe)
    out['negative_prompt'] = neg
    print("\nShapes of a colour on prompts that name no colour (64 images each), without and with it as negative prompt")
    print(f"{'colour':<10}{'without':>10}{'with':>8}  ok (<= 5%)")
    for c, (wo, w) in neg.items(): print(f"{c:<10}{wo:>10.1%}{w:>8.1%}  {'yes' if w <= 0.05 else 'NO'}")

    if not a.skip_speed:
        sp = speed_report(a.model)
        out['speed'] = sp
        print(f"\nSpeed on this machine ({out['machine']}), medians of 5 runs")
        for k, target in dict(load=1.0, one_image_30_steps=0.5, grid_16_images_50_steps=6.0).items():
            print(f"{k:<26}{sp[k]:>8.2f} s   target <= {target} s  {'yes' if sp[k] <= target else 'NO'}")
    if a.json: open(a.json, 'w').write(json.dumps(out, indent=1))


if __name__ == '__main__': main()
