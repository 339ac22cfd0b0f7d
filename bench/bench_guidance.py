"""The notes' guidance grid (4 scales x 4 images) in one batched loop vs four pipeline calls (embedded model).

`guidance_sweep` runs all 16 images through one denoising loop with a guidance scale per sample; the notes call the
pipeline once per scale. Both make the same pixels (checked first). Both sides are timed in turns, alternating which
goes first, after a warm-up, and their medians are compared, so that load from other processes hits both alike.
Target: batched / four calls <= 0.85.

    python bench/bench_guidance.py [--repeats 7] [--steps 30] [--threads N]
"""
import argparse, os, platform, statistics, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import torch
from sd_intro.core import load_pipeline, generate
from sd_intro.guidance import SEED_SCALES, guidance_sweep

PROMPT = 'a red circle on a blue background'
TARGET = 0.85


RESULTS = Path(__file__).resolve().parent / 'results' / 'guidance.json'

def four_calls(pipe, steps, n=4, seed=0):
    "The notes' way: one pipeline call per guidance scale (through `generate`, one CPU generator per image)."
    return [im for g in SEED_SCALES for im in generate(pipe, PROMPT, seed=seed, n=n, guidance_scale=g,
                                                       num_inference_steps=steps).images]


def batched(pipe, steps, n=4, seed=0):
    return guidance_sweep(pipe, PROMPT, SEED_SCALES, n=n, seed=seed, num_inference_steps=steps).images


def timed(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--repeats', type=int, default=7, help='timed runs of each side (interleaved)')
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    ap.add_argument('--json', default=str(RESULTS), help='where to write the figures (bench/RESULTS.md is made from them)')
    args = ap.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    print(f"# guidance grid {len(SEED_SCALES)} scales x 4 images: one batched loop vs {len(SEED_SCALES)} pipeline calls; "
          f"embedded model, {args.steps} steps, {args.repeats} interleaved repeats; device {pipe.device}, "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    a, b = batched(pipe, args.steps), four_calls(pipe, args.steps)      # warm-up, and the pixels must agree
    diff = max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a, b, strict=True))
    assert diff <= 1, f"batched sweep and separate calls differ by {diff}/255"
    times = {'batched': [], 'four_calls': []}
    sides = {'batched': lambda: batched(pipe, args.steps), 'four_calls': lambda: four_calls(pipe, args.steps)}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for k in order: times[k].append(timed(sides[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med['batched'] / med['four_calls']
    # the ratio within each repeat, too: its median is robust to load that changes between repeats
    paired = statistics.median(x / y for x, y in zip(times['batched'], times['four_calls']))
    print()
    print('| side | median s | min s | max s | runs |')
    print('|---|---|---|---|---|')
    for k, v in times.items(): print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {len(v)} |")
    print()
    print(f"same pixels: max difference {diff}/255")
    print(f"time ratio batched / four calls (medians): {ratio:.3f}  (paired median {paired:.3f}; "
          f"target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    from provenance import stamp, write_json
    write_json(args.json, stamp(dict(date=time.strftime('%Y-%m-%d'), machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                                threads=torch.get_num_threads(), steps=args.steps, repeats=args.repeats, scales=list(SEED_SCALES),
                                max_pixel_diff=int(diff), times=times, ratio=ratio, paired_ratio=paired, target=TARGET)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
