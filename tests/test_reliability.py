"Reliability round 3 (issue 17): nothing a user made is lost, fresh pipelines are fresh, records are data, web-UI PNGs replay, clear parse and dataset errors."
import base64, json, os, re, subprocess, sys, threading, time, warnings
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import sd_intro.core as core
import sd_intro.finetune as ft
from sd_intro.core import generate, load_pipeline, read_settings, replay, save_image
from sd_intro.img2img import Hop, load_image, replay_chain, run_chain, ResizeNote

FAST = dict(batch_size=4, lr=1e-3, progress=False)
PROMPT = 'a red circle on a blue background'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return ft.write_shapes_folder(tmp_path_factory.mktemp('data') / 'creatures', n_new=6, n_old=2, seed=3)


def _png(path, text):
    info = PngImagePlugin.PngInfo(); info.add_text('parameters', text)
    Image.new('RGB', (64, 64), 'white').save(path, pnginfo=info)
    return path


# ---- 1. nothing a user made is lost --------------------------------------------------------------------------

def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_runs_lock_ends_with_it(folder, tmp_path):
    out = tmp_path / 'run'; out.mkdir()
    code = f"from sd_intro.training import run_lock\nimport time\nwith run_lock({str(out)!r}): print('held', flush=True); time.sleep(120)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS='1'))
    try:
        assert other.stdout.readline() == 'held\n'
        with pytest.raises(RuntimeError, match=rf'in use by another training run \(process {other.pid} on '):
            ft.finetune(folder, out, method='lora', steps=1, **FAST)
        assert not (out / 'lora').exists()
    finally: other.kill(); other.wait()   # killed with SIGKILL: its operating-system lock ends with it
    res = ft.finetune(folder, out, method='lora', steps=1, **FAST)   # nothing to take over, nothing to clean
    assert res.saved is not None and not (out / '.sd_intro.lock.json').exists()   # released when done


def test_overwrite_removes_only_what_runs_wrote(folder, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(folder, out, method='lora', steps=2, stop_at=1, validation_prompts=['a creature'], validation_steps=2, **FAST)
    (out / 'validation' / 'my-notes.txt').write_text('mine')
    (out / 'checkpoints' / 'README').write_text('mine too')
    ft.finetune(folder, out, method='lora', steps=1, overwrite=True, **FAST)
    assert (out / 'validation' / 'my-notes.txt').read_text() == 'mine' and (out / 'checkpoints' / 'README').exists()
    assert not list((out / 'checkpoints').glob('step-*'))


@pytest.mark.parametrize('where', ['same', 'inside'])
def test_data_folder_as_run_folder_is_refused(folder, where):
    before = sorted(p.name for p in folder.iterdir())
    out = folder if where == 'same' else folder / 'run'
    with pytest.raises(ValueError, match='are the same folder' if where == 'same' else 'lie one inside the other'):
        ft.finetune(folder, out, method='lora', steps=1, **FAST)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_resume_with_other_data_names_the_change_and_needs_asking(folder, tmp_path):
    other = ft.write_shapes_folder(tmp_path / 'other', n_new=6, n_old=2, seed=4)
    out = tmp_path / 'run'
    ft.finetune(folder, out, method='lora', steps=2, stop_at=1, **FAST)
    with pytest.raises(ValueError, match=r"cannot resume: .*'data'.*resume_changed=True"):
        ft.finetune(other, out, method='lora', steps=2, resume=True, **FAST)
    with pytest.warns(UserWarning, match=r"resume_changed=True: resuming although .*'data'"):
        res = ft.finetune(other, out, method='lora', steps=2, resume=True, resume_changed=True, **FAST)
    assert res.saved is not None and len(res.losses) == 2


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(folder, tmp_path):
    kw = dict(method='lora', steps=3, checkpoint_every=1, **FAST)
    whole = ft.finetune(folder, tmp_path / 'whole', **kw)
    out = tmp_path / 'run'
    ft.finetune(folder, out, stop_at=2, **kw)
    f = out / 'checkpoints' / 'step-000002' / 'trainable.safetensors'
    f.write_bytes(f.read_bytes()[:100])                      # cut short, as by a full disk outside our control
    with pytest.warns(UserWarning, match=r'step-000002: trainable.safetensors is damaged.*from the previous complete one, step-000001'):
        res = ft.finetune(folder, out, resume=True, **kw)
    assert res.losses == whole.losses


def test_save_image_from_threads_onto_one_path_and_onto_a_folder(tmp_path):
    imgs = [Image.new('RGB', (64, 64), (i * 30, 0, 0)) for i in range(8)]
    errors = []
    def save(i):
        try:
            for _ in range(10): save_image(imgs[i], tmp_path / 'x.png', dict(prompt=f'p{i}', seed=i, steps=20, width=64, height=64))
        except Exception as e: errors.append(e)
    ts = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors, errors[:2]
    s = read_settings(tmp_path / 'x.png')
    assert np.asarray(Image.open(tmp_path / 'x.png'))[0, 0, 0] == int(s['prompt'][1:]) * 30   # one whole write
    assert [p.name for p in tmp_path.iterdir()] == ['x.png']                                   # no temporary files left
    (tmp_path / 'd.png').mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.png' is a folder") as e: save_image(imgs[0], tmp_path / 'd.png', {})
    assert '.tmp' not in str(e.value)


# ---- 2. pipelines that look fresh are fresh ------------------------------------------------------------------

def test_load_pipeline_twice_gives_independent_pipelines():
    from peft import LoraConfig
    base = np.asarray(generate(load_pipeline(), PROMPT, seed=1, num_inference_steps=4)[0])
    a = load_pipeline()
    a.unet.add_adapter(LoraConfig(r=4, init_lora_weights=False, target_modules=['to_q', 'to_k', 'to_v']))  # a LoRA
    with torch.no_grad(): a.vae.decoder.conv_out.bias.add_(0.5)                                              # an edit
    assert not np.array_equal(np.asarray(generate(a, PROMPT, seed=1, num_inference_steps=4)[0]), base)
    t = time.perf_counter(); b = load_pipeline(); took = time.perf_counter() - t
    assert np.array_equal(np.asarray(generate(b, PROMPT, seed=1, num_inference_steps=4)[0]), base)
    assert took < 5, f"a fresh copy of the loaded model took {took:.2f} s"


def test_generate_from_threads_gives_the_serial_pictures():
    from diffusers import DPMSolverMultistepScheduler
    pipe = load_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # keeps state between steps
    jobs = [(f'a {c} square on a white background', 10 + i, 4 + i) for i, c in enumerate(['red', 'blue', 'green', 'yellow', 'purple', 'orange'])]
    serial = [np.asarray(generate(pipe, p, seed=s, num_inference_steps=n)[0]) for p, s, n in jobs]
    out, errors = [None] * len(jobs), []
    def run(i):
        try: out[i] = np.asarray(generate(pipe, jobs[i][0], seed=jobs[i][1], num_inference_steps=jobs[i][2])[0])
        except Exception as e: errors.append(e)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors and all(np.array_equal(a, b) for a, b in zip(out, serial))


# ---- 3. records are data, not instructions -------------------------------------------------------------------

@pytest.fixture(scope='module')
def chain(pipe):
    return run_chain(pipe, Image.new('RGB', (64, 64), 'white'), [Hop(PROMPT, strength=0.5, steps=4)])


@pytest.mark.parametrize('source', ['/etc/passwd', 'https://example.com/x.png', 'SKETCH'])
def test_replay_chain_opens_nothing_a_record_names(pipe, chain, source, monkeypatch):
    import sd_intro.img2img as i2i
    from sd_intro.img2img import sketch_path
    monkeypatch.setattr(i2i, '_download', lambda *a, **k: pytest.fail('replay_chain fetched a URL named by a record'))
    rec = json.loads(json.dumps(chain.record))
    rec['start'].update(png_base64=None, source=str(sketch_path()) if source == 'SKETCH' else source)
    with pytest.raises(ValueError, match='opens nothing it names') as e: replay_chain(rec, pipe)
    assert 'root:' not in str(e.value)
    again = replay_chain(rec, pipe, start=chain.start)                        # given explicitly, it is used
    assert np.array_equal(np.asarray(again.final), np.asarray(chain.final))


def test_errors_quote_no_file_content(tmp_path):
    (tmp_path / 'secret.png').write_text('root:x:0:0:root:/root:/bin/bash\n')
    with pytest.raises(ValueError) as e: load_image(tmp_path / 'secret.png')
    assert 'root' not in str(e.value).replace(str(tmp_path), '')


@pytest.mark.parametrize('name', ['AutoencoderKL', 'StableDiffusionPipeline', 'os.system'])
def test_a_sampler_name_builds_only_schedulers(pipe, name):
    s = dict(prompt=PROMPT, seed=0, steps=2, sampler=name)
    with pytest.raises(ValueError, match='not a known sampler'): replay(s, pipe)
    assert type(pipe.scheduler).__name__ == 'DDIMScheduler'


# ---- 4. web-UI PNGs read, written and replayed as the web UI does ----------------------------------------------

WEBUI = ('a fox in the snow\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, '
         'Seed: 3, Size: 64x64, Model hash: 6ce0161689, Model: embedded, Denoising strength: 0.7, Clip skip: 2, '
         'Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent, Version: v1.10.1')


def test_a_webui_txt2img_png_with_hires_fix_karras_and_clip_skip_replays(pipe, tmp_path):
    from diffusers import DPMSolverMultistepScheduler
    s = read_settings(_png(tmp_path / 'webui.png', WEBUI))
    assert s['sampler'] == 'DPM++ 2M' and s['schedule_type'] == 'Karras' and 'strength' not in s and s['clip_skip'] == 2
    assert s['extra'] == {'Model hash': '6ce0161689', 'Denoising strength': '0.7', 'Hires upscale': '2', 'Hires steps': '4',
                          'Hires upscaler': 'Latent', 'Version': 'v1.10.1'}
    with pytest.warns(UserWarning, match=r'does not apply: Denoising strength: 0.7, Hires upscale: 2.*first pass'):
        img = replay(tmp_path / 'webui.png', pipe)
    old = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config, use_karras_sigmas=True)
    try: want = generate(pipe, 'a fox in the snow', seed=3, negative_prompt='blurry', num_inference_steps=4,
                         guidance_scale=7.0, clip_skip=1)
    finally: pipe.scheduler = old
    assert np.array_equal(np.asarray(img), np.asarray(want[0]))
    assert want.settings[0]['clip_skip'] == 2


MAPPED = {'Euler a': ('EulerAncestralDiscreteScheduler', {}), 'DPM++ 2M SDE': ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++'}),
          'DPM++ 3M SDE': ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++', 'solver_order': 3}),
          'DPM2 a': ('KDPM2AncestralDiscreteScheduler', {}), 'LCM': ('LCMScheduler', {}),
          'DPM++ 2M SDE Heun': ('DPMSolverMultistepScheduler', {'solver_type': 'heun'}), 'Heun': ('HeunDiscreteScheduler', {})}


@pytest.mark.parametrize('name', list(MAPPED) + ['DPM++ SDE Karras', 'DPM++ 2S a', 'Restart', 'DPM fast', 'DPM adaptive', 'DDIM CFG++'])
def test_every_webui_sampler_is_mapped_or_refused_by_name(pipe, name):
    from sd_intro.pipelines import swapped_scheduler
    if name in MAPPED:
        cls, cfg = MAPPED[name]
        with swapped_scheduler(pipe, name) as sched:
            assert type(sched).__name__ == cls and all(sched.config[k] == v for k, v in cfg.items())
            assert core.sampler_name(sched) == name
            generate(pipe, PROMPT, seed=0, num_inference_steps=3)
    else:
        with pytest.raises(ValueError, match=re.escape(f"sampler='{name}'")) as e:
            replay(dict(prompt=PROMPT, seed=0, steps=3, sampler=name), pipe)
        assert 'torchsde' in str(e.value) or 'diffusers does not have' in str(e.value)


def test_written_values_are_quoted_as_the_webui_quotes_them(pipe, tmp_path):
    g = generate(pipe, 'a fox\nNegative prompt: blue', seed=2, num_inference_steps=2)
    st = dict(g.settings[0], model='C:\\models\\my, model: v2.safetensors')
    p = save_image(g[0], tmp_path / 'q.png', st)
    text = Image.open(p).info['parameters']
    assert 'Model: "C:\\\\models\\\\my, model: v2.safetensors"' in text
    s = read_settings(p)
    assert s['model'] == st['model'] and s['prompt'] == 'a fox\nNegative prompt: blue' and s['negative_prompt'] == ''


def test_the_sd_parsers_reader_reads_our_pngs(pipe, tmp_path):
    sd_parsers = pytest.importorskip('sd_parsers')
    from diffusers import DPMSolverMultistepScheduler
    from sd_intro.pipelines import swapped_scheduler
    with swapped_scheduler(pipe, DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)):
        g = generate(pipe, 'a red star', seed=5, negative_prompt='blue', num_inference_steps=3, guidance_scale=6.5)
    p = save_image(g[0], tmp_path / 'k.png', g.settings[0])
    info = sd_parsers.ParserManager().parse(str(p))
    smp = info.samplers[0]
    assert smp.name == 'DPM++ 2M' and smp.parameters['scheduler'] == 'Karras'
    assert smp.parameters['seed'] == '5' and smp.parameters['steps'] == '3' and smp.parameters['cfg_scale'] == '6.5'
    assert smp.prompts[0].value == 'a red star' and smp.negative_prompts[0].value == 'blue'
    assert smp.model.name == 'embedded'


# ---- 5. parse and dataset errors that say what to do -----------------------------------------------------------

@pytest.mark.parametrize('field,msg', [('Steps: abc', "'Steps: abc' is not a whole number"),
                                       ('Seed: 1.5', "'Seed: 1.5' is not a whole number"),
                                       ('Size: 64', "'Size: 64' is not WIDTHxHEIGHT"),
                                       ('Size: 64x64x3', "'Size: 64x64x3' is not WIDTHxHEIGHT")])
def test_damaged_png_parameters_are_named(tmp_path, field, msg):
    text = 'a fox\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64'
    k = field.split(':')[0]
    text = re.sub(rf'{k}: [^,]*', field, text)
    with pytest.raises(ValueError, match=re.escape(msg)): read_settings(_png(tmp_path / 'bad.png', text))


def _broken(record, how):
    r = json.loads(json.dumps(record))
    if how == 'corrupt': r['start']['png_base64'] = r['start']['png_base64'][:40] + '!!'
    elif how == 'not a picture': r['start']['png_base64'] = base64.b64encode(b'root:x:0:0').decode()
    elif how == 'no sha': del r['start']['sha256']
    elif how == 'start str': r['start'] = 'x.png'
    elif how == 'no hops': r['hops'] = []
    return r


@pytest.mark.parametrize('how,msg', [('corrupt', 'png_base64 is not a picture'), ('not a picture', 'png_base64 is not a picture'),
                                     ('no sha', 'no sha256'), ('start str', "start is a str"), ('no hops', 'has no hops')])
def test_damaged_chain_records_are_named(pipe, chain, how, msg):
    with pytest.raises(ValueError, match=msg) as e: replay_chain(_broken(chain.record, how), pipe)
    assert 'root' not in str(e.value)


def test_a_chain_record_with_a_byte_order_mark_replays(pipe, chain, tmp_path):
    p = tmp_path / 'c.json'
    p.write_bytes(b'\xef\xbb\xbf' + json.dumps(chain.record).encode())
    assert np.array_equal(np.asarray(replay_chain(p, pipe).final), np.asarray(chain.final))


def _folder(tmp_path, lines, extra=()):
    d = tmp_path / 'd'; d.mkdir()
    Image.new('RGB', (64, 64), 'red').save(d / 'a.png')
    for name in extra: (d / name).write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (d / 'metadata.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
    return d


@pytest.mark.parametrize('lines,msg', [
    ([b'{"file_name": "a.png", "text": "a red caf\xe9"}'], r"metadata.jsonl line 1: not UTF-8 text"),
    ([b'{"file_name": "../a.png", "text": "x"}', b'{"file_name": "a.png", "text": "x"}'], "line 1: file_name '../a.png' points outside"),
    ([b'{"file_name": "/etc/passwd", "text": "x"}', b'{"file_name": "a.png", "text": "x"}'], "line 1: file_name '/etc/passwd' is an absolute path"),
    ([b'{"file_name": "a.png", "text": 42}'], r"caption on line 1 of metadata.jsonl is a int \(42\), not text"),
    ([b'{"file_name": "a.png", "text": "x"}', b'{"file_name": "a.png", "text": "y"}'], "lines 1 and 2 both caption 'a.png'")])
def test_dataset_mistakes_are_named(tmp_path, lines, msg):
    with pytest.raises(ValueError, match=msg): ft.check_imagefolder(_folder(tmp_path, lines))


def test_macos_resource_files_are_ignored(tmp_path):
    d = _folder(tmp_path, [b'{"file_name": "a.png", "text": "a red square"}'], extra=['._a.png'])
    assert ft.check_imagefolder(d) == {'a.png': 'a red square'}
    assert len(ft.load_captioned(d)) == 1


def test_make_keeps_a_chosen_learning_rate():
    assert ft.FinetuneConfig.make(ft.FinetuneConfig(lr=3e-4), method='full').lr == 3e-4
    assert ft.FinetuneConfig.make(ft.FinetuneConfig(), method='full').lr == 1e-5


def test_absurd_image_counts_are_refused_before_any_allocation(pipe, monkeypatch):
    monkeypatch.setattr(core, 'generators', lambda seeds: pytest.fail(f'allocated {len(seeds)} generators'))
    monkeypatch.setattr(core, 'seeds_for', lambda seed, n: pytest.fail(f'made {n} seeds'))
    with pytest.raises(ValueError, match='n=10000000: .*at most 4096'): generate(pipe, PROMPT, n=10**7)


def test_16_bit_images_are_read_by_their_depth(tmp_path):
    Image.fromarray(np.full((64, 64), 200, np.uint16)).save(tmp_path / 'dark16.png')
    assert np.asarray(load_image(tmp_path / 'dark16.png')).max() == 1     # 200 / 65535 of white, not 200 / 255


def test_an_animated_gif_says_it_uses_its_first_frame(tmp_path):
    frames = [Image.new('RGB', (64, 64), c) for c in ('red', 'blue')]
    frames[0].save(tmp_path / 'a.gif', save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r'is animated \(2 frames\); using its first frame'): load_image(tmp_path / 'a.gif')


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_img2img_resizes_every_kind_of_picture_with_a_note(pipe, mode):
    from sd_intro.img2img import img2img_pipeline
    im = Image.new(mode, (100, 100), 'red' if mode == 'RGB' else 128)
    with pytest.warns(ResizeNote, match='resized the given image from 100x100 to 96x96'):
        generate(img2img_pipeline(pipe), PROMPT, image=im, strength=0.5, num_inference_steps=2)


def test_read_settings_closes_its_file(tmp_path):
    p = save_image(Image.new('RGB', (8, 8)), tmp_path / 's.png', dict(prompt='x', seed=1))
    opened = []
    real = Image.open
    def spy(*a, **k):
        im = real(*a, **k); opened.append(im); return im
    Image.open = spy
    try: read_settings(p)
    finally: Image.open = real
    assert opened and all(getattr(im, 'fp', None) is None for im in opened)
