"""Few steps by distillation (lesson 7): the shipped LCM-LoRA against the base embedded model.

Optionally distils the LCM-LoRA first (`--train`: `python -m sd_intro.distill`'s recipe, timed), then measures with
the judge on the embedded model's quality prompt set (`judged_quality`: 64 prompts x 4 seeds; colour, shape and
background adherence):
  few-step table   the LCM at 1, 2, 4 steps (guidance 1) vs the base model at 1, 2, 4, 5, 30 steps (guidance 7.5)
                   targets: LCM 4 steps within 5 points of base 30 steps; LCM 1 step above base 5 steps
  time ratio       seconds per image, LCM 4 steps / base 30 steps, timed side by side on --threads CPU threads
  guidance         the LCM at guidance 1, 1.5, 2, 4, 7.5; negative prompts' colour effect with and without LCM
Prints Markdown tables and writes bench/results/distill.json.

    python bench/bench_distill.py [--train] [--threads 2] [--quick] [--lora FOLDER --json OUT.json]

`--lora` measures another LCM-LoRA folder than the shipped one (e.g. a run with `--anchor 0`, the plain LCM recipe;
bench/results/distill-plain-lcm.json is such a run: 1000 steps, no anchor).
"""
import argparse, json, os, platform, sys, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / 'bench' / 'results' / 'distill.json'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--train', action='store_true', help='distil the shipped LoRA again first (overwrites it)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true', help='16 prompts x 1 seed (a smoke test, not the figures)')
    ap.add_argument('--lora', default=None, help='an LCM-LoRA folder to measure instead of the shipped one')
    ap.add_argument('--json', default=None, help=f'where to write the figures (default: {RESULTS.relative_to(ROOT)} '
                                                  f'for the shipped LoRA, nowhere for another)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from sd_intro.core import load_pipeline
    from sd_intro.pipelines import markdown_table
    from sd_intro.embedded import guidance_curve, negative_prompt_effect
    from sd_intro.distill import LCM_LORA, distill, few_step_quality, lcm_info, lcm_pipeline, speed_ratio
    from sd_intro.finetune import model_fingerprint
    res = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", threads=a.threads,
               date=time.strftime('%Y-%m-%d'))
    if a.train:
        t = time.time()
        distill(LCM_LORA, overwrite=True, work=ROOT / 'bench' / 'out' / 'distill-work')
        res['train_wall_s'] = round(time.time() - t, 1)
    if a.train and a.lora: ap.error('--train distils the shipped LoRA; leave out --lora')
    lora = a.lora or LCM_LORA
    info = lcm_info(lora)
    res['distill'] = info
    from provenance import stamp
    res = stamp(res, lora=lora)   # the model measured (the embedded one) and the LoRA's own fingerprint
    assert info['model'] == model_fingerprint(), "the shipped LCM-LoRA was distilled from another model: run with --train"
    print(f"LCM-LoRA: {info['steps']} steps x {info['batch_size']}, {info['train_seconds']:.0f} s of training on "
          f"{info['device']} ({info['torch_threads']} threads)\n")
    base, lcm = load_pipeline(), lcm_pipeline(lora=lora)
    kw = dict(n_prompts=16, n_seeds=1) if a.quick else {}
    t = time.time()
    table = few_step_quality(base, lcm, **kw)
    res['few_steps'] = {who: {str(n): r for n, r in rs.items()} for who, rs in table.items()}
    print(markdown_table({f"{who}, {n} steps": r for who, rs in table.items() for n, r in rs.items()}, 'model'))
    A = lambda who, n: table[who][n]['all']
    res['targets'] = dict(lcm4_minus_base30=A('LCM', 4) - A('base', 30), lcm1_minus_base5=A('LCM', 1) - A('base', 5),
                          lcm4_within_5_points=A('LCM', 4) >= A('base', 30) - 0.05, lcm1_above_base5=A('LCM', 1) > A('base', 5))
    print(f"\nLCM 4 steps - base 30 steps: {res['targets']['lcm4_minus_base30'] * 100:+.1f} points (target >= -5); "
          f"LCM 1 step - base 5 steps: {res['targets']['lcm1_minus_base5'] * 100:+.1f} points (target > 0)  "
          f"[{time.time() - t:.0f} s]\n")
    sp = speed_ratio(base, lcm, repeats=3 if a.quick else 7)
    res['speed'] = sp
    print(f"| side | s per image |\n|---|---|\n| base, 30 steps, guidance 7.5 | {sp['base_s']:.4f} |\n"
          f"| LCM, 4 steps, guidance 1 | {sp['LCM_s']:.4f} |\n\nratio LCM / base: **{sp['ratio']:.3f}** "
          f"({a.threads} threads)\n")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        gkw = dict(n_prompts=16, n_seeds=1) if a.quick else dict(n_prompts=32, n_seeds=2)
        curve = guidance_curve(lcm, (1, 1.5, 2, 4, 7.5), steps=4, **gkw)
        res['lcm_guidance'] = {str(g): dict(r, all=sum(r.values()) / len(r)) for g, r in curve.items()}
        print(markdown_table({f"LCM 4 steps, scale {g}": r for g, r in res['lcm_guidance'].items()}, 'guidance'))
        n = 32 if a.quick else 64
        neg = {'base, 30 steps, scale 7.5': negative_prompt_effect(base, n=n, steps=30, guidance=7.5),
               'LCM, 4 steps, scale 1': negative_prompt_effect(lcm, n=n, steps=4, guidance=1.0),
               'LCM, 4 steps, scale 2': negative_prompt_effect(lcm, n=n, steps=4, guidance=2.0)}
    res['negative_prompt'] = neg
    print('\n' + markdown_table({f"{who}: {c}": {'without': x, 'with it as negative': y}
                                 for who, r in neg.items() for c, (x, y) in r.items()}, 'colour share'))
    out = Path(a.json) if a.json else None if a.lora or a.quick else RESULTS
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=float) + '\n')
        print(f"\nwrote {out}")


if __name__ == '__main__':
    main()
