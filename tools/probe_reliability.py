"""Probe round of issue 31: bad inputs and faults a new user meets, each judged 'holds' or 'fails'.

The classes starting 'cn/flow' apply them to lesson 8's ControlNet and lesson 9's flow-matching model
(`--only cn/flow` runs just those, about 8 minutes on 2 busy cores).

Usage: PYTHONPATH=<a checkout> python tools/probe_reliability.py [--only WORD]
Runs against whichever `sd_intro` is imported (so the same probes measure an older checkout), on the embedded model, on
the CPU, in a temporary folder; prints one line per probe and the counts per class. Takes a few minutes on 2 cores.
"""
from __future__ import annotations
import argparse, functools, json, os, shutil, sys, tempfile, threading, traceback, warnings
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


@functools.cache
def data():
    import sd_intro.finetune as ft
    return ft.write_shapes_folder(T / 'data', n_new=6, n_old=2, seed=3)


@functools.cache
def lcm():
    from sd_intro.distill import lcm_pipeline
    return lcm_pipeline()


def base():
    from sd_intro.core import load_pipeline
    return load_pipeline()


FT = dict(method='lora', steps=3, checkpoint_every=1, batch_size=2, lr=1e-3, progress=False,
          validation_prompts=['a creature', PROMPT], validation_steps=2)
TINY = dict(steps=3, batch_size=2, n_images=8, anchor_pairs=4, rank=2, ckpt_every=1)


def stopped_distill(out: Path) -> Path:
    "A TINY distillation into `out` stopped during its third step; its work folder (with the checkpoints of steps 1 and 2)."
    from sd_intro.distill import distill
    class Stop(Exception): pass
    def stop(m):
        if m.startswith('step 2'): raise Stop
    try: distill(out, log=stop, **TINY)
    except Stop: pass
    return out.with_name(out.name + '-work')

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
    w = distill(T / 'd-whole', log=None, **TINY)
    stopped_distill(T / 'd-cut')
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
    from sd_intro.training import checkpoints
    work, marker = stopped_distill(T / 'evil'), T / 'ran1'
    for ck in checkpoints(work): torch.save({'optimizer': Evil(marker)}, ck / 'optimizer.pt')
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
    from sd_intro.training import checkpoints
    for ck in checkpoints(stopped_distill(T / 'trunc')): (ck / 'trainable.safetensors').write_bytes((ck / 'trainable.safetensors').read_bytes()[:1000])
    return refused(lambda: distill(T / 'trunc', log=None, **TINY), 'trainable.safetensors', 'delete')


@probe('trainers: damaged or edited state')
def distill_edited_step_is_named():
    from sd_intro.distill import distill
    from sd_intro.training import checkpoints
    for ck in checkpoints(stopped_distill(T / 'edit')):
        f = ck / 'state.json'; st = json.loads(f.read_text()); st['step'] += 1; f.write_text(json.dumps(st))
    return refused(lambda: distill(T / 'edit', log=None, **TINY), 'state.json', 'delete')


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
    ck = work / 'checkpoints' / 'step-000001' / 'trainable.safetensors'; ck.write_bytes(ck.read_bytes()[:2000])
    parts = build_components(_cache['tok'], seed=0)
    return refused(lambda: train_unet(parts, work, steps=2, bs=4, n_images=16, ckpt_every=1, eval_every=0, log=None),
                   'trainable.safetensors', 'delete')


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


# ---- ControlNet and flow matching (lessons 8 and 9) ------------------------------------------------------------

CN = dict(steps=2, batch_size=2, checkpoint_every=1, validation_images=2, validation_steps=2, progress=False, warmup_steps=1)
FLOW = dict(steps=2, batch_size=2, n_images=8, checkpoint_every=1, validation_steps=1, warmup_steps=1)
STAR_PROMPT = 'a red star on a blue background'


@functools.cache
def cpipe():
    from sd_intro.controlnet import controlnet_pipeline
    return controlnet_pipeline(base())


@functools.cache
def flow():
    from sd_intro.flow_models import load_flow
    return load_flow()


def star():
    from sd_intro.shapes import Scene
    from sd_intro.controls import silhouette
    return silhouette(Scene('star', 'white', 'black', x=0.5, y=0.45, size=0.3))


def _quiet(f):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); return f()


@probe('cn/flow: resume')
def controlnet_stop_and_resume_with_validation_is_bit_identical():
    from safetensors.torch import load_file
    from sd_intro.controlnet import train_controlnet
    _quiet(lambda: train_controlnet(T / 'cn-whole', **CN))
    _quiet(lambda: train_controlnet(T / 'cn-cut', stop_at=1, **CN))
    try: _quiet(lambda: train_controlnet(T / 'cn-cut', resume=True, **CN))
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    a, b = (load_file(str(p / 'controlnet' / 'diffusion_pytorch_model.safetensors')) for p in (T / 'cn-whole', T / 'cn-cut'))
    va, vb = ({q.name: np.asarray(Image.open(q)) for q in sorted((p / 'validation').glob('*.png'))} for p in (T / 'cn-whole', T / 'cn-cut'))
    same = all(torch.equal(a[k], b[k]) for k in a) and list(va) == list(vb) and all(np.array_equal(va[k], vb[k]) for k in va)
    return same and len(va) == 3, f"weights and {len(va)} validation strips equal"


@probe('cn/flow: resume')
def flow_stop_and_resume_with_validation_is_bit_identical():
    from sd_intro.flow import train_flow
    train_flow(T / 'fl-whole', log=None, **FLOW)
    train_flow(T / 'fl-cut', stop_at=1, log=None, **FLOW)
    try: train_flow(T / 'fl-cut', log=None, **FLOW)
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    f = lambda p: (p / 'model' / 'unet' / 'diffusion_pytorch_model.safetensors').read_bytes()
    v = lambda p: {q.name: q.read_bytes() for q in sorted((p / 'validation').glob('*.png'))}
    return f(T / 'fl-whole') == f(T / 'fl-cut') and v(T / 'fl-whole') == v(T / 'fl-cut'), 'weights and validation pictures equal'


@probe('cn/flow: resume')
def a_finished_flow_run_run_again_says_so():
    from sd_intro.flow import train_flow
    if not (T / 'fl-whole' / 'model').exists(): train_flow(T / 'fl-whole', log=None, **FLOW)
    lines = []
    try: r = train_flow(T / 'fl-whole', log=lines.append, **FLOW)
    except Exception as e: return 'finished' in str(e) or 'already' in str(e), f"{type(e).__name__}: {str(e)[:120]}"
    return any('finished' in l or 'already' in l for l in lines), '; '.join(lines)[:160] or 'ran again without a word'


def _kill_when(cmd, mark, timeout=600):
    "Run `cmd` in a fresh process and kill -9 it as soon as `mark` exists (or when it ends by itself)."
    import subprocess, signal, time as _t
    p = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = _t.time()
    while not mark.exists() and p.poll() is None and _t.time() - t < timeout: _t.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()


@probe('cn/flow: resume')
def controlnet_killed_while_validating_resumes_bit_identically():
    from safetensors.torch import load_file
    from sd_intro.controlnet import train_controlnet
    if not (T / 'cn-whole' / 'controlnet').exists(): _quiet(lambda: train_controlnet(T / 'cn-whole', **CN))
    out = T / 'cn-kill'
    args = [sys.executable, '-m', 'sd_intro.controlnet', '--out', str(out), '--threads', '1', '--no-progress'] + \
           [a for k, v in CN.items() if k != 'progress' for a in ('--' + k.replace('_', '-'), str(v))]
    _kill_when(args, out / 'validation' / 'step-000001.png')   # killed with the step-1 strip written, its checkpoint maybe not
    if (out / 'controlnet').exists(): return False, 'the run finished before the kill'
    try: _quiet(lambda: train_controlnet(out, resume=True, **CN))
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    a, b = (load_file(str(p / 'controlnet' / 'diffusion_pytorch_model.safetensors')) for p in (T / 'cn-whole', out))
    va, vb = ({q.name: np.asarray(Image.open(q)) for q in sorted((p / 'validation').glob('*.png'))} for p in (T / 'cn-whole', out))
    same = all(torch.equal(a[k], b[k]) for k in a) and list(va) == list(vb) and all(np.array_equal(va[k], vb[k]) for k in va)
    return same, 'weights and validation strips equal' if same else 'differ'


@probe('cn/flow: resume')
def flow_killed_while_validating_resumes_bit_identically():
    from sd_intro.flow import train_flow
    if not (T / 'fl-whole' / 'model').exists(): train_flow(T / 'fl-whole', log=None, **FLOW)
    out = T / 'fl-kill'
    args = [sys.executable, '-m', 'sd_intro.flow', '--out', str(out), '--threads', '1'] + \
           [a for k, v in FLOW.items() for a in ('--' + k.replace('_', '-'), str(v))]
    _kill_when(args, out / 'validation' / 'step-000001.png')
    if (out / 'model').exists(): return False, 'the run finished before the kill'
    try: train_flow(out, log=None, **FLOW)
    except Exception as e: return False, f"{type(e).__name__}: {str(e)[:120]}"
    f = lambda p: (p / 'model' / 'unet' / 'diffusion_pytorch_model.safetensors').read_bytes()
    v = lambda p: {q.name: q.read_bytes() for q in sorted((p / 'validation').glob('*.png'))}
    same = f(T / 'fl-whole') == f(out) and v(T / 'fl-whole') == v(out)
    return same, 'weights and validation pictures equal' if same else 'differ'


@probe('cn/flow: files')
def controlnet_run_keeps_users_run_json():
    from sd_intro.controlnet import train_controlnet
    out = T / 'cn-user'; out.mkdir(); (out / 'run.json').write_text('mine'); (out / 'history.json').write_text('mine')
    try: _quiet(lambda: train_controlnet(out, **dict(CN, steps=1, validation_images=0)))
    except Exception as e: return all((out / f).read_text() == 'mine' for f in ('run.json', 'history.json')), f"refused: {str(e)[:100]}"
    kept = [f for f in ('run.json', 'history.json') if (out / f).read_text() == 'mine']
    return len(kept) == 2, f"kept {kept}"


@probe('cn/flow: files')
def controlnet_overwrite_keeps_a_folder_of_user_files():
    from sd_intro.controlnet import train_controlnet
    out = T / 'cn-user2'; (out / 'validation').mkdir(parents=True)
    for f in ('validation.png', 'history.json', 'run.json', 'validation/step-000001.png', 'thesis.tex'): (out / f).write_text('mine')
    try: _quiet(lambda: train_controlnet(out, overwrite=True, **dict(CN, steps=1, validation_images=0)))
    except Exception as e: pass
    gone = [f for f in ('validation.png', 'history.json', 'run.json', 'validation/step-000001.png', 'thesis.tex')
            if not (out / f).exists() or (out / f).read_bytes() != b'mine']
    return not gone, f"lost or replaced {gone}" if gone else 'all kept'


@probe('cn/flow: files')
def save_flow_model_keeps_a_folder_of_user_files():
    from sd_intro.flow import save_flow_model
    out = T / 'docs'; out.mkdir(); (out / 'thesis.tex').write_text('mine')
    try: save_flow_model(flow().unet, out)
    except Exception as e: return (out / 'thesis.tex').exists(), f"refused: {str(e)[:100]}"
    return (out / 'thesis.tex').exists(), 'kept' if (out / 'thesis.tex').exists() else 'thesis.tex deleted'


@probe('cn/flow: files')
def a_rerun_flow_run_keeps_a_model_card():
    from sd_intro.flow import train_flow
    if not (T / 'fl-whole' / 'model').exists(): train_flow(T / 'fl-whole', log=None, **FLOW)
    (T / 'fl-whole' / 'model' / 'README.md').write_text('card')
    try: train_flow(T / 'fl-whole', log=None, **FLOW)
    except Exception: pass
    return (T / 'fl-whole' / 'model' / 'README.md').exists(), 'README.md kept' if (T / 'fl-whole' / 'model' / 'README.md').exists() else 'deleted'


@probe('cn/flow: pickles')
def controlnet_optimizer_file_is_not_unpickled():
    from sd_intro.controlnet import train_controlnet
    out, marker = T / 'cn-evil', T / 'ran-cn'
    _quiet(lambda: train_controlnet(out, stop_at=1, **dict(CN, validation_images=0)))
    for ck in (out / 'checkpoints').glob('step-*'): torch.save({'optimizer': Evil(marker)}, ck / 'optimizer.pt')
    try: _quiet(lambda: train_controlnet(out, resume=True, **dict(CN, validation_images=0)))
    except Exception: pass
    return not marker.exists(), 'no code ran' if not marker.exists() else 'the crafted pickle ran'


@probe('cn/flow: pickles')
def load_controlnet_refuses_a_pickled_bin():
    from sd_intro.controlnet import load_controlnet, CONTROLNET_MODEL
    d, marker = T / 'cn-bin', T / 'ran-cn2'; d.mkdir()
    shutil.copy(Path(CONTROLNET_MODEL) / 'config.json', d)
    torch.save({'x': Evil(marker)}, d / 'diffusion_pytorch_model.bin')
    ok, detail = refused(lambda: load_controlnet(d), 'safetensors')
    return ok and not marker.exists(), detail


@probe('cn/flow: pickles')
def flow_optimizer_file_is_not_unpickled():
    from sd_intro.flow import train_flow
    out, marker = T / 'fl-evil', T / 'ran-fl'
    train_flow(out, stop_at=1, log=None, **FLOW)
    for ck in (out / 'checkpoints').glob('step-*'): torch.save({'optimizer': Evil(marker)}, ck / 'optimizer.pt')
    try: train_flow(out, log=None, **FLOW)
    except Exception: pass
    return not marker.exists(), 'no code ran' if not marker.exists() else 'the crafted pickle ran'


@probe('cn/flow: damaged or edited state')
def controlnet_edited_losses_are_named():
    from sd_intro.controlnet import train_controlnet
    out, kw = T / 'cn-edit', dict(CN, validation_images=0, keep_checkpoints=1)
    _quiet(lambda: train_controlnet(out, stop_at=1, **kw))
    f = next((out / 'checkpoints').glob('step-*')) / 'state.json'
    s = json.loads(f.read_text()); s['losses'][0] = 0.001; f.write_text(json.dumps(s))
    return refused(lambda: train_controlnet(out, resume=True, **kw), 'state.json', 'overwrite=True')


@probe('cn/flow: damaged or edited state')
def controlnet_truncated_weights_are_named():
    from sd_intro.controlnet import train_controlnet
    out, kw = T / 'cn-trunc', dict(CN, validation_images=0, keep_checkpoints=1)
    _quiet(lambda: train_controlnet(out, stop_at=1, **kw))
    f = next((out / 'checkpoints').glob('step-*')) / 'trainable.safetensors'; f.write_bytes(f.read_bytes()[:500])
    return refused(lambda: train_controlnet(out, resume=True, **kw), 'trainable.safetensors', 'overwrite=True')


@probe('cn/flow: damaged or edited state')
def flow_edited_step_is_named():
    from sd_intro.flow import train_flow
    out = T / 'fl-edit'; train_flow(out, stop_at=1, log=None, **dict(FLOW, keep_checkpoints=1))
    f = out / 'checkpoints' / 'step-000001' / 'state.json'
    s = json.loads(f.read_text()); s['step'] = 2; f.write_text(json.dumps(s))
    return refused(lambda: train_flow(out, log=None, **FLOW), 'step-000001', 'another --out')


@probe('cn/flow: damaged or edited state')
def flow_damaged_config_json_is_named():
    from sd_intro.flow import train_flow
    out = T / 'fl-conf'; train_flow(out, stop_at=1, log=None, **FLOW)
    (out / 'config.json').write_text('{"kind": "sd_intro.fl')
    return refused(lambda: train_flow(out, log=None, **FLOW), 'config.json')


@probe('cn/flow: damaged or edited state')
def run_lock_names_a_controlnet_run():
    import subprocess, time as _t
    out = T / 'cn-locked'
    code = ("import torch; torch.set_num_threads(1); from sd_intro.controlnet import train_controlnet; "
            f"train_controlnet({str(out)!r}, steps=100000, batch_size=1, checkpoint_every=None, validation_images=0, progress=False)")
    p = subprocess.Popen([sys.executable, '-c', code], env=dict(os.environ, OMP_NUM_THREADS='1'),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t = _t.time()
        while not (out / 'run.json').exists() and _t.time() - t < 120 and p.poll() is None: _t.sleep(0.1)
        from sd_intro.controlnet import train_controlnet
        ok, d = refused(lambda: train_controlnet(out, **CN), 'in use', kind=RuntimeError)
        return ok and 'fine-tuning' not in d and 'ControlNet' in d, d
    finally: p.kill(); p.wait()


@probe('cn/flow: damaged or edited state')
def run_lock_names_a_flow_run():
    from sd_intro.flow import train_flow
    out, got = T / 'fl-locked', {}
    def log(m):
        if 'e' not in got:
            try: train_flow(out, log=None, **FLOW); got['e'] = None
            except Exception as e: got['e'] = e
    train_flow(out, log=log, **dict(FLOW, steps=1))
    e = got.get('e')
    d = f"{type(e).__name__}: {str(e)[:160]}"
    return isinstance(e, RuntimeError) and 'fine-tuning' not in str(e) and 'flow' in str(e), d


@probe('cn/flow: models')
def controlnet_for_another_unet_is_refused():
    from diffusers import UNet2DConditionModel
    from sd_intro.controlnet import controlnet_pipeline, make_controlnet
    b = base()
    other = UNet2DConditionModel.from_config({**b.unet.config, 'block_out_channels': [c * 2 for c in b.unet.config.block_out_channels]})
    return refused(lambda: controlnet_pipeline(b, make_controlnet(other)), 'another UNet')


@probe('cn/flow: models')
def the_ddpm_controlnet_on_the_flow_model_is_refused():
    from sd_intro.controlnet import controlnet_pipeline
    out, ws = said(lambda: generate_cn(controlnet_pipeline(flow())))
    if isinstance(out, Exception): return 'flow' in str(out), f"{type(out).__name__}: {str(out)[:160]}"
    return any('flow' in w for w in ws), '; '.join(ws)[:160] or 'ran without a word'


def generate_cn(p, **kw):
    from sd_intro.core import generate
    return generate(p, STAR_PROMPT, **{'image': star(), 'num_inference_steps': 2, **kw})


@probe('cn/flow: models')
def control_image_missing_is_named():
    return refused(lambda: generate_cn(cpipe(), image=None), 'image=')


@probe('cn/flow: models')
def control_image_of_another_size_is_named():
    return refused(lambda: generate_cn(cpipe(), image=star().resize((128, 128))), '128x128', 'resize')


@probe('cn/flow: models')
def control_image_tensor_of_another_size_is_named():
    t = torch.zeros(1, 3, 32, 32)
    return refused(lambda: generate_cn(cpipe(), image=t), '32')


@probe('cn/flow: models')
def control_image_with_transparency_is_named():
    return refused(lambda: generate_cn(cpipe(), image=star().convert('RGBA')), 'transparency')


@probe('cn/flow: models')
def control_image_cmyk_is_named():
    return refused(lambda: generate_cn(cpipe(), image=star().convert('CMYK')), 'CMYK')


@probe('cn/flow: models')
def conditioning_scale_negative_is_refused():
    return refused(lambda: generate_cn(cpipe(), controlnet_conditioning_scale=-0.5), 'controlnet_conditioning_scale')


@probe('cn/flow: models')
def conditioning_scale_nan_is_refused():
    return refused(lambda: generate_cn(cpipe(), controlnet_conditioning_scale=float('nan')), 'controlnet_conditioning_scale')


@probe('cn/flow: models')
def conditioning_scale_far_out_of_range_warns():
    out, ws = said(lambda: generate_cn(cpipe(), controlnet_conditioning_scale=50))
    if isinstance(out, Exception): return 'controlnet_conditioning_scale' in str(out), str(out)[:160]
    return any('controlnet_conditioning_scale' in w for w in ws), '; '.join(ws)[:160] or 'ran without a word'


@probe('cn/flow: models')
def control_guidance_start_after_end_is_named():
    return refused(lambda: generate_cn(cpipe(), control_guidance_start=0.8, control_guidance_end=0.2), 'guidance start')


@probe('cn/flow: models')
def flow_model_with_a_ddpm_scheduler_is_refused():
    from diffusers import DDIMScheduler
    from sd_intro.core import generate, load_pipeline
    p = load_pipeline(flow()); p.scheduler = DDIMScheduler.from_config(base().scheduler.config)
    out, ws = said(lambda: generate(p, PROMPT, num_inference_steps=2))
    if isinstance(out, Exception): return 'flow' in str(out).lower(), f"{type(out).__name__}: {str(out)[:160]}"
    return any('flow' in w.lower() for w in ws), '; '.join(ws)[:160] or 'ran without a word'


@probe('cn/flow: models')
def flow_pipeline_refuses_a_ddpm_scheduler():
    from sd_intro.flow_models import flow_pipeline
    return refused(lambda: flow_pipeline(base(), flow().unet, base().scheduler), 'FlowMatchEulerDiscreteScheduler', kind=TypeError)


@probe('cn/flow: models')
def lcm_pipeline_on_the_flow_model_is_refused():
    from sd_intro.distill import lcm_pipeline
    return refused(lambda: lcm_pipeline(flow()), 'flow')


@probe('cn/flow: models')
def the_lcm_lora_on_the_flow_model_is_refused():
    from sd_intro.core import load_lora, load_pipeline, generate
    from sd_intro.distill import LCM_LORA
    out, ws = said(lambda: generate(load_lora(load_pipeline(flow()), LCM_LORA), PROMPT, num_inference_steps=2))
    if isinstance(out, Exception): return 'flow' in str(out).lower(), f"{type(out).__name__}: {str(out)[:160]}"
    return any('flow' in w.lower() for w in ws), '; '.join(ws)[:160] or 'ran without a word'


@probe('cn/flow: models')
def with_shift_on_a_ddpm_pipeline_is_refused():
    from sd_intro.flow_models import with_shift
    return refused(lambda: with_shift(base(), 2.0), 'shift', kind=TypeError)


@probe('cn/flow: records')
def a_flow_record_replays_on_the_flow_model():
    from sd_intro.core import generate, replay, save_image
    r = generate(flow(), PROMPT, seed=2, num_inference_steps=4)
    p = save_image(r[0], T / 'flow.png', r.settings[0])
    out, ws = said(lambda: replay(p, flow()))
    if isinstance(out, Exception): return False, f"{type(out).__name__}: {str(out)[:160]}"
    return np.array_equal(np.asarray(out), np.asarray(r[0])) and not ws, '; '.join(ws)[:120] or 'equal, no warning'


@probe('cn/flow: records')
def a_flow_record_replayed_on_the_ddpm_model_is_refused():
    from sd_intro.core import generate, replay
    r = generate(flow(), PROMPT, seed=2, num_inference_steps=2)
    out, ws = said(lambda: replay(r.settings[0], base()))
    if isinstance(out, Exception): return 'flow' in str(out).lower(), f"{type(out).__name__}: {str(out)[:160]}"
    return False, 'replayed: ' + ('; '.join(ws)[:140] or 'no warning')


@probe('cn/flow: records')
def a_ddpm_record_replayed_on_the_flow_model_is_refused():
    from sd_intro.core import generate, replay
    r = generate(base(), PROMPT, seed=2, num_inference_steps=2)
    out, ws = said(lambda: replay(r.settings[0], flow()))
    if isinstance(out, Exception): return 'flow' in str(out).lower(), f"{type(out).__name__}: {str(out)[:160]}"
    return False, 'replayed: ' + ('; '.join(ws)[:140] or 'no warning')


@probe('cn/flow: records')
def a_shifted_flow_picture_replays_to_itself():
    from sd_intro.core import generate, replay
    from sd_intro.flow_models import with_shift
    r = generate(with_shift(flow(), 3.0), PROMPT, seed=2, num_inference_steps=4)
    out, ws = said(lambda: replay(r.settings[0], flow()))
    if isinstance(out, Exception): return 'shift' in str(out), f"{type(out).__name__}: {str(out)[:160]}"
    same = np.array_equal(np.asarray(out), np.asarray(r[0]))
    return same or any('shift' in w for w in ws), 'equal' if same else ('; '.join(ws)[:140] or 'another picture, no warning')


@probe('cn/flow: records')
def an_even_steps_flow_picture_replays_to_itself():
    from sd_intro.core import generate, replay
    from sd_intro.flow_models import even_steps
    r = generate(even_steps(flow()), PROMPT, seed=2, num_inference_steps=4)
    out, ws = said(lambda: replay(r.settings[0], flow()))
    if isinstance(out, Exception): return 'even' in str(out) or 'sigmas' in str(out), f"{type(out).__name__}: {str(out)[:160]}"
    same = np.array_equal(np.asarray(out), np.asarray(r[0]))
    return same or bool(ws), 'equal' if same else ('; '.join(ws)[:140] or 'another picture, no warning')


@probe('cn/flow: records')
def a_flow_img2img_record_gets_the_right_advice():
    from sd_intro.core import replay
    from sd_intro.flow_models import flow_img2img
    start = Image.new('RGB', (64, 64), (200, 30, 30))
    r = _quiet(lambda: flow_img2img(flow(), start, PROMPT, strength=0.6, num_inference_steps=5))
    out, ws = said(lambda: replay(r.settings[0], flow(), image=start))
    if isinstance(out, Exception): return 'flow_img2img' in str(out), f"{type(out).__name__}: {str(out)[:160]}"
    return np.array_equal(np.asarray(out), np.asarray(r[0])), 'replayed'


@probe('cn/flow: records')
def a_controlnet_record_round_trips_its_control_settings():
    from sd_intro.core import read_settings, save_image
    from sd_intro.controlnet import save_controlled, replay_controlled
    r = generate_cn(cpipe(), controlnet_conditioning_scale=0.7, control_guidance_end=0.5)
    png, _ = save_controlled(r[0], T / 'cn.png', r.settings[0], star())
    back = read_settings(png)
    keys = ('controlnet', 'control', 'control_scale', 'control_guidance_end')
    same = all(back.get(k) == r.settings[0].get(k) for k in keys)
    out = replay_controlled(png, cpipe())
    return same and np.array_equal(np.asarray(out), np.asarray(r[0])), f"{ {k: back.get(k) for k in keys} }"


@probe('cn/flow: records')
def a_controlnet_record_out_of_range_is_refused_by_field():
    from sd_intro.core import replay
    return refused(lambda: replay(_png(f'x\nSteps: 2, Seed: 1, Size: 64x64, ControlNet: shapes-controlnet, Control: c0, '
                                       f'Control scale: -3'), cpipe(), control_image=star()), 'Control scale', kind=ValueError)


@probe('cn/flow: records')
def a_webui_controlnet_record_is_not_called_plain():
    from sd_intro.core import replay
    text = ('x\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, ControlNet 0: "Module: canny, '
            'Model: control_sd15_canny [fef5e48e], Weight: 1, Resize Mode: Crop and Resize"')
    out, ws = said(lambda: replay(_png(text), cpipe(), control_image=star()))
    msg = str(out) if isinstance(out, Exception) else '; '.join(ws)
    return 'made without a ControlNet' not in msg and 'ControlNet' in msg, msg[:160]


@probe('cn/flow: records')
def a_controlnet_record_replayed_on_a_plain_pipeline_is_refused():
    from sd_intro.core import replay
    r = generate_cn(cpipe())
    return refused(lambda: replay(r.settings[0], base()), 'ControlNet pipeline', kind=ValueError)


@probe('cn/flow: models')
def controlnet_training_on_the_flow_model_is_refused():
    from sd_intro.controlnet import train_controlnet
    out = T / 'cn-on-flow'
    return refused(lambda: _quiet(lambda: train_controlnet(out, model=flow(), **dict(CN, steps=1, validation_images=0))), 'flow')


@probe('cn/flow: models')
def finetuning_the_flow_model_is_refused():
    import sd_intro.finetune as ft
    return refused(lambda: _quiet(lambda: ft.finetune(data(), T / 'ft-on-flow', model=flow(), **dict(FT, steps=1, validation_prompts=()))), 'flow')


@probe('cn/flow: models')
def distilling_the_flow_model_is_refused():
    from sd_intro.distill import distill
    from sd_intro.flow_models import FLOW_MODEL
    return refused(lambda: _quiet(lambda: distill(T / 'd-on-flow', model=FLOW_MODEL, log=None, **dict(TINY, steps=1))), 'load_flow')


@probe('cn/flow: load')
def load_pipeline_on_a_flow_folder_names_load_flow():
    from sd_intro.core import load_pipeline
    from sd_intro.flow_models import FLOW_MODEL
    return refused(lambda: load_pipeline(FLOW_MODEL), 'load_flow')


@probe('cn/flow: damaged or edited state')
def flow_edited_latent_cache_is_named():
    from sd_intro.flow import train_flow
    out = T / 'fl-lat'; train_flow(out, stop_at=1, log=None, **FLOW)
    m = json.loads((out / 'latents.json').read_text()); m['scenes'][0]['x'] = round(m['scenes'][0]['x'] + 0.01, 4)
    (out / 'latents.json').write_text(json.dumps(m))
    return refused(lambda: train_flow(out, log=None, **FLOW), 'latents', 'delete')


@probe('cn/flow: load')
def load_controlnet_missing_folder():
    from sd_intro.controlnet import load_controlnet
    return refused(lambda: load_controlnet(T / 'no-cn'), 'no-cn', kind=FileNotFoundError)


@probe('cn/flow: load')
def load_controlnet_pipeline_folder():
    from sd_intro.core import EMBEDDED_MODEL
    from sd_intro.controlnet import load_controlnet
    return refused(lambda: load_controlnet(EMBEDDED_MODEL), 'config.json')


@probe('cn/flow: load')
def load_controlnet_a_unet_folder():
    from sd_intro.core import EMBEDDED_MODEL
    from sd_intro.controlnet import load_controlnet
    return refused(lambda: load_controlnet(Path(EMBEDDED_MODEL) / 'unet'), 'ControlNet')


@probe('cn/flow: load')
def load_controlnet_damaged_config():
    from sd_intro.controlnet import load_controlnet, CONTROLNET_MODEL
    d = T / 'cn-badconf'; shutil.copytree(CONTROLNET_MODEL, d); (d / 'config.json').write_text('{"_class')
    return refused(lambda: load_controlnet(d), 'config.json')


@probe('cn/flow: load')
def load_controlnet_truncated_weights():
    from sd_intro.controlnet import load_controlnet, CONTROLNET_MODEL
    d = T / 'cn-trunc-w'; shutil.copytree(CONTROLNET_MODEL, d)
    f = d / 'diffusion_pytorch_model.safetensors'; f.write_bytes(f.read_bytes()[:2000])
    return refused(lambda: load_controlnet(d), 'diffusion_pytorch_model.safetensors')


@probe('cn/flow: load')
def load_controlnet_offline_hub_id():
    from sd_intro.controlnet import load_controlnet
    return refused(lambda: load_controlnet('nobody/no-such-controlnet'), 'nobody/no-such-controlnet')


@probe('cn/flow: load')
def load_flow_truncated_weights():
    from sd_intro.flow_models import load_flow, FLOW_MODEL
    d = T / 'fl-trunc-w'; shutil.copytree(FLOW_MODEL, d)
    f = d / 'unet' / 'diffusion_pytorch_model.safetensors'; f.write_bytes(f.read_bytes()[:2000])
    return refused(lambda: load_flow(d), 'diffusion_pytorch_model.safetensors')


@probe('cn/flow: load')
def load_flow_damaged_unet_config():
    from sd_intro.flow_models import load_flow, FLOW_MODEL
    d = T / 'fl-badconf'; shutil.copytree(FLOW_MODEL, d); (d / 'unet' / 'config.json').write_text('{"_cl')
    return refused(lambda: load_flow(d), 'config.json')


@probe('cn/flow: load')
def load_flow_a_ddpm_model_folder():
    from sd_intro.core import EMBEDDED_MODEL
    from sd_intro.flow_models import load_flow
    return refused(lambda: load_flow(EMBEDDED_MODEL), 'not a flow model')


@probe('cn/flow: load')
def load_flow_on_a_missing_gpu_is_clear():
    from sd_intro.flow_models import load_flow
    if torch.cuda.is_available(): return True, 'skipped: a GPU is here'
    return refused(lambda: load_flow(device='cuda'), 'CUDA')


@probe('cn/flow: threads')
def base_and_controlnet_pipelines_in_threads():
    from sd_intro.core import generate
    jobs = [(p, s) for s in range(3) for p in (base(), cpipe())]
    kw = lambda p: dict(image=star()) if p is cpipe() else {}
    serial = [np.asarray(generate(p, STAR_PROMPT, seed=s, num_inference_steps=4, **kw(p))[0]) for p, s in jobs]
    got = [None] * len(jobs)
    def run(i): got[i] = np.asarray(generate(jobs[i][0], STAR_PROMPT, seed=jobs[i][1], num_inference_steps=4, **kw(jobs[i][0]))[0])
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts: t.start()
    for t in ts: t.join()
    wrong = sum(g is None or not np.array_equal(g, s) for g, s in zip(got, serial))
    return wrong == 0, f"{wrong} of {len(jobs)} pictures wrong"


@probe('cn/flow: threads')
def flow_and_its_shifted_copy_in_threads():
    from sd_intro.core import generate
    from sd_intro.flow_models import with_shift, even_steps
    pipes = [flow(), with_shift(flow(), 3.0), even_steps(flow())]
    jobs = [(p, s) for s in range(2) for p in pipes]
    serial = [np.asarray(generate(p, PROMPT, seed=s, num_inference_steps=4)[0]) for p, s in jobs]
    got = [None] * len(jobs)
    def run(i): got[i] = np.asarray(generate(jobs[i][0], PROMPT, seed=jobs[i][1], num_inference_steps=4)[0])
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts: t.start()
    for t in ts: t.join()
    wrong = sum(g is None or not np.array_equal(g, s) for g, s in zip(got, serial))
    return wrong == 0, f"{wrong} of {len(jobs)} pictures wrong"


@probe('cn/flow: threads')
def iou_by_step_while_another_thread_generates():
    from sd_intro.core import generate
    from sd_intro.controlnet import train_controlnet
    from sd_intro.controls import iou_by_step, heldout_controls
    if not (T / 'cn-whole' / 'controlnet').exists(): _quiet(lambda: train_controlnet(T / 'cn-whole', **CN))
    cp = cpipe()
    serial = [np.asarray(generate_cn(cp, seed=s)[0]) for s in range(6)]
    _, controls, prompts = heldout_controls(2)
    got = [None] * 6
    def gen():
        for s in range(6): got[s] = np.asarray(generate_cn(cp, seed=s)[0])
    t1 = threading.Thread(target=lambda: iou_by_step(cp, T / 'cn-whole', controls, prompts, num_inference_steps=2))
    t2 = threading.Thread(target=gen)
    t1.start(); t2.start(); t1.join(); t2.join()
    wrong = sum(g is None or not np.array_equal(g, s) for g, s in zip(got, serial))
    return wrong == 0, f"{wrong} of 6 pictures wrong"


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
