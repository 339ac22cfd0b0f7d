"""Flow matching against DDPM on the same model (lesson 9): the shipped flow model against the embedded DDPM model.

Measures with the judge on the embedded model's quality prompt set (`judged_quality`: 64 prompts x 2 seeds by default;
colour, shape and background adherence, 'all' their mean with each base shape counted, as lesson 7 does):
  steps table     both models at 1, 2, 4, 8, 16, 30 steps, guidance 7.5: the DDPM model with DDIM on 'trailing'
                  timesteps (lesson 1's best sampler at few steps), the flow model with its Euler scheduler
  straightness    over 16 prompts: the path length of the predicted final latents over 30 steps, the distance of the
                  first prediction from the last, the mean pixel gap between the 1-step and the 30-step picture
  shift sweep     the flow model sampled with shift 0.5, 1, 2, 3, 6 at 4 and 30 steps
  guidance        the flow model at guidance 1, 1.5, 3, 7.5, 14 (30 steps); negative prompts' colour effect
  time            seconds per picture of each model at 4 and 30 steps (8 pictures per call)
Prints Markdown tables and writes bench/results/flow.json with both models' fingerprints.

    python bench/bench_flow.py [--threads 2] [--quick] [--flow FOLDER --json OUT.json] [--train-log FILE]
"""
import argparse, json, os, platform, sys, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / 'bench' / 'results' / 'flow.json'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true', help='16 prompts x 1 seed (a smoke test, not the figures)')
    ap.add_argument('--flow', default=None, help='a flow model folder to measure instead of the shipped one')
    ap.add_argument('--json', default=None, help=f'where to write the figures (default: {RESULTS.relative_to(ROOT)} '
                                                  f'for the shipped model, nowhere for another)')
    ap.add_argument('--skip', nargs='*', default=(), choices=('steps', 'straightness', 'shift', 'guidance', 'time'))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from sd_intro.core import load_pipeline, EMBEDDED_MODEL
    from sd_intro.pipelines import markdown_table
    from sd_intro.embedded import guidance_curve, negative_prompt_effect, quality_prompts
    from sd_intro.flow import (FLOW_MODEL, load_flow, steps_quality, straightness, shift_sweep, seconds_per_picture,
                               flow_info, STEP_COUNTS)
    from sd_intro.finetune import model_fingerprint
    folder = a.flow or FLOW_MODEL
    n_prompts, n_seeds = (16, 1) if a.quick else (64, 2)
    res = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", threads=a.threads,
               ddpm_model=model_fingerprint(EMBEDDED_MODEL), flow_model=model_fingerprint(folder),
               pictures_per_row=n_prompts * n_seeds, training=flow_info(folder))
    ddpm, flow = load_pipeline(), load_flow(folder)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if 'steps' not in a.skip:
            table = steps_quality(ddpm, flow, STEP_COUNTS, n_prompts=n_prompts, n_seeds=n_seeds)
            res['steps'] = {who: {str(n): r for n, r in rs.items()} for who, rs in table.items()}
            print(markdown_table({f"{who}, {n} steps": r for who, rs in table.items() for n, r in rs.items()}, 'model'), flush=True)
        if 'straightness' not in a.skip:
            prompts = quality_prompts(16)
            res['straightness'] = {who: straightness(p, prompts, seed=0, steps=30) for who, p in (('DDPM', ddpm), ('flow', flow))}
            print(json.dumps(res['straightness'], indent=1), flush=True)
        if 'shift' not in a.skip:
            sweep = shift_sweep(flow, (0.5, 1, 2, 3, 6), (4, 30), n_prompts=n_prompts, n_seeds=n_seeds)
            res['shift'] = {str(s): {str(n): v for n, v in r.items()} for s, r in sweep.items()}
            print(json.dumps(res['shift'], indent=1), flush=True)
        if 'guidance' not in a.skip:
            curve = guidance_curve(flow, (1, 1.5, 3, 7.5, 14), steps=30, n_prompts=n_prompts, n_seeds=n_seeds)
            res['guidance'] = {str(g): r for g, r in curve.items()}
            res['negative_prompt'] = {c: list(v) for c, v in negative_prompt_effect(flow, n=64 if not a.quick else 16).items()}
            print(markdown_table({f"flow, guidance {g}": r for g, r in curve.items()}, 'model'), flush=True)
            print(res['negative_prompt'], flush=True)
        if 'time' not in a.skip:
            res['seconds_per_picture'] = {f"{who}, {n} steps": seconds_per_picture(p, n) for who, p in (('DDPM', ddpm), ('flow', flow))
                                          for n in (4, 30)}
            print(res['seconds_per_picture'], flush=True)
    res['bench_wall_s'] = round(time.time() - t0, 1)
    out = Path(a.json) if a.json else (RESULTS if a.flow is None and not a.quick else None)
    if out:
        old = json.loads(out.read_text()) if out.exists() else {}
        if old.get('flow_model') == res['flow_model']: res = {**old, **res}   # a partial re-run (--skip) keeps the rest
        out.write_text(json.dumps(res, indent=1) + '\n')
        print(f"wrote {out}")


if __name__ == '__main__':
    main()
