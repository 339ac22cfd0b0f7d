"""Textual inversion of the held-out creature on the embedded model (lesson 6), a longer run than the lesson's.

Writes lesson 5's creature imagefolder (creatures only), learns the token '<creature>' (its embedding row only) with
`sd_intro.inside.textual_inversion`, saves it as learned_embeds.safetensors, loads it into a fresh pipeline with
diffusers' `load_textual_inversion`, and measures with the judge:
  before     share of "a <colour> <creature> on a <colour> background" pictures read as a creature, untrained token
  after      the same with the learned token; colour / background: their adherence with the learned token
  word       the same prompts with the plain word "creature" on the base model (lesson 5's 'before')
and checks that the base model's own prompts give the same pixels with the token loaded (nothing forgotten).
Then what *any* conditioning can do (issue 27, point 4): `fit_conditioning` trains the text encoder's whole output
(no text at all) on red-on-green creature pictures, and on circles as a control; the shipped creature LoRA of lesson 5
draws the same prompt. `ears` is the share whose outline shows the creature's ears (`shows_ears`).
Prints the figures and writes them to bench/results/inversion.json, which nbs/06_inside.ipynb shows.

    python bench/bench_inversion.py [--steps 300] [--lr 1e-2] [--eval-n 64] [--threads 2]
"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'bench' / 'results' / 'inversion.json'


def main():
    from diffusers import StableDiffusionPipeline
    from sd_intro.core import EMBEDDED_MODEL, generate, quiet_loading
    from sd_intro.shapes import HELD_OUT, JUDGE_PATH, adherence, creature_verdicts
    from sd_intro.creatures import write_shapes_folder, creature_prompts
    from sd_intro.embedded import EVAL_PROMPTS
    from sd_intro.inside import load_parts, add_token, textual_inversion, save_learned_embeds, sample_parts
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=300)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--n', type=int, default=128, help='creature pictures to train on')
    ap.add_argument('--eval-n', type=int, default=64, help='judged pictures per measure')
    ap.add_argument('--eval-steps', type=int, default=20)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--json', default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not JUDGE_PATH.exists(): sys.exit(f"No judge weights at {JUDGE_PATH}: train the embedded model and its judge first.")
    tmp = Path(tempfile.mkdtemp())
    folder = write_shapes_folder(tmp / 'creatures', n_new=a.n, n_old=0, seed=0)
    parts = load_parts()
    t0, c0 = time.time(), time.process_time()
    inv = textual_inversion(parts, folder, steps=a.steps, batch_size=a.batch_size, lr=a.lr)
    wall, cpu = time.time() - t0, time.process_time() - c0
    path = save_learned_embeds(inv, tmp / 'learned_embeds.safetensors')
    with quiet_loading():
        base = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
        fresh = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
    for p in (base, fresh): p.set_progress_bar_config(disable=True)
    fresh.load_textual_inversion(str(path))
    untrained = load_parts(); add_token(untrained, inv.token, 'animal')
    words = creature_prompts(a.eval_n)
    tokens = [p.replace(HELD_OUT, inv.token) for p in words]
    kw = dict(seed=1000, num_inference_steps=a.eval_steps)
    word = adherence(generate(base, words, **kw).images, words)
    before = adherence(sample_parts(untrained, tokens, **kw), words)
    after = adherence(generate(fresh, tokens, **kw).images, words)
    old = EVAL_PROMPTS[:16]
    same = all((x == y).all() for x, y in zip(*[[__import__('numpy').asarray(im) for im in generate(p, old, **kw).images]
                                                  for p in (base, fresh)]))
    r = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads, torch {torch.__version__}",
             date=time.strftime('%Y-%m-%d'), steps=a.steps, lr=a.lr, batch_size=a.batch_size, n_train=a.n, n=a.eval_n,
             wall=round(wall, 1), cpu=round(cpu, 1), loss_first=sum(inv.losses[:10]) / 10, loss_last=sum(inv.losses[-10:]) / 10,
             word=word['shape'], before=before['shape'], after=after['shape'], colour=after['colour'],
             background=after['background'], base_prompts_unchanged=bool(same),
             ears=creature_verdicts(generate(fresh, tokens, **kw).images, words)['outline'])
    r.update(strongest_conditioning(parts, a, kw))
    from provenance import stamp
    r = stamp(r)   # the model measured, and the judge that judged it
    print(json.dumps(r, indent=1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(r, indent=1) + '\n')


def strongest_conditioning(parts, a, kw):
    """What the frozen UNet can draw from *any* conditioning: `fit_conditioning` (all of the text encoder's output
    trained, no text) on large flat red-on-green creatures, and on circles as a control, against the shipped creature
    LoRA of lesson 5 on the same prompt (a colour pair no creature picture of its training showed)."""
    import random
    from sd_intro.core import load_pipeline, load_lora, generate
    from sd_intro.shapes import HELD_OUT, Scene, random_scene, render, to_pil, adherence, creature_verdicts
    from sd_intro.creatures import CREATURE_LORA
    from sd_intro.inside import fit_conditioning, sample_parts
    fit, rng, out = 'a red creature on a green background', random.Random(0), {}
    seeds = dict(kw, seed=range(5000, 5000 + a.eval_n // 2))
    for shape, key in (('circle', 'free_circle'), (HELD_OUT, 'free')):
        scenes = [random_scene(rng, shapes=(shape,), styles=('flat',), radius_range=(0.3, 0.375)) for _ in range(a.n)]
        pics = [to_pil(render(Scene(s.shape, 'red', 'green', 'flat', s.x, s.y, s.size, s.angle))) for s in scenes]
        cond = fit_conditioning(parts, pics, fit, steps=150, batch_size=32)
        imgs = sample_parts(parts, cond.expand(a.eval_n // 2, -1, -1), **seeds)
        v = creature_verdicts(imgs, [fit] * len(imgs))
        out[key] = dict(ears=v['outline'], creature=v['judge'],
                        **{k: x for k, x in adherence(imgs, [f'a red {shape} on a green background'] * len(imgs)).items()})
    lora = load_lora(load_pipeline(), str(CREATURE_LORA))
    imgs = generate(lora, [fit] * (a.eval_n // 2), **seeds).images
    v = creature_verdicts(imgs, [fit] * len(imgs))
    out['creature_lora'] = dict(ears=v['outline'], creature=v['judge'], **adherence(imgs, [fit] * len(imgs)))
    out['fit'] = dict(prompt=fit, steps=150, batch_size=32, pictures=a.n, judged=a.eval_n // 2)
    return out


if __name__ == '__main__': main()
