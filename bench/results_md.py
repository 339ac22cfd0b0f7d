"""Write bench/RESULTS.md from the result files in bench/results/ (never typed by hand).

Each bench script writes its figures to bench/results/NAME.json with the fingerprints of the model (and LoRA) it
measured (bench/provenance.py); this script turns them into tables, and says of each section which model it was
measured on and whether that is the one that ships. `tests/test_bench_results.py` fails when RESULTS.md is not what
this script makes of the files.

    python bench/results_md.py            # writes bench/RESULTS.md
    python bench/results_md.py --check    # exit status 1 if bench/RESULTS.md is out of date
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import OTHER_MODELS, RESULTS, ROOT, results, shipped, stale  # noqa: E402

OUT = ROOT / 'bench' / 'RESULTS.md'


# results whose figures come from the judge (`sd_intro.shapes.judge`): one without a judge fingerprint predates the record
JUDGED = {'controlnet.json', 'distill.json', 'distill-plain-lcm.json', 'embedded.json', 'finetune.json', 'flow.json',
          'flow_init.json', 'inversion.json'}


def pct(x, d=1): return f"{100 * x:.{d}f}%"


def table(header: list, rows: list) -> str:
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                     ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows])


def provenance(name: str, r: dict, now: dict, script: str) -> str:
    "One line: the file, its date and machine, the model it measured, and whether that is the shipped one."
    model = r.get('model', 'unknown')
    what = OTHER_MODELS[model] if model in OTHER_MODELS else f"embedded model `{model}`"
    if 'lora' in r: what += f", LoRA `{r['lora']}`"
    if 'judge' in r: what += f", judge `{r['judge']}`"
    elif name in JUDGED: what += ", judged by the judge before its recalibration (session 12; no judge fingerprint recorded)"
    why = stale(r, now)
    state = (f"**model not recorded**: re-run `python bench/{script}`" if model == 'unknown' else
             f"**not the shipped model** ({'; '.join(why)}): re-run `python bench/{script}`" if why else
             'the shipped model' if model not in OTHER_MODELS else 'not the embedded model, on purpose')
    date = r.get('date') or r.get('env', {}).get('date', '')[:10]
    line = (f"`bench/results/{name}`, {date}, {r.get('machine') or r.get('env', {}).get('gpu', '')}: "
            f"{state if model == 'unknown' else what + ': ' + state}.")
    return line + (f" ({r['provenance']})" if r.get('provenance') else '')


def overhead(r):
    rows = [[x['images'], x['same_pixels'], f"{x['pipe_median_s']:.4f}", f"{x['generate_median_s']:.4f}",
             f"**{x['ratio']:.3f}**", f"{x['generate_own_ms']:.4f}", pct(x['own_share'], 3)] for x in r['rows']]
    worst = max(x['ratio'] for x in r['rows'])
    return (f"Embedded model, 64x64, {r['steps']} steps, guidance {r['guidance']}; both sides make the same pixels (asserted); "
            f"medians of {r['repeats']} interleaved repeats after one warm-up, {r.get('threads')} torch thread(s); `generate_own_ms` is `generate` on a stub "
            "pipeline that returns at once (its bookkeeping).\n\n" +
            table(['images', 'same_pixels', 'pipe_median_s', 'generate_median_s', 'ratio', 'generate_own_ms', 'own_share'], rows) +
            f"\n\nWorst ratio {worst:.3f} (target <= {r['target']}: {'met' if worst <= r['target'] else 'missed'}).")


def guidance(r):
    mins, maxs = r.get('minimum') or {k: min(v) for k, v in r['times'].items()}, r.get('maximum') or {k: max(v) for k, v in r['times'].items()}
    meds = r.get('medians') or {k: sorted(v)[len(v) // 2] for k, v in r['times'].items()}
    rows = [[k.replace('_', ' '), f"{meds[k]:.3f}", f"{mins[k]:.3f}", f"{maxs[k]:.3f}"] for k in meds]
    return (f"The notes' grid (guidance {', '.join(f'{g:g}' for g in r['scales'])} x 4 images), {r['steps']} steps: "
            f"`guidance_sweep`'s one batched loop against four pipeline calls, {r['repeats']} interleaved repeats, {r.get('threads')} torch thread(s), "
            f"same pixels (max difference {r['max_pixel_diff']}/255).\n\n" + table(['side', 'median s', 'min s', 'max s'], rows) +
            f"\n\nRatio batched / four calls **{r['ratio']:.3f}** (paired median {r['paired_ratio']:.3f}; target <= {r['target']}: "
            f"{'met' if r['ratio'] <= r['target'] else 'missed'}).")


def course(r):
    rows = [[x['notebook'], 'yes' if x['ok'] else 'FAILED', f"{x['wall_s']:.1f}", f"{x['cpu_s']:.1f}", x.get('lesson_budget', '')]
            for x in r['rows']]
    n_ok = sum(x['ok'] for x in r['rows'])
    over = [x['notebook'] for x in r['rows'] if x.get('lesson_budget') == 'MISSED']
    rows.append(['**total**', f"{n_ok}/{len(r['rows'])}", f"**{r['total_wall_s']:.1f}**", f"{r['total_cpu_s']:.1f}", ''])
    lesson = (f" Each lesson's budget is {r['lesson_s']} s: " + (f"over it: {', '.join(over)}." if over else "all within it.")) if 'lesson_s' in r else ''
    return (f"Every notebook through nbdev's `test_nb` (as `tests/test_notebooks.py` runs them), "
            f"{'a process each (start-up counted, as a student restarting the kernel)' if r.get('fresh') else 'one process'}, "
            f"cells flagged {' '.join(r['skipped_flags'])} skipped.\n\n" +
            table(['notebook', 'ok', 'wall s', 'CPU s', 'lesson budget'], rows) +
            f"\n\nTotal {r['total_wall_s']:.0f} s (target <= {r['target_s']} s: {'met' if r['total_wall_s'] <= r['target_s'] else 'missed'})." + lesson)


def gpu(r):
    rows = []
    plain = {x['batch']: x for x in r['rows'] if x['config'] == 'plain'}
    for x in r['rows']:
        up = f"{plain[x['batch']]['median_s'] / x['median_s']:.2f}x" if x['config'] != 'plain' and x['batch'] in plain else ''
        rows.append([x['config'], x['batch'], f"{x['first_call_s']:.3g}", f"**{x['median_s']:.3g}**", f"{x['s_per_image']:.3g}",
                     f"{x['images_per_s']:.3g}", f"{x['tflop_per_s']:.3g}", pct(x['mfu']), up, f"{x['peak_mem_gib']:.3g}"])
    e, a = r['env'], r['args']
    return (f"{e['gpu']} ({e['gpu_memory_gib']} GiB, capability {e['capability']}, CUDA {e['cuda']}), torch {e['torch']}, "
            f"diffusers {e['diffusers']}; {a['size']}x{a['size']}, {a['steps']} steps, fp16; medians of {a['repeats']} timed calls "
            f"after the first call and {a['warmup']} warm-up; MFU against {r['peak_tflops']} TFLOP/s; one image of {a['steps']} "
            f"steps is {r['flops']['1'] / 1e12:.1f} TFLOP (`sd_intro.speed.pipeline_flops`). \"fast\" is `make_fast`: "
            f"{r['fast']['compile']}, channels-last.\n\n" +
            table(['config', 'batch', 'first call s', 'median s', 's/image', 'images/s', 'TFLOP/s', 'MFU', 'speed-up', 'peak GiB'], rows))


def embedded(r):
    keys = ('colour', 'shape', 'background')
    rows = [[g, *(pct(v[k]) for k in keys), pct(sum(v[k] for k in keys) / 3)] for g, v in r['guidance_curve'].items()]
    q, w, d, s = r['quality'], r['size_position'], r['seed_diversity'], r.get('speed', {})
    neg = ', '.join(f"{c} {pct(a)} -> {pct(b)}" for c, (a, b) in r['negative_prompt'].items())
    out = ("256 images (64 fixed prompts x 4 seeds), 64x64, 30 DDIM steps, judged by `sd_intro.shapes.judge`.\n\n" +
           table(['guidance', *keys, 'mean'], rows) + '\n\n' +
           table(['measure', 'measured'], [
               ['shape at 7.5: circle / square / triangle / star', ' / '.join(pct(q[f'shape: {k}']) for k in ('circle', 'square', 'triangle', 'star'))],
               ['size words / place words (128 images)', f"{pct(w['size'])} / {pct(w['position'])}"],
               ['seed diversity: mean pairwise IoU of the objects (8 prompts x 8 seeds)', f"{d['mean_iou']:.2f}"],
               ['seed diversity: spread of the centres', f"{d['centre_std_px']:.1f} px"],
               *([['one image, 30 steps / 16 images, 50 steps / loading',
                   f"{s['one_image_30_steps']:.2f} s / {s['grid_16_images_50_steps']:.2f} s / {s['load']:.2f} s"]] if s else []),
               ['model folder', f"{r['model_mb']:.1f} MB"]]) +
           f"\n\nNegative prompt naming a colour, on prompts that name no colour (64 images each): {neg}. How the recipe "
           "was chosen (caption noise, the world-1 models): `nbs/00g_lib_embedded.ipynb`; how world 2 got here: `bench/world2/README.md`.")
    return out


def distill(r):
    fs = r['few_steps']
    rows = [[f"{who}, {n} step{'s' if n != '1' else ''}", *(pct(v[k], 0) for k in ('colour', 'shape', 'background', 'all'))]
            for who, rs in fs.items() for n, v in rs.items()]
    d, sp = r['distill'], r['speed']
    from sd_intro.distill import lcm_stages   # (a continued run's `continued_from` unrolled, first stage first)
    stages = lcm_stages(d)
    def stage(s):
        w = f"w {s['w_min']:g}" if s.get('w_min') == s.get('w_max') else f"w {s.get('w_min', 3):g}-{s.get('w_max', 8):g}"
        return (f"{s['steps']} steps x {s['batch_size']}, lr {s['lr']:g}, {'anchor ' + str(s['anchor']) if s.get('anchor') else 'no anchor'}, "
                f"{w}, {s['train_seconds']:.0f} s on {s['device']}")
    made = (f"in {len(stages)} stages ({'; '.join(stage(s) for s in stages)})" if len(stages) > 1 else f"({stage(stages[0])})")
    return (f"The LCM-LoRA, rank {d['rank']}, distilled {made}, at guidance 1 against the base model at 7.5; "
            f"256 judged pictures per row.\n\n" +
            table(['model, steps', 'colour', 'shape', 'background', 'all'], rows) +
            f"\n\nTime per picture: base 30 steps {sp['base_s'] * 1000:.0f} ms, LCM 4 steps {sp['LCM_s'] * 1000:.0f} ms: "
            f"ratio {sp['ratio']:.3f} ({1 / sp['ratio']:.1f} times faster; {r['threads']} threads).")


def finetune(r):
    b = r['before']
    rows = [['before', '', '', pct(b['new'], 0), pct(b['old'], 0), '']]
    rows += [[x['name'], x['steps'], f"{x['seconds']:.0f}", pct(x['new'], 0), pct(x['old'], 0), pct(x['retained'], 0)] for x in r['runs']]
    return (f"{r['n_new']} creature pictures (+ {r['n_old']} old ones), judged on {r['eval_n']} pictures at {r['eval_steps']} steps.\n\n" +
            table(['run', 'steps', 'train s', 'creatures', 'old prompts', 'retained'], rows))


def inversion(r):
    return (f"A new token learned from {r['n_train']} creature pictures ({r['steps']} steps, lr {r['lr']}, "
            f"{r['wall']:.0f} s wall on {r['machine']}); {r['n']} judged pictures each.\n\n" +
            table(['prompt', 'creatures judged'], [['the word "animal" (untrained)', pct(r['before'], 0)],
                                                   ['the held-out word itself', pct(r['word'], 0)],
                                                   ['the learned token', pct(r['after'], 0)]]) +
            f"\n\nWith the token: colour {pct(r['colour'], 0)}, background {pct(r['background'], 0)}; other prompts "
            f"{'unchanged, bit for bit' if r['base_prompts_unchanged'] else 'CHANGED'}.")


SECTIONS = [  # file, title, script, writer
    ('overhead.json', '`generate` against the raw `pipe(...)` call', 'bench_overhead.py', overhead),
    ('guidance.json', 'The batched guidance sweep', 'bench_guidance.py', guidance),
    ('course.json', 'The whole course', 'bench_course.py', course),
    ('embedded.json', 'Embedded model quality', 'bench_embedded.py --json bench/results/embedded.json', embedded),
    ('distill.json', 'Few steps: the shipped LCM-LoRA (lesson 7)', 'bench_distill.py', distill),
    ('distill-plain-lcm.json', 'Few steps: the plain LCM recipe, for comparison', 'bench_distill.py --lora FOLDER --json bench/results/distill-plain-lcm.json', distill),
    ('finetune.json', 'Fine-tuning (lesson 5)', 'bench_finetune.py', finetune),
    ('inversion.json', 'Textual inversion (lesson 6)', 'bench_inversion.py', inversion),
    ('gpu_h200.json', 'GPU: Stable Diffusion 1.5 at full size', 'bench_gpu.py --json bench/results/gpu_h200.json', gpu),
]


def render_md(now: dict | None = None) -> str:
    "RESULTS.md's text, made from the files in bench/results/."
    now, rs = now or shipped(), results()
    parts = [f"# Bench results\n\n<!-- Written by `python bench/results_md.py` from bench/results/*.json: do not edit by hand. -->\n\n"
             f"Made from the files in `bench/results/`, each written by the script named under its section. The shipped "
             f"embedded model is `{now['model']}` and the shipped LCM-LoRA `{now['lora']}` (fingerprints of their weights, "
             f"`bench/provenance.py`); a section measured on another model says so. Ratios are measured side by side in "
             f"one run; absolute times only mean something on the machine named. The CPU fast path (`make_fast`: SDPA, "
             f"channels-last, fused QKV, `torch.compile` with the eager backend) is checked by `tests/test_speed.py`: same "
             f"pixels within 2 levels of 255."]
    missing = [n for n, *_ in SECTIONS if n not in rs]
    for i, (name, title, script, write) in enumerate([s for s in SECTIONS if s[0] in rs], 1):
        r = rs[name]
        parts.append(f"## {i}. {title}\n\n{provenance(name, r, now, script)}\n\n{write(r)}")
    extra = sorted(set(rs) - {s[0] for s in SECTIONS})
    if extra: parts.append("## Other result files\n\n" + '\n'.join(f"- {provenance(n, rs[n], now, '...')}" for n in extra))
    if missing: parts.append("Not measured yet: " + ', '.join(missing) + '.')
    return '\n\n'.join(parts) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--check', action='store_true', help='only check that bench/RESULTS.md is up to date')
    a = ap.parse_args(argv)
    text = render_md()
    if a.check:
        ok = OUT.exists() and OUT.read_text() == text
        print('bench/RESULTS.md is up to date' if ok else 'bench/RESULTS.md is out of date: run python bench/results_md.py')
        return 0 if ok else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == '__main__': sys.exit(main())
