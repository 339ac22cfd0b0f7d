"""Flow matching against DDPM on the same model (lesson 9): the shipped flow model against the embedded DDPM model.

Measures with the judge on the embedded model's quality prompt set (`judged_quality`: 64 prompts x 2 seeds by default;
colour, shape and background adherence, 'all' their mean with each base shape counted, as lesson 7 does):
  steps table     both models at 1, 2, 4, 8, 16, 30 steps, guidance 7.5: the DDPM model with DDIM on 'trailing'
                  timesteps (lesson 1's best sampler at few steps), the flow model with its Euler scheduler
  even steps      the flow model at the same step counts on N even steps (FLUX's sigmas, linspace(1, 1/N, N)): diffusers'
                  default spacing, linspace(1, 0.001, N), wastes its last step between t = 0.001 and 0
  straightness    over 16 prompts: the path length of the predicted final latents over 30 steps, the distance of the
                  first prediction from the last, the mean pixel gap between the 1-step and the 30-step picture
  shift sweep     the flow model sampled with shift 0.5, 1, 2, 3, 6 at 4 and 8 steps (64 prompts x 1 seed)
  guidance        the flow model at guidance 1, 3, 7.5, 14 (30 steps, 64 prompts x 1 seed); negative prompts' colour
                  effect (red and blue, 32 prompts each)
  time            seconds per picture of each model at 4 and 30 steps (8 pictures per call)
Prints Markdown tables and writes bench/results/flow.json with both models' fingerprints.

    python bench/bench_flow.py [--threads 2] [--quick] [--part all|DDPM|flow] [--flow FOLDER --json OUT.json]
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
    ap.add_argument('--skip', nargs='*', default=(), choices=('steps', 'even', 'straightness', 'shift', 'guidance', 'time'))
    ap.add_argument('--part', choices=('all', 'DDPM', 'flow'), default='all',
                    help="measure one model's side only (the figures are merged into the JSON with the other's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from sd_intro.core import load_pipeline, EMBEDDED_MODEL
    from sd_intro.pipelines import markdown_table
    from sd_intro.embedded import guidance_curve, negative_prompt_effect, quality_prompts, judged_quality
    from sd_intro.flow import straightness, shift_sweep, seconds_per_picture, STEP_COUNTS
    from sd_intro.flow_models import FLOW_MODEL, load_flow, ddim_trailing, even_steps, flow_info
    from sd_intro.finetune import model_fingerprint
    folder = a.flow or FLOW_MODEL
    n_prompts, n_seeds = (16, 1) if a.quick else (64, 2)
    res = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", threads=a.threads,
               model=model_fingerprint(), ddpm_model=model_fingerprint(EMBEDDED_MODEL), pictures_per_row=n_prompts * n_seeds, guidance_scale=7.5)
    models = {}
    if a.part in ('all', 'DDPM'): models['DDPM'] = ddim_trailing(load_pipeline())
    if a.part in ('all', 'flow'):
        models['flow'] = load_flow(folder)
        res.update(flow_model=model_fingerprint(folder), training=flow_info(folder))
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if 'steps' not in a.skip:   # what `steps_quality` measures, one model at a time
            res['steps'] = {}
            for who, pipe in models.items():
                rows = {}
                for n in STEP_COUNTS:
                    r = judged_quality(pipe, steps=n, guidance=7.5, n_prompts=n_prompts, n_seeds=n_seeds)
                    rows[str(n)] = dict(r, all=sum(r.values()) / len(r))
                    print(who, n, {k: round(v, 3) for k, v in rows[str(n)].items()}, flush=True)
                res['steps'][who] = rows
        if 'flow' in models and 'even' not in a.skip:   # the flow model on N even steps (FLUX's schedule)
            rows, pipe = {}, even_steps(models['flow'])
            for n in STEP_COUNTS:
                r = judged_quality(pipe, steps=n, guidance=7.5, n_prompts=n_prompts, n_seeds=n_seeds)
                rows[str(n)] = dict(r, all=sum(r.values()) / len(r))
                print('flow, even steps', n, {k: round(v, 3) for k, v in rows[str(n)].items()}, flush=True)
            res['steps_even'] = {'flow': rows}
        if 'straightness' not in a.skip:
            prompts = quality_prompts(16)
            res['straightness'] = {who: straightness(p, prompts, seed=0, steps=30) for who, p in models.items()}
            print(json.dumps(res['straightness'], indent=1), flush=True)
        if 'flow' in models and 'shift' not in a.skip:   # 64 prompts x 1 seed: at 30 steps every shift does alike
            sweep = shift_sweep(models['flow'], (0.5, 1, 2, 3, 6), (4, 8), n_prompts=n_prompts, n_seeds=1)
            res['shift'] = {str(s): {str(n): v for n, v in r.items()} for s, r in sweep.items()}
            res['shift_pictures'] = n_prompts
            print(json.dumps(res['shift'], indent=1), flush=True)
        if 'flow' in models and 'guidance' not in a.skip:
            curve = guidance_curve(models['flow'], (1, 3, 7.5, 14), steps=30, n_prompts=n_prompts, n_seeds=1)
            res['guidance'] = {str(g): r for g, r in curve.items()}
            res['guidance_pictures'] = n_prompts
            res['negative_prompt'] = {c: list(v) for c, v in negative_prompt_effect(models['flow'], ('red', 'blue'),
                                                                                     n=32 if not a.quick else 16).items()}
            print(markdown_table({f"flow, guidance {g}": r for g, r in curve.items()}, 'model'), flush=True)
            print(res['negative_prompt'], flush=True)
        if 'time' not in a.skip:   # both models, side by side in one process (the same load for both)
            both = {'DDPM': models.get('DDPM') or ddim_trailing(load_pipeline()), 'flow': models.get('flow') or load_flow(folder)}
            res['seconds_per_picture'] = seconds_per_picture(both, (4, 30), n=8, repeats=3)
            res['load_average_during_timing'] = round(os.getloadavg()[0], 1)
            print(res['seconds_per_picture'], flush=True)
    res[f'bench_wall_s_{a.part}'] = round(time.time() - t0, 1)
    out = Path(a.json) if a.json else (RESULTS if a.flow is None and not a.quick else None)
    if out:
        old = json.loads(out.read_text()) if out.exists() else {}
        if a.part != 'all' and old.get('pictures_per_row') == res['pictures_per_row']:   # the other model's side stays
            for k, v in res.items():
                if isinstance(v, dict) and isinstance(old.get(k), dict) and k not in ('training',): old[k] = {**old[k], **v}
                else: old[k] = v
            res = old
        out.write_text(json.dumps(res, indent=1) + '\n')
        print(f"wrote {out}")


if __name__ == '__main__':
    main()
