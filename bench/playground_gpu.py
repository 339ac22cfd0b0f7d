"""The instructors' playground on a CUDA GPU at full size: the SD 1.5 architecture with random weights (no download),
512 px, fp16. One Generate with live previews, a second click during the run refused, then a second run;
prints the seconds of each run, the previews shown, and the panel's messages. Exit status 1 if any check fails.

    python bench/playground_gpu.py                  # needs CUDA
    python bench/playground_gpu.py --model FOLDER   # a real checkpoint in a local folder or the HF cache
    python bench/playground_gpu.py --smoke          # CPU, embedded model: checks that the script runs
"""
import argparse, sys, time
import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default=None, help="default: the full-size architecture with random weights")
    ap.add_argument('--steps', type=int, default=25)
    ap.add_argument('--smoke', action='store_true')
    a = ap.parse_args(argv)
    from sd_intro.core import load_pipeline
    from sd_intro.widgets import playground
    if a.smoke: pipe, a.steps = load_pipeline(), 4
    elif not torch.cuda.is_available(): ap.error('no CUDA GPU here: run with --smoke to check the script on a CPU')
    elif a.model: pipe = load_pipeline(a.model, device='cuda')
    else:
        from sd_intro.speed import full_size_pipeline
        pipe = full_size_pipeline('cuda', torch.float16)
    pg = playground(pipe, steps=a.steps)
    checks = {}
    t = time.perf_counter()
    checks['first click starts a run'] = pg.generate()
    checks['second click during the run is refused'] = not pg.generate()   # at once: the run has just started
    checks['run ends within 120 s'] = pg.wait(120)
    first = time.perf_counter() - t
    checks['one picture in the history'] = len(pg.history) == 1 and pg.message.startswith('Done in')
    checks['live previews shown'] = pg.last_run.get('previews', 0) >= 1
    print(f"txt2img: {first:.2f} s with the first call's warm-up; {pg.message!r}; previews {pg.last_run.get('previews')}")
    t = time.perf_counter()
    checks['a second run adds a second picture'] = pg.generate(wait=True) and len(pg.history) == 2
    print(f"second txt2img: {time.perf_counter() - t:.2f} s; {pg.message!r}")
    for k, v in checks.items(): print(f"{'ok ' if v else 'FAILED'} {k}")
    return 0 if all(checks.values()) else 1


if __name__ == '__main__': sys.exit(main())
