"""Probe round of issue 31: bad inputs and faults a new user meets, each judged 'holds' or 'fails'.

Usage: PYTHONPATH=<a checkout> python tools/probe_reliability.py [--only WORD]
Runs against whichever `sd_intro` is imported (so the same probes measure an older checkout), on the embedded model, on
the CPU, in a temporary folder; prints one line per probe and the counts per class. Takes a few minutes on 2 cores.
"""
from __future__ import annotations
import argparse, json, os, shutil, sys, tempfile, threading, traceback, warnings
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import torch
torch.set_num_threads(1)
from PIL import Image, PngImagePlugin

PROMPT = 'a red circle on a blue background'
PROBES = []   # (class, name, function): the function returns (holds, detail)


def probe(cls):
    def add(f): PROBES.append((cls, f.__name__, f)); return f
    return add


def said(f):
    "f()'s result (or exception) and its warnings' messages."
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        try: out = f()
        except Exception as e: out = e
    return out, [str(w.message) for w in ws]


def refused(f, *words, kind=Exception):
    "Holds if f() raises `kind` whose message has every word."
    try: f()
    except kind as e:
        msg = str(e)
        return all(w in msg for w in words), f"{type(e).__name__}: {msg[:160]}"
    except Exception as e: return False, f"{type(e).__name__} (not {kind.__name__}): {str(e)[:160]}"
    return False, 'ran without a word'


class Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (open, (str(self.marker), 'w'))


T = Path(tempfile.mkdtemp(prefix='probe31-'))
_cache = {}


def data():
    if 'data' not in _cache:
        import sd_intro.finetune as ft
        _cache['data'] = ft.write_shapes_folder(T / 'data', n_new=6, n_old=2, seed=3)
    return _cache['data']


def lcm():
    if 'lcm' not in _cache:
        from sd_intro.distill import lcm_pipeline
        _cache['lcm'] = lcm_pipeline()
    return _cache['lcm']


def base():
    from sd_intro.core import load_pipeline
    return load_pipeline()


FT = dict(method='lora', steps=3, checkpoint_every=1, batch_size=2, lr=1e-3, progress=False,
          validation_prompts=['a creature', PROMPT], validation_steps=2)
TINY = dict(steps=3, batch_size=2, n_images=8, anchor_pairs=4, rank=2, ckpt_every=1)

# ---- trainers ------------------------------------------------------------------------------------------------

@probe('trainers: resume')
def finetune_resumes_with_validation():
    import sd_intro.finetune as ft
    out = T / 'ft-resume'
    ft.finetune(data(), out, stop_at=2, **FT)
    try: res = ft.finetune(data(), out, resume=True, **FT)
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    return res.saved is not None and (out / 'validation.png').exists(), 'finished with validation.png'


@probe('trainers: resume')
def finetune_resume_with_validation_is_bit_identical():
    import sd_intro.finetune as ft
    whole = ft.finetune(data(), T / 'ft-whole', **FT)
    out = T / 'ft-resume2'
    ft.finetune(data(), out, stop_at=1, **FT)
    try: res = ft.finetune(data(), out, resume=True, **FT)
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    a, b = (np.asarray(Image.open(p / 'validation.png')) for p in (T / 'ft-whole', out))
    return res.losses == whole.losses and a.shape == b.shape and np.array_equal(a, b), 'losses and validation.png equal'


@probe('trainers: resume')
def embedded_unet_stage_resumes_bit_identically():
    from sd_intro.embedded import build_tokenizer, build_components, train_unet
    class Stop(Exception): pass
    def run(work, stop=None):
        parts = build_components(_cache.setdefault('tok', build_tokenizer()), seed=0)
        def log(m):
            if stop and m.startswith(stop): raise Stop
        try: return train_unet(parts, work, steps=4, bs=4, n_images=16, ckpt_every=1, eval_every=0, log_every=1, log=log)
        except Stop: return None
    a = run(T / 'emb-whole')
    run(T / 'emb-cut', stop='unet step 2'); b = run(T / 'emb-cut')
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa), 'EMA UNet equal after a stop at step 2 and a resume'


@probe('trainers: resume')
def distill_resumes_bit_identically():
    from safetensors.torch import load_file
    from sd_intro.distill import distill
    class Stop(Exception): pass
    def stop(m):
        if m.startswith('step 2'): raise Stop
    w = distill(T / 'd-whole', log=None, **TINY)
    try: distill(T / 'd-cut', log=stop, **TINY)
    except Stop: pass
    c = distill(T / 'd-cut', log=None, **TINY)
    a, b = (load_file(p / 'pytorch_lora_weights.safetensors') for p in (w, c))
    return all(torch.equal(a[k], b[k]) for k in a), 'LoRA equal'


@probe('trainers: files')
def distill_overwrite_keeps_user_files():
    from sd_intro.distill import distill
    out = T / 'mine'; out.mkdir(); (out / 'thesis.tex').write_text('mine')
    try: distill(out, overwrite=True, log=None, **dict(TINY, steps=1))
    except Exception as e: return (out / 'thesis.tex').exists(), f"refused: {str(e)[:100]}"
    return (out / 'thesis.tex').exists(), 'thesis.tex kept'


@probe('trainers: files')
def save_pipeline_keeps_a_model_card():
    from sd_intro.core import save_pipeline
    out = save_pipeline(base(), T / 'card')
    (out / 'README.md').write_text('card')
    save_pipeline(base(), out)
    return (out / 'README.md').exists(), 'README.md kept'


@probe('trainers: files')
def finetune_lora_folder_keeps_user_files():
    import sd_intro.finetune as ft
    kw = dict(FT, steps=1, validation_prompts=())
    out = T / 'ft-notes'; ft.finetune(data(), out, **kw)
    (out / 'lora' / 'NOTES.md').write_text('mine')
    ft.finetune(data(), out, overwrite=True, **kw)
    return (out / 'lora' / 'NOTES.md').exists(), 'NOTES.md kept'


@probe('trainers: pickles')
def distill_checkpoint_is_not_unpickled():
    from sd_intro.distill import distill
    work, marker = T / 'evil-work', T / 'ran1'; work.mkdir()
    torch.save({'lora': Evil(marker)}, work / 'checkpoint.pt')
    try: distill(T / 'evil', work=work, log=None, **TINY)
    except Exception: pass
    return not marker.exists(), 'no code ran' if not marker.exists() else 'the crafted pickle ran'


@probe('trainers: pickles')
def distill_latents_cache_is_not_unpickled():
    from sd_intro.distill import distill
    from sd_intro.finetune import model_fingerprint
    work, marker = T / 'evil2-work', T / 'ran2'; work.mkdir()
    fp = model_fingerprint()
    for ext in ('pt', 'safetensors'): torch.save(Evil(marker), work / f"latents-{fp}-8-0.{ext}")
    try: distill(T / 'evil2', work=work, log=None, **TINY)
    except Exception: pass
    return not marker.exists(), 'no code ran' if not marker.exists() else 'the crafted pickle ran'


@probe('trainers: pickles')
def finetune_optimizer_file_is_not_unpickled():
    import sd_intro.finetune as ft
    out, marker = T / 'ft-evil', T / 'ran3'
    ft.finetune(data(), out, stop_at=1, **FT)
    torch.save({'optimizer': Evil(marker)}, out / 'checkpoints' / 'step-000001' / 'optimizer.pt')
    try: ft.finetune(data(), out, resume=True, **FT)
    except Exception: pass
    return not marker.exists(), 'no code ran' if not marker.exists() else 'the crafted pickle ran'


@probe('trainers: damaged or edited state')
def distill_truncated_checkpoint_is_named():
    from sd_intro.distill import distill
    class Stop(Exception): pass
    def stop(m):
        if m.startswith('step 2'): raise Stop
    try: distill(T / 'trunc', log=stop, **TINY)
    except Stop: pass
    ck = T / 'trunc-work' / 'checkpoint.pt'; ck.write_bytes(ck.read_bytes()[:1000])
    return refused(lambda: distill(T / 'trunc', log=None, **TINY), 'checkpoint.pt', 'delete')


@probe('trainers: damaged or edited state')
def distill_edited_step_is_named():
    from sd_intro.distill import distill
    class Stop(Exception): pass
    def stop(m):
        if m.startswith('step 2'): raise Stop
    try: distill(T / 'edit', log=stop, **TINY)
    except Stop: pass
    ck = T / 'edit-work' / 'checkpoint.pt'
    st = torch.load(ck, weights_only=True); torch.save(dict(st, step=1), ck)
    return refused(lambda: distill(T / 'edit', log=None, **TINY), 'checkpoint.pt', 'step')


@probe('trainers: damaged or edited state')
def finetune_edited_losses_are_named():
    import sd_intro.finetune as ft
    out, kw = T / 'ft-edit', dict(FT, validation_prompts=())   # (validation has its own probe)
    ft.finetune(data(), out, stop_at=1, **kw)
    f = out / 'checkpoints' / 'step-000001' / 'state.json'
    s = json.loads(f.read_text()); s['losses'][0] = 0.001; f.write_text(json.dumps(s))
    return refused(lambda: ft.finetune(data(), out, resume=True, **kw), 'state.json', 'overwrite=True')


@probe('trainers: damaged or edited state')
def finetune_edited_step_is_named():
    import sd_intro.finetune as ft
    out, kw = T / 'ft-edit2', dict(FT, validation_prompts=())   # (validation has its own probe)
    ft.finetune(data(), out, stop_at=1, **kw)
    f = out / 'checkpoints' / 'step-000001' / 'state.json'
    s = json.loads(f.read_text()); s['step'] = 2; f.write_text(json.dumps(s))
    return refused(lambda: ft.finetune(data(), out, resume=True, **kw), 'state.json', 'step')


@probe('trainers: damaged or edited state')
def distill_on_a_missing_gpu_is_clear():
    from sd_intro.distill import distill
    if torch.cuda.is_available(): return True, 'skipped: a GPU is here'
    return refused(lambda: distill(T / 'gpu', device='cuda', log=None, **TINY), "device='cuda'", 'no CUDA GPU')


@probe('trainers: damaged or edited state')
def embedded_truncated_unet_checkpoint_is_named():
    from sd_intro.embedded import build_tokenizer, build_components, train_unet
    work = T / 'emb-trunc'; work.mkdir()
    parts = build_components(_cache.setdefault('tok', build_tokenizer()), seed=0)
    train_unet(parts, work, steps=1, bs=4, n_images=16, ckpt_every=1, eval_every=0, log=None)
    ck = work / 'unet_ckpt.pt'; ck.write_bytes(ck.read_bytes()[:2000])
    parts = build_components(_cache['tok'], seed=0)
    return refused(lambda: train_unet(parts, work, steps=2, bs=4, n_images=16, ckpt_every=1, eval_every=0, log=None),
                   'unet_ckpt.pt', 'delete')


# ---- models used as what they are ----------------------------------------------------------------------------

@probe('models: LCM')
def generate_on_lcm_refuses_12_steps():
    from sd_intro.core import generate
    return refused(lambda: generate(lcm(), PROMPT, num_inference_steps=12, guidance_scale=7.5), 'distilled for')


@probe('models: LCM')
def generate_on_lcm_refuses_50_steps_with_the_lcm_reason():
    from sd_intro.core import generate
    return refused(lambda: generate(lcm(), PROMPT), 'distilled for')


@probe('models: LCM')
def generate_on_lcm_warns_on_guidance_7_5():
    from sd_intro.core import generate
    _, ws = said(lambda: generate(lcm(), PROMPT, num_inference_steps=4))
    return any('baked' in w for w in ws), '; '.join(ws)[:160] or 'no warning'


@probe('models: LCM')
def a_finetune_lora_is_refused_as_an_lcm():
    import sd_intro.finetune as ft
    from sd_intro.distill import lcm_pipeline
    res = ft.finetune(data(), T / 'ft-lora', method='lora', steps=1, batch_size=2, progress=False)
    _cache['tuned'] = res.saved
    return refused(lambda: lcm_pipeline(lora=res.saved), 'not an LCM-LoRA')


@probe('models: records')
def an_lcm_picture_names_its_lora():
    from sd_intro.distill import lcm_generate
    s = lcm_generate(lcm(), PROMPT, num_inference_steps=4).settings[0]
    return 'shapes-lcm-lora' in json.dumps(s), json.dumps(s)[:160]


@probe('models: records')
def an_lcm_picture_replayed_on_the_base_model_warns():
    from sd_intro.core import replay, save_image
    from sd_intro.distill import lcm_generate
    r = lcm_generate(lcm(), PROMPT, num_inference_steps=4)
    p = save_image(r[0], T / 'lcm.png', r.settings[0])
    _, ws = said(lambda: replay(p, base()))
    return any('lcm' in w.lower() for w in ws), '; '.join(ws)[:160] or 'no warning'


@probe('models: records')
def an_lcm_picture_replayed_on_the_lcm_gets_no_wrong_advice():
    from sd_intro.core import replay
    from sd_intro.distill import lcm_generate
    r = lcm_generate(lcm(), PROMPT, num_inference_steps=4)
    out, ws = said(lambda: replay(r.settings[0], lcm()))
    return isinstance(out, Image.Image) and not any('7.5 is usual' in w for w in ws), '; '.join(ws)[:160] or 'clean'


@probe('models: records')
def a_loaded_lora_is_recorded_and_replay_on_the_base_warns():
    from sd_intro.core import generate, load_lora, replay
    if 'tuned' not in _cache: a_finetune_lora_is_refused_as_an_lcm()
    r = generate(load_lora(base(), _cache['tuned']), PROMPT, num_inference_steps=2)
    _, ws = said(lambda: replay(r.settings[0], base()))
    return any('lora' in w.lower() for w in ws), '; '.join(ws)[:160] or 'no warning'


@probe('models: textual inversion')
def ti_refuses_an_existing_word():
    from sd_intro.inside import load_parts, textual_inversion
    return refused(lambda: textual_inversion(load_parts(), data(), token='red', steps=1), 'red')


@probe('models: textual inversion')
def ti_refuses_part_of_a_word():
    from sd_intro.inside import load_parts, textual_inversion
    return refused(lambda: textual_inversion(load_parts(), data(), token='circ', steps=1), 'circle')


# ---- load_parts ----------------------------------------------------------------------------------------------

@probe('load_parts')
def load_parts_missing_folder_is_named():
    from sd_intro.inside import load_parts
    return refused(lambda: load_parts(T / 'no-such-model'), 'no-such-model', kind=FileNotFoundError)


@probe('load_parts')
def load_parts_folder_without_unet_is_named():
    from sd_intro.core import EMBEDDED_MODEL
    from sd_intro.inside import load_parts
    m = T / 'm1'; shutil.copytree(EMBEDDED_MODEL, m); shutil.rmtree(m / 'unet')
    return refused(lambda: load_parts(m), 'unet')


@probe('load_parts')
def load_parts_builds_only_schedulers():
    from sd_intro.core import EMBEDDED_MODEL
    from sd_intro.inside import load_parts
    m = T / 'odd-sched'; shutil.copytree(EMBEDDED_MODEL, m)
    f = m / 'scheduler' / 'scheduler_config.json'
    f.write_text(json.dumps(dict(json.loads(f.read_text()), _class_name='AutoencoderKL')))
    return refused(lambda: load_parts(m), 'AutoencoderKL', 'scheduler')


@probe('load_parts')
def load_parts_prints_no_float32_notes():
    import io, contextlib, logging
    from sd_intro.inside import load_parts
    buf = io.StringIO(); h = logging.StreamHandler(buf)
    lg = logging.getLogger('diffusers'); lg.addHandler(h)
    try:
        with contextlib.redirect_stderr(buf): load_parts()
    finally: lg.removeHandler(h)
    return 'kept in float32' not in buf.getvalue(), buf.getvalue()[:120] or 'quiet'


@probe('load_parts')
def load_parts_on_a_missing_gpu_is_clear():
    from sd_intro.inside import load_parts
    if torch.cuda.is_available(): return True, 'skipped: a GPU is here'
    return refused(lambda: load_parts(device='cuda'), 'no CUDA GPU')


# ---- records from outside ------------------------------------------------------------------------------------

WEBUI = 'a red circle\nNegative prompt: blue\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64'


def _exif_file(fmt):
    exif = Image.Exif(); exif[0x8769] = {0x9286: b'UNICODE\0' + WEBUI.encode('utf-16-be')}
    p = T / f"webui.{fmt.lower()}"; Image.new('RGB', (64, 64), 'white').save(p, format=fmt, exif=exif.tobytes())
    return p


@probe('records')
def webui_jpeg_is_read():
    from sd_intro.core import read_settings
    s, _ = said(lambda: read_settings(_exif_file('JPEG')))
    return isinstance(s, dict) and s.get('seed') == 5, str(s)[:120]


@probe('records')
def webui_webp_is_read():
    from sd_intro.core import read_settings
    s, _ = said(lambda: read_settings(_exif_file('WEBP')))
    return isinstance(s, dict) and s.get('seed') == 5, str(s)[:120]


def _png(text):
    info = PngImagePlugin.PngInfo(); info.add_text('parameters', text)
    p = T / f"r{len(list(T.glob('r*.png')))}.png"; Image.new('RGB', (64, 64)).save(p, pnginfo=info)
    return p


@probe('records')
def clip_skip_99_is_refused_by_field():
    from sd_intro.core import replay
    return refused(lambda: replay(_png('x\nSteps: 2, Seed: 1, Size: 64x64, Clip skip: 99'), base()), 'Clip skip', kind=ValueError)


@probe('records')
def size_4096_is_refused_before_running():
    import time
    from sd_intro.core import replay
    t = time.time()
    ok, d = refused(lambda: replay(_png('x\nSteps: 1, Seed: 1, Size: 4096x4096'), base()), 'Size', kind=ValueError)
    return ok and time.time() - t < 30, d


@probe('records')
def steps_0_is_refused_by_field():
    from sd_intro.core import replay
    return refused(lambda: replay(_png('x\nSteps: 0, Seed: 1, Size: 64x64'), base()), 'Steps', kind=ValueError)


@probe('records')
def a_flow_matching_sampler_is_refused_by_name():
    from sd_intro.core import replay
    return refused(lambda: replay(_png('x\nSteps: 2, Sampler: FlowMatchEulerDiscreteScheduler, Seed: 1, Size: 64x64'),
                                  base()), 'FlowMatchEulerDiscreteScheduler', kind=ValueError)


@probe('records')
def generate_refuses_clip_skip_99():
    from sd_intro.core import generate
    return refused(lambda: generate(base(), PROMPT, num_inference_steps=2, clip_skip=99), 'clip_skip', kind=ValueError)


# ---- threads -------------------------------------------------------------------------------------------------

@probe('threads')
def pipelines_sharing_a_scheduler_are_thread_safe():
    from sd_intro.core import generate, make_scheduler
    a, b = base(), base(); a.scheduler = b.scheduler = make_scheduler('Euler', a.scheduler.config)   # it counts its steps
    jobs = [(p, s, n) for s in range(3) for p, n in ((a, 8), (b, 6))]
    serial = [np.asarray(generate(p, PROMPT, seed=s, num_inference_steps=n, guidance_scale=3)[0]) for p, s, n in jobs]
    got = [None] * len(jobs)
    def run(i): got[i] = np.asarray(generate(jobs[i][0], PROMPT, seed=jobs[i][1], num_inference_steps=jobs[i][2], guidance_scale=3)[0])
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts: t.start()
    for t in ts: t.join()
    wrong = sum(g is None or not np.array_equal(g, s) for g, s in zip(got, serial))
    return wrong == 0, f"{wrong} of {len(jobs)} pictures wrong"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--only', default='', help='run the probes whose class or name contains this')
    ap.add_argument('--skip', default='', help='skip the probes whose name contains this (e.g. a run known to take minutes)')
    a = ap.parse_args()
    import sd_intro
    print(f"sd_intro from {Path(sd_intro.__file__).parent}; work in {T}", flush=True)
    counts = {}
    for cls, name, f in PROBES:
        if a.only and a.only not in cls and a.only not in name: continue
        if a.skip and a.skip in name:
            print(f"skip   {cls:34} {name}", flush=True); continue
        try: ok, detail = f()
        except Exception as e: ok, detail = False, f"probe raised {type(e).__name__}: {str(e)[:140]}"
        c = counts.setdefault(cls, [0, 0]); c[0 if ok else 1] += 1
        print(f"{'holds' if ok else 'FAILS'}  {cls:34} {name:55} {detail}".replace('\n', ' '), flush=True)
    print('\nclass                               holds  fails')
    for cls, (h, f) in counts.items(): print(f"{cls:34} {h:6} {f:6}")
    h, f = (sum(c[i] for c in counts.values()) for i in (0, 1))
    print(f"{'total':34} {h:6} {f:6}")
    shutil.rmtree(T, ignore_errors=True)


if __name__ == '__main__': main()
