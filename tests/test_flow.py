"Lesson 9's flow matching: the objectives against diffusers, the shipped flow model, bad inputs named, runs resumed exactly."
import configparser, fnmatch, json, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from sd_intro.core import EMBEDDED_MODEL, generate
from sd_intro.finetune import model_fingerprint
from sd_intro.flow import (FLOW_MODEL, FLOW_NAME, FlowConfig, ddpm_noisy, flow_noisy, flow_target, flow_timesteps,
                           flow_loss, flow_scheduler, flow_pipeline, load_flow, with_shift, ddim_trailing, path_point,
                           flow_img2img, predicted_finals, flow_info, state_digest, step_seed, train_flow, save_flow_model,
                           steps_quality)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=4, batch_size=2, n_images=8, checkpoint_every=1, validation_steps=1, warmup_steps=2)


@pytest.fixture(scope='module')
def flow():
    return load_flow()


# --- the objectives, exactly as diffusers defines them -------------------------------------------------------------

def test_ddpm_path_is_add_noise(pipe):
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.equal(ddpm_noisy(x0, noise, t, sched.alphas_cumprod), sched.add_noise(x0, noise, t))


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_flow_path_is_scale_noise(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    i = torch.tensor([0, 10, 500, 999])
    assert torch.equal(flow_noisy(x0, noise, sched.sigmas[i]), sched.scale_noise(x0, sched.timesteps[i], noise))
    assert torch.equal(flow_noisy(x0, noise, torch.zeros(4)), x0) and torch.equal(flow_noisy(x0, noise, torch.ones(4)), noise)
    # the velocity is the derivative of the path in sigma
    s = torch.full((4,), 0.3)
    assert torch.allclose((flow_noisy(x0, noise, s + 1e-3) - flow_noisy(x0, noise, s)) / 1e-3, flow_target(x0, noise), atol=1e-2)


def test_flow_timesteps_come_from_the_schedule():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t, s = flow_timesteps(sched, 500, torch.Generator().manual_seed(0))
    assert torch.equal(t, s * 1000) and set(s.tolist()) <= set(sched.sigmas.tolist())
    assert s.min() > 0 and s.max() <= 1 and s.mean() > 0.6   # shift 3 leans to the noisy end
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match='set_timesteps.*freshly built'):
        flow_timesteps(sched, 2)


def test_flow_loss_by_hand(pipe):
    sched = FlowMatchEulerDiscreteScheduler()
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = pipe.encode_prompt(['a red circle', 'a blue star'], 'cpu', 1, False)[0]
    with torch.no_grad(): loss = flow_loss(pipe.unet, sched, lat, cond, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(lat.shape, generator=g)
    i = torch.randint(0, 1000, (2,), generator=g)
    x = (1 - sched.sigmas[i]).view(-1, 1, 1, 1) * lat + sched.sigmas[i].view(-1, 1, 1, 1) * noise
    with torch.no_grad(): v = pipe.unet(x, sched.timesteps[i], cond).sample
    assert torch.allclose(loss, ((v - (noise - lat)) ** 2).mean(), rtol=1e-5)


# --- the shipped model and sampling ----------------------------------------------------------------------------------

def test_shipped_folder_loads_in_plain_diffusers():
    from diffusers import UNet2DConditionModel
    d = Path(FLOW_MODEL)
    assert sorted(p.name for p in d.iterdir()) == ['README.md', 'flow.json', 'scheduler', 'unet']   # no copies of shared parts
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(d, subfolder='scheduler')
    unet = UNet2DConditionModel.from_pretrained(d, subfolder='unet')
    assert unet.config.sample_size == 8 and sched.config.shift > 0
    info = flow_info()
    assert info['config']['init'] in ('ddpm', 'scratch') and info['steps'] == info['config']['steps']
    assert info['base_fingerprint'] == model_fingerprint(EMBEDDED_MODEL), "the flow model was trained from another embedded model"


def test_package_data_ships_the_flow_model():
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    globs = cfg['DEFAULT']['package_data'].split()
    files = [p.relative_to(ROOT / 'sd_intro').as_posix() for p in Path(FLOW_MODEL).rglob('*') if p.is_file()]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert files and not missing, missing


def test_pipeline_is_the_scheduler_step_loop(flow):
    "StableDiffusionPipeline with the flow scheduler does what a loop of the scheduler's own `step` does."
    prompt = 'a red circle on a blue background'
    s = FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler.config); s.set_timesteps(4)
    cond, uncond = flow.encode_prompt([prompt], 'cpu', 1, True)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        with torch.no_grad(): u, c = flow.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
        x = s.step(u + 7.5 * (c - u), t, x).prev_sample
    out = flow([prompt], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type='latent').images
    assert torch.equal(out, x)


def test_flow_model_draws_the_prompt(flow):
    from sd_intro.shapes import adherence
    prompts = ['a red circle on a blue background', 'a yellow star on a purple background',
               'a green triangle on a white background', 'an orange square on a black background']
    a = adherence(generate(flow, prompts, seed=0, num_inference_steps=16).images, prompts)
    assert a['colour'] >= 0.75 and a['background'] >= 0.75, a


def test_records_name_the_flow_model(flow):
    st = generate(flow, 'a red circle', num_inference_steps=2).settings[0]
    assert st['model'] == FLOW_NAME and st['sampler'] == 'FlowMatchEulerDiscreteScheduler'


def test_shift(flow):
    p = with_shift(flow, 3.0)
    assert p.scheduler.config.shift == 3.0 and p.unet is flow.unet
    assert flow.scheduler.config.shift == json.loads((Path(FLOW_MODEL) / 'scheduler' / 'scheduler_config.json').read_text())['shift']
    p.scheduler.set_timesteps(4)
    assert p.scheduler.sigmas[1] > 0.75    # shift 3: the second step is still mostly noise
    for bad in (0, -1, float('nan'), '3', True):
        with pytest.raises(ValueError, match='shift='): flow_scheduler(bad)
    with pytest.raises(TypeError, match='shift'): with_shift(load_pipeline_cached(), 2.0)


def load_pipeline_cached():
    from sd_intro.core import load_pipeline
    return load_pipeline()


def test_flow_pipeline_refuses_a_ddpm_scheduler(pipe):
    with pytest.raises(TypeError, match='FlowMatchEulerDiscreteScheduler'):
        flow_pipeline(pipe, pipe.unet, pipe.scheduler)


def test_ddim_trailing_leaves_the_model_alone(pipe):
    p = ddim_trailing(pipe)
    assert p.scheduler.config.timestep_spacing == 'trailing' and pipe.scheduler.config.timestep_spacing != 'trailing'
    assert p.unet is pipe.unet


def test_load_flow_bad_folders(tmp_path, pipe):
    with pytest.raises(ValueError, match='no such folder'): load_flow(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no unet/config.json'): load_flow(tmp_path / 'empty')
    d = tmp_path / 'ddpm'
    save_flow_model(pipe.unet, d)
    cfg = d / 'scheduler' / 'scheduler_config.json'
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), '_class_name': 'DDIMScheduler'}))
    with pytest.raises(ValueError, match='not a flow model'): load_flow(d)
    cfg.write_text('{not json')
    with pytest.raises(ValueError, match='not JSON'): load_flow(d)


def test_img2img_strength_is_a_point_on_the_path(flow):
    s = FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler.config); s.set_timesteps(10)
    start, sigmas = path_point(flow, 0.6, 10)
    assert start == 4
    sc = FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler.config); sc.set_timesteps(sigmas=sigmas)
    assert torch.allclose(sc.sigmas, s.sigmas[start:], atol=1e-6)   # the tail of the full schedule, shift included
    prompt = 'a red circle on a blue background'
    t2i = generate(flow, prompt, seed=0, num_inference_steps=10).images[0]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        full = flow_img2img(flow, t2i, prompt, strength=1.0, seed=0, num_inference_steps=10)
        light = flow_img2img(flow, t2i, 'a yellow star on a blue background', strength=0.1, seed=0, num_inference_steps=10)
    # strength 1 starts at pure noise: the seed's text-to-image picture
    assert np.abs(np.asarray(full.images[0], float) - np.asarray(t2i, float)).max() <= 3
    assert np.abs(np.asarray(light.images[0], float) - np.asarray(t2i, float)).mean() < 12   # strength 0.1: barely changed
    assert full.settings[0]['strength'] == 1.0
    for bad in (0, 1.5, -0.2, 'high', None):
        with pytest.raises(ValueError, match='strength='): flow_img2img(flow, t2i, prompt, strength=bad)
    with pytest.raises(ValueError, match='walks no step'): flow_img2img(flow, t2i, prompt, strength=0.05, num_inference_steps=10)


def test_predicted_finals_end_at_the_picture(flow, pipe):
    # the flow model's last guess is its picture; DDIM's last step still adds sqrt(1 - abar_0) of its noise guess
    for p, tol in ((flow, 1e-4), (ddim_trailing(pipe), 0.2)):
        x0 = predicted_finals(p, 'a red circle on a blue background', seed=0, num_inference_steps=5)
        out = p('a red circle on a blue background', num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                output_type='latent').images[0]
        assert x0.shape == (5, 4, 8, 8) and torch.allclose(x0[-1], out, atol=tol)
        assert (x0[0] - out).abs().mean() > (x0[-1] - out).abs().mean()   # the first guess is further off


def test_steps_quality_refuses_swapped_models(flow, pipe):
    with pytest.raises(TypeError, match='flow'): steps_quality(flow, pipe, (1,))


# --- training: settings, folders, resume ---------------------------------------------------------------------------

@pytest.mark.parametrize('bad', [dict(steps=0), dict(batch_size=2.5), dict(lr=-1), dict(init='imagenet'),
                                 dict(ema_decay=1.0), dict(caption_noise=1.5), dict(shift=0), dict(train_shift=float('nan')),
                                 dict(stop_at=9, steps=4), dict(seed=-1), dict(checkpoint_every=True)])
def test_config_refuses_bad_settings(bad):
    name = [k for k in bad if k != 'steps'][0] if len(bad) > 1 else next(iter(bad))
    with pytest.raises(ValueError, match=f"{name}="): FlowConfig(**bad)


def test_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / 'mine.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not a flow-matching run'): train_flow(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ['mine.txt'] and (tmp_path / 'mine.txt').read_text() == 'keep me'
    f = tmp_path / 'file'; f.write_text('x')
    with pytest.raises(FileExistsError, match='is a file'): train_flow(f, **TINY)
    with pytest.raises(ValueError, match='CUDA'):
        if not torch.cuda.is_available(): train_flow(tmp_path / 'new', device='cuda', **TINY)
        else: raise ValueError('CUDA present')


def test_command_line_help_and_bad_options(tmp_path, command_line):
    from sd_intro.flow import main
    command_line.check(main, 'sd_intro.flow', FlowConfig)
    with pytest.raises(SystemExit, match=r'stop_at=9: use a step from 1 to steps=4'):
        command_line.run(main, ['--out', tmp_path / 'run', '--steps', '4', '--stop_at', '9'])
    assert not (tmp_path / 'run').exists()


def run_cli(command_line, out, *extra, kill_at=None):
    """Run the command line (parsed as `python -m sd_intro.flow` parses it) in this process and return what it printed;
    with `kill_at`, in a fork of this process, killed with SIGKILL once that checkpoint is complete."""
    import contextlib, io
    from sd_intro.flow import main
    argv = ['--out', out, '--threads', '1', '--steps', '4', '--batch_size', '2', '--n_images', '8', '--checkpoint_every', '2',
            '--validation_steps', '1', '--warmup_steps', '2', *extra]
    if kill_at is None:
        with contextlib.redirect_stdout(io.StringIO()) as printed: command_line.run(main, argv)
        return printed.getvalue()
    pid = command_line.start(main, argv, Path(out).with_suffix('.log'))
    mark = Path(out) / 'checkpoints' / f"step-{kill_at:06d}" / 'state.json'
    t0 = time.time()
    while not mark.exists() and not command_line.ended(pid) and time.time() - t0 < 600: time.sleep(0.05)
    assert command_line.wait(pid, kill=True) == -signal.SIGKILL, f"the run ended before step {kill_at}:\n{Path(out).with_suffix('.log').read_text()[-3000:]}"
    return None


def fingerprint_run(out):
    out = Path(out)
    weights = (out / 'model' / 'unet' / 'diffusion_pytorch_model.safetensors').read_bytes()
    pngs = {p.name: p.read_bytes() for p in sorted((out / 'validation').glob('*.png'))}
    state = json.loads((out / 'checkpoints' / 'step-000004' / 'state.json').read_text())
    return weights, pngs, state['losses'], state['evals'], state['digest']


def test_kill_9_and_resume_is_bit_identical(tmp_path, command_line):
    whole, broken = tmp_path / 'whole', tmp_path / 'broken'
    run_cli(command_line, whole)
    run_cli(command_line, broken, kill_at=2)
    assert not (broken / 'model').exists()
    log = run_cli(command_line, broken)
    assert 'resumed from' in log
    a, b = fingerprint_run(whole), fingerprint_run(broken)
    assert a[0] == b[0], "the resumed run's weights differ"
    assert a[1] == b[1] and len(a[1]) == 3, "validation pictures differ"
    assert a[2:] == b[2:]
    info = flow_info(whole / 'model')
    assert info['steps'] == 4 and info['config']['batch_size'] == 2


def test_damaged_edited_and_foreign_checkpoints(tmp_path):
    out = tmp_path / 'run'
    train_flow(out, stop_at=2, log=None, **TINY)
    ck = out / 'checkpoints' / 'step-000002'
    # an edited state.json (a loss changed) is named, with the fix
    st = json.loads((ck / 'state.json').read_text()); st['losses'][0] = 0.0
    (ck / 'state.json').write_text(json.dumps(st))
    with pytest.warns(UserWarning, match=r'step-000002: its state.json does not match its weights.*delete the folder'):
        r = train_flow(out, stop_at=2, log=None, **TINY)   # resumes from step 1 instead, and writes step 2 afresh
    assert r.step == 2 and json.loads((ck / 'state.json').read_text())['losses'][0] != 0.0
    # a cut-off weights file
    w = ck / 'trainable.safetensors'; w.write_bytes(w.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r'trainable.safetensors is damaged'):
        train_flow(out, stop_at=2, log=None, **TINY)
    # a damaged latent cache is named, with the fix
    lat = out / 'latents.safetensors'; good = lat.read_bytes(); lat.write_bytes(good[:100])
    with pytest.raises(ValueError, match=r'latents.safetensors.*damaged.*delete both files'):
        train_flow(out, stop_at=2, log=None, **TINY)
    lat.write_bytes(good)
    # other settings: refused by name, nothing deleted
    before = sorted(p.name for p in (out / 'checkpoints').iterdir())
    with pytest.raises(ValueError, match=r"other settings.*'lr': \(0.0003, 0.001\)"):
        train_flow(out, **{**TINY, 'lr': 1e-3})
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == before


def test_no_unpickling(tmp_path):
    "A crafted optimizer.pt that would run code is refused (weights_only loading), and runs nothing."
    out = tmp_path / 'run'
    train_flow(out, stop_at=1, log=None, **TINY)
    marker = tmp_path / 'pwned'
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    for ck in (out / 'checkpoints').iterdir(): torch.save({'optimizer': Evil()}, ck / 'optimizer.pt')
    with pytest.raises(ValueError, match=r'optimizer.pt (is damaged|holds pickled).*another --out'):
        train_flow(out, log=None, **TINY)
    assert not marker.exists()


def test_step_seeds_and_digest():
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6) != step_seed(1, 5)
    t = {'w': torch.ones(3)}
    d = state_digest({'step': 1}, t)
    assert d == state_digest({'step': 1, 'digest': 'x'}, t) != state_digest({'step': 2}, t)
    assert d != state_digest({'step': 1}, {'w': torch.tensor([1., 1., 1.0001])})


# --- issue 31, reliability round 4: runs, folders, misuse and records of the flow model ----------------------------

def test_a_finished_run_run_again_says_so_and_keeps_the_model_card(tmp_path):
    out, kw = tmp_path / 'run', dict(TINY, steps=2)
    train_flow(out, log=None, **kw)
    card, weights = out / 'model' / 'README.md', out / 'model' / 'unet' / 'diffusion_pytorch_model.safetensors'
    card.write_text('my card'); w = weights.read_bytes()
    lines = []
    r = train_flow(out, log=lines.append, **kw)
    assert any('is finished' in l for l in lines) and r.saved == out / 'model' and r.step == 2
    assert card.read_text() == 'my card' and weights.read_bytes() == w


def test_save_flow_model_keeps_the_users_files(tmp_path, flow):
    d = tmp_path / 'documents'; d.mkdir(); (d / 'thesis.tex').write_text('mine')
    with pytest.raises(FileExistsError, match='not a flow model.*nothing there is touched'): save_flow_model(flow.unet, d)
    assert [p.name for p in d.iterdir()] == ['thesis.tex']
    m = save_flow_model(flow.unet, tmp_path / 'model'); (m / 'README.md').write_text('card')
    save_flow_model(flow.unet, m)
    assert (m / 'README.md').read_text() == 'card' and (m / 'flow.json').is_file()


def test_a_damaged_config_json_is_named_with_the_fix(tmp_path):
    out = tmp_path / 'run'
    train_flow(out, stop_at=1, log=None, **TINY)
    (out / 'config.json').write_text('{"kind": "sd_intro.fl')
    with pytest.raises(ValueError, match=r'config.json is damaged.*"kind": "sd_intro.flow"'): train_flow(out, log=None, **TINY)
    (out / 'config.json').write_text('{"kind": "sd_intro.flow"}')   # the fix the message gives
    assert train_flow(out, stop_at=2, log=None, **TINY).step == 2


def test_a_folder_in_use_names_the_flow_run(tmp_path):
    out, said = tmp_path / 'run', []
    def log(line):   # called while the run holds its folder: a second run there is refused
        if said: return
        try: train_flow(out, log=None, **TINY); said.append('ran')
        except RuntimeError as e: said.append(str(e))
    train_flow(out, log=log, **dict(TINY, steps=1))
    assert said and 'in use by another flow-matching run' in said[0] and 'fine-tuning' not in said[0], said


def test_the_flow_model_refuses_ddpm_samplers_and_the_lcm_lora(flow, pipe):
    from diffusers import DDIMScheduler
    from sd_intro.core import load_pipeline, load_lora
    from sd_intro.distill import LCM_LORA, lcm_pipeline
    p = load_pipeline(flow); p.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match='flow-matching model.*DDIMScheduler'): generate(p, 'a red circle', num_inference_steps=2)
    with pytest.raises(ValueError, match='is an LCM-LoRA.*flow-matching model'): load_lora(load_pipeline(flow), LCM_LORA)
    with pytest.raises(ValueError, match='is an LCM-LoRA.*flow-matching model'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); lcm_pipeline(flow)


def test_flow_records_replay_to_the_same_picture(flow, pipe, tmp_path):
    from sd_intro.core import replay, save_image, read_settings
    from sd_intro.flow import even_steps
    prompt = 'a red circle on a blue background'
    r = generate(flow, prompt, seed=2, num_inference_steps=4)
    png = save_image(r[0], tmp_path / 'flow.png', r.settings[0])
    assert read_settings(png)['shift'] == flow.scheduler.config.shift
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert np.array_equal(np.asarray(replay(png, flow)), np.asarray(r[0]))
    # another shift is recorded and replayed
    s3 = generate(with_shift(flow, 3.0), prompt, seed=2, num_inference_steps=4)
    assert s3.settings[0]['shift'] == 3.0 and not np.array_equal(np.asarray(s3[0]), np.asarray(r[0]))
    assert np.array_equal(np.asarray(replay(s3.settings[0], flow)), np.asarray(s3[0]))
    # even steps are recorded; replayed without them: a warning naming the fix
    ev = generate(even_steps(flow), prompt, seed=2, num_inference_steps=4)
    with pytest.warns(UserWarning, match=r'Flow schedule: even steps.*even_steps\(pipe\)'): replay(ev.settings[0], flow)
    assert np.array_equal(np.asarray(replay(ev.settings[0], even_steps(flow))), np.asarray(ev[0]))
    # a record of one kind of model replayed on the other is refused
    d = generate(pipe, prompt, seed=2, num_inference_steps=2)
    for rec, other in ((r.settings[0], pipe), (d.settings[0], flow)):
        with pytest.raises(ValueError, match='another kind of model'), warnings.catch_warnings():
            warnings.simplefilter('ignore'); replay(rec, other)
    # a flow img2img record: the advice names flow_img2img
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); i2i = flow_img2img(flow, r[0], prompt, strength=0.6, num_inference_steps=5)
    for image in (None, r[0]):
        with pytest.raises(ValueError, match='img2img on a flow model.*flow_img2img'): replay(i2i.settings[0], flow, image=image)


def test_ddpm_trainers_and_loaders_refuse_the_flow_model(flow, tmp_path):
    import sd_intro.finetune as ft
    from sd_intro.controlnet import train_controlnet
    from sd_intro.core import load_pipeline
    from sd_intro.distill import distill
    with pytest.raises(ValueError, match='flow-matching model'): ft.finetune(tmp_path / 'data', tmp_path / 'ft', model=flow, steps=1)
    with pytest.raises(ValueError, match='flow-matching model'): train_controlnet(tmp_path / 'cn', model=flow, steps=1, progress=False)
    for call in (lambda: load_pipeline(FLOW_MODEL), lambda: distill(tmp_path / 'lcm', model=FLOW_MODEL, log=None, steps=1)):
        with pytest.raises(FileNotFoundError, match=r"flow-matching model's folder.*load_flow"): call()
    assert not (tmp_path / 'ft').exists() and not (tmp_path / 'cn').exists() and not (tmp_path / 'lcm').exists()


def test_an_edited_latent_cache_is_named(tmp_path):
    out = tmp_path / 'run'
    train_flow(out, stop_at=1, log=None, **TINY)
    m = json.loads((out / 'latents.json').read_text()); m['scenes'][0]['x'] = round(m['scenes'][0]['x'] + 0.01, 4)
    (out / 'latents.json').write_text(json.dumps(m))   # (a changed scene changes the captions a resumed run trains on)
    with pytest.raises(ValueError, match=r'latents.*not as the run wrote them.*delete both files'): train_flow(out, log=None, **TINY)


def test_a_shift_on_a_ddpm_pipeline_is_not_dropped_silently(pipe):
    from sd_intro.core import parse_parameters, replay
    s = parse_parameters('a red circle\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Shift: 3')
    assert s['shift'] == 3.0
    with pytest.warns(UserWarning, match="'Shift: 3.0'.*not applied"): replay(s, pipe)
    with pytest.raises(ValueError, match=r"the record's 'Shift: -1.0'"): replay(dict(s, shift=-1.0), pipe)


def test_flow_loss_runs_with_the_unet_on_another_device_than_the_schedule(cpu_indexed, on_meta):
    "The schedule and the generator stay on the CPU, the UNet and the batch move (the 'meta' device stands in for a GPU)."
    sched = FlowMatchEulerDiscreteScheduler()
    sched.timesteps, sched.sigmas = cpu_indexed(sched.timesteps), cpu_indexed(sched.sigmas)
    loss = flow_loss(on_meta.unet, sched, on_meta.latents, on_meta.cond, torch.Generator().manual_seed(0))
    assert loss.device.type == 'meta'


def test_validation_draws_with_every_part_on_the_training_device(tmp_path, monkeypatch):
    "On a GPU the validation pictures once decoded with the VAE left on the CPU (found on an H200: `Input type "
    "(torch.cuda.FloatTensor) and weight type (torch.FloatTensor)`); the 'meta' device stands in for the GPU here."
    import sd_intro.flow as F
    seen = {}
    class Drawn(Exception): pass
    def generate(pipe, *a, **kw):
        seen.update({k: next(getattr(pipe, k).parameters()).device.type for k in ('unet', 'text_encoder', 'vae')})
        raise Drawn
    monkeypatch.setattr(F, 'generate', generate)
    with pytest.raises(Drawn): F.train_flow(tmp_path / "run", device="meta", steps=2, n_images=4, batch_size=2, log=None)
    assert seen == dict(unet='meta', text_encoder='meta', vae='meta'), seen
