"Lesson 7's distillation helpers: bad inputs named, runs written whole and resumed exactly, the shipped LCM-LoRA."
import configparser, fnmatch, json, shutil, warnings
from pathlib import Path
from types import SimpleNamespace
import pytest
import torch
from diffusers import LCMScheduler
from safetensors.torch import load_file
from sd_intro.core import EMBEDDED_MODEL, load_pipeline
from sd_intro.finetune import model_fingerprint
from sd_intro.distill import (LCM_INFO, LCM_LORA, LCM_WEIGHTS, DistillConfig, boundary_scalings, check_lcm, distill,
                              few_step_quality, lcm_generate, lcm_info, lcm_max_steps, lcm_pipeline, main,
                              skipping_timesteps, anchor_loss, teacher_endpoints)
import numpy as np
import sd_intro.finetune as ft
from sd_intro.core import generate, load_lora, read_settings, replay, save_image

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=3, batch_size=2, n_images=8, anchor_pairs=4, rank=2, ckpt_every=1)


def stub(original_inference_steps=50):
    "Just enough of an LCM pipeline for check_lcm."
    return SimpleNamespace(scheduler=LCMScheduler(original_inference_steps=original_inference_steps),
                           sd_intro_lcm=dict(w_min=3.0, w_max=8.0))


def messages(**kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_lcm(stub(), 4, **kw)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize('steps', [0, 9, 30, 2.5, '4', None])
def test_steps_outside_the_distilled_range(steps):
    with pytest.raises(ValueError, match=r'num_inference_steps=.*distilled for 1 to 8 steps.*base model'):
        check_lcm(stub(), steps)


def test_a_shorter_skipping_schedule_lowers_the_limit():
    assert lcm_max_steps(stub(4)) == 4
    check_lcm(stub(4), 4)
    with pytest.raises(ValueError, match='1 to 4 steps'): check_lcm(stub(4), 5)


@pytest.mark.parametrize('scale', [-1, float('nan'), 'high', None])
def test_bad_guidance_scale(scale):
    with pytest.raises(ValueError, match='guidance_scale='): check_lcm(stub(), 4, scale)


def test_ignored_arguments_are_named():
    assert messages() == [] and messages(guidance_scale=1.5) == [] and messages(guidance_scale=2, negative_prompt='red') == []
    [m] = messages(guidance_scale=0)
    assert 'guidance_scale=0 is ignored' in m and 'scales 4 to 9' in m
    [m] = messages(guidance_scale=7.5)
    assert 'guidance_scale=7.5 guides again' in m
    [m] = messages(negative_prompt='red')
    assert "negative_prompt='red' is ignored" in m and 'raise guidance_scale above 1' in m
    assert len(messages(guidance_scale=0.5, negative_prompt='red')) == 2


def test_the_base_model_is_not_an_lcm():
    base = load_pipeline()
    with pytest.raises(TypeError, match='lcm_pipeline'): check_lcm(base, 4)
    with pytest.raises(TypeError, match='LCMScheduler'): lcm_generate(base, 'a red circle')
    with pytest.raises(TypeError, match='expected an LCM'): few_step_quality(base, base, n_prompts=1, n_seeds=1)


def test_solver_and_boundary_match_lcmscheduler():
    sch = LCMScheduler(original_inference_steps=50)
    sch.set_timesteps(50)
    assert skipping_timesteps().flip(0).tolist() == sch.timesteps.tolist()
    for t in (0, 19, 259, 999):
        assert torch.allclose(torch.stack(boundary_scalings(t)), torch.tensor(sch.get_scalings_for_boundary_condition_discrete(t)))


@pytest.mark.parametrize('bad', [dict(steps=0), dict(batch_size=2.5), dict(lr=0), dict(rank=True), dict(w_min=9, w_max=3),
                                 dict(w_min=float('nan')), dict(loss_type='l1'), dict(num_ddim_timesteps=7), dict(seed='0'),
                                 dict(anchor=-1), dict(anchor=float('nan')), dict(anchor_pairs=0)])
def test_bad_settings_are_named_before_anything_is_written(tmp_path, bad):
    with pytest.raises(ValueError, match=list(bad)[0]): distill(tmp_path / 'lcm', **bad)
    assert list(tmp_path.iterdir()) == []


def test_refusals_write_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['stepz'\]"): distill(tmp_path / 'lcm', stepz=3)
    (tmp_path / 'lcm').mkdir()
    with pytest.raises(FileExistsError, match='overwrite=True'): distill(tmp_path / 'lcm', **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ['lcm']


class Stop(Exception): pass


def test_a_stopped_run_resumes_exactly(tmp_path):
    whole = distill(tmp_path / 'whole', log=None, **TINY)
    def stop_at_2(msg):
        if msg.startswith('step 2'): raise Stop
    with pytest.raises(Stop): distill(tmp_path / 'cut', log=stop_at_2, **TINY)
    assert not (tmp_path / 'cut').exists() and (tmp_path / 'cut-work' / 'checkpoints' / 'step-000002').is_dir()
    said = []
    cut = distill(tmp_path / 'cut', log=said.append, **TINY)
    assert said[0] == 'resumed at step 2'
    a, b = load_file(whole / LCM_WEIGHTS), load_file(cut / LCM_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((cut / LCM_INFO).read_text())
    assert info['steps'] == 3 and info['model'] == model_fingerprint() and info['device'] == 'cpu'
    with pytest.raises(ValueError, match='other settings'):
        distill(tmp_path / 'other', work=tmp_path / 'cut-work', **dict(TINY, lr=0.5))
    assert not (tmp_path / 'other').exists()


def test_command_line(tmp_path, command_line):
    out = tmp_path / 'lcm'
    command_line.run(main, ['--out', out, '--steps', '1', '--batch_size', '2', '--n_images', '4', '--anchor_pairs', '2', '--rank', '2'])
    assert sorted(p.name for p in out.iterdir()) == [LCM_INFO, LCM_WEIGHTS]
    assert lcm_info(out)['rank'] == 2


def test_command_line_help_and_bad_options(tmp_path, command_line):
    command_line.check(main, 'sd_intro.distill', DistillConfig)
    for argv, msg in ((['--anchor', '-1'], 'anchor=-1.0: use a number of 0 or more'),
                      (['--init_lora', tmp_path], 'holds no pytorch_lora_weights.safetensors')):
        with pytest.raises(SystemExit, match=msg): command_line.run(main, ['--out', tmp_path / 'lcm', *argv])
    assert not (tmp_path / 'lcm').exists() and not (tmp_path / 'lcm-work').exists()


def test_lcm_pipeline_loads_the_lora_on_a_copy():
    base = load_pipeline()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    lcm = lcm_pipeline()
    # (load_pipeline() hands out independent copies, so the LCM and the base share no module with each other)
    assert lcm.unet is not base.unet and type(base.scheduler).__name__ == 'DDIMScheduler'
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())
    assert lcm.scheduler.config.original_inference_steps == lcm_info()['num_ddim_timesteps']
    g = lcm_generate(lcm, 'a red circle on a blue background', seed=[0, 1], num_inference_steps=2)
    assert len(g) == 2 and g.settings[0]['sampler'] and g.settings[0]['steps'] == 2
    with pytest.raises(FileNotFoundError, match='no such folder'): lcm_pipeline(lora='no/such/folder/here')


def test_the_shipped_lora_belongs_to_the_shipped_model_and_ships():
    info = lcm_info()
    assert (Path(LCM_LORA) / LCM_WEIGHTS).is_file()
    assert info['model'] == model_fingerprint(), "distil the LCM-LoRA again: the embedded model changed"
    size = sum(f.stat().st_size for d in (EMBEDDED_MODEL, LCM_LORA) for f in Path(d).rglob('*') if f.is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MB"
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    patterns = cfg['DEFAULT']['package_data'].split()
    for f in Path(LCM_LORA).iterdir():
        rel = f.relative_to(ROOT / 'sd_intro').as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in settings.ini's package_data"


def test_anchor_loss_measures_the_distance_to_what_one_lcm_step_draws():
    "anchor_loss's student answer is exactly LCMScheduler's 1-step result: zero distance to it, not to anything else."
    lcm = lcm_pipeline()
    prompts = ['a red circle on a blue background', 'a yellow star on a black background']
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one = lcm(prompts, latents=noise.clone(), num_inference_steps=1, guidance_scale=1.0, output_type='latent').images
        cond = lcm.encode_prompt(prompts, 'cpu', 1, False)[0]
        ac = lcm.scheduler.alphas_cumprod.float()
        assert anchor_loss(lcm.unet, ac, noise, one, cond).item() < 1e-4
        assert anchor_loss(lcm.unet, ac, noise, torch.zeros_like(one), cond).item() > 0.1


def test_teacher_endpoints_are_guided_ddim_pictures_at_scale_w_plus_1_and_leave_the_pipeline_alone():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    base = load_pipeline()
    sched = base.scheduler
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    caps = ['a green triangle on a white background', 'a red square on a yellow background']
    with torch.no_grad():
        got = teacher_endpoints(base, caps, noise, torch.Generator().manual_seed(0), (4.0, 4.0), steps=5)
        ddim = StableDiffusionPipeline(**{**base.components, 'scheduler': DDIMScheduler.from_config(sched.config)},
                                       requires_safety_checker=False)
        want = ddim(caps, latents=noise.clone(), num_inference_steps=5, guidance_scale=5.0, output_type='latent').images
    assert torch.allclose(got, want, atol=1e-5)
    assert base.scheduler is sched


def test_init_lora_continues_from_a_distilled_lora_or_says_what_is_missing(tmp_path):
    from sd_intro.distill import _student
    with pytest.raises(FileNotFoundError, match='init_lora='): DistillConfig(init_lora=str(tmp_path)).check()
    DistillConfig(init_lora=LCM_LORA).check()
    pipe = load_pipeline()
    rank = lcm_info()['rank']
    warm, fresh = _student(pipe.unet, rank, 0, LCM_LORA), _student(pipe.unet, rank, 0)
    sd = {k.removeprefix('unet.'): v for k, v in load_file(str(Path(LCM_LORA) / LCM_WEIGHTS)).items()}
    got = {k: v for k, v in warm.state_dict().items() if 'lora' in k}
    assert any(torch.equal(v, sd[k.replace('.default', '')]) for k, v in got.items() if k.replace('.default', '') in sd)
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in got.items())
    with pytest.raises(ValueError, match='rank'): _student(pipe.unet, 4, 0, LCM_LORA)


def test_a_continued_run_records_the_run_it_continued_without_machine_paths(tmp_path):
    first = distill(tmp_path / 'first', log=None, **TINY)
    second = distill(tmp_path / 'second', log=None, **dict(TINY, steps=2, init_lora=str(first)))
    text = (second / LCM_INFO).read_text()
    assert str(tmp_path) not in text, text
    info = json.loads(text)
    assert info['init_lora'] == 'first' and info['steps'] == 2
    assert info['continued_from'] == lcm_info(first) and info['continued_from']['steps'] == 3
    bare = tmp_path / 'bare'; bare.mkdir()   # weights without a distill.json (a published LoRA): no invented record
    shutil.copy(first / LCM_WEIGHTS, bare / LCM_WEIGHTS)
    third = distill(tmp_path / 'third', log=None, **dict(TINY, steps=1, init_lora=str(bare)))
    assert lcm_info(third)['init_lora'] == 'bare' and 'continued_from' not in lcm_info(third)


# ==== models and records (issue 31): an LCM is used as one through generate too; pictures name their LoRA ==============

CIRCLE = 'a red circle on a blue background'


def caught(f):
    "f()'s result and the messages of the warnings it gave."
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        out = f()
    return out, [str(w.message) for w in ws]


@pytest.fixture(scope='module')
def lcm(): return lcm_pipeline()


@pytest.fixture(scope='module')
def tuned_lora(tmp_path_factory):
    "A fine-tune's LoRA folder (attention layers only, no distill.json)."
    d = tmp_path_factory.mktemp('tuned')
    data = ft.write_shapes_folder(d / 'data', n_new=4, n_old=0, seed=1)
    return ft.finetune(data, d / 'run', method='lora', steps=1, batch_size=2, progress=False).saved


@pytest.mark.parametrize('kw', [dict(num_inference_steps=12, guidance_scale=7.5), dict(), dict(num_inference_steps=50)])
def test_generate_refuses_steps_an_lcm_was_not_distilled_for(lcm, kw):
    with pytest.raises(ValueError, match=r'distilled for 1 to \d steps .*base model'): generate(lcm, CIRCLE, **kw)


def test_generate_on_an_lcm_warns_on_guidance_as_lcm_generate_does(lcm):
    _, said = caught(lambda: generate(lcm, CIRCLE, num_inference_steps=4))   # generate's default scale, 7.5
    assert any('guides again on top of the guidance baked into this model' in m for m in said), said
    res, said = caught(lambda: lcm_generate(lcm, CIRCLE, num_inference_steps=4))
    assert said == [], said                                          # its own defaults: no advice, nothing twice
    res2, said = caught(lambda: generate(lcm, CIRCLE, num_inference_steps=4, guidance_scale=1.0))
    assert said == [] and np.array_equal(np.asarray(res[0]), np.asarray(res2[0]))


def test_an_lcm_picture_names_its_lora_and_replays_on_the_lcm_only(lcm, pipe, tmp_path):
    res = lcm_generate(lcm, CIRCLE, seed=3, num_inference_steps=4)
    lora = res.settings[0]['extras']['Lora hashes']
    assert lora.startswith('shapes-lcm-lora: ') and len(lora.split(': ')[1]) == 12
    path = save_image(res[0], tmp_path / 'lcm.png', res.settings[0])
    assert read_settings(path)['extras'] == {'Lora hashes': lora}
    again, said = caught(lambda: replay(path, lcm))
    assert said == [] and np.array_equal(np.asarray(again), np.asarray(res[0]))   # no "use a scale above 1" advice
    _, said = caught(lambda: replay(path, load_pipeline()))
    assert any(f"made with Lora hashes: {lora}, and this pipeline has none" in m and 'lcm_pipeline(lora=' in m
               for m in said), said
    base = generate(pipe, CIRCLE, num_inference_steps=2).settings[0]
    with warnings.catch_warnings(record=True) as ws:   # a base-model picture on the LCM: said, then refused by its sampler
        warnings.simplefilter('always')
        with pytest.raises(TypeError, match=r"samples with DDIMScheduler, not a latent consistency model's"): replay(base, lcm)
    assert any('made with Lora hashes: none, and this pipeline has shapes-lcm-lora' in str(w.message) for w in ws)


def test_a_finetune_lora_is_refused_as_an_lcm_and_recorded_when_loaded(tuned_lora, tmp_path):
    with pytest.raises(ValueError, match=r"is not an LCM-LoRA: it has no distill.json and adapts only attention layers"):
        lcm_pipeline(lora=tuned_lora)
    from sd_intro.core import pipe_extras
    p = load_lora(load_pipeline(), tuned_lora)
    res = generate(p, CIRCLE, num_inference_steps=2)
    assert res.settings[0]['extras']['Lora hashes'].startswith('lora: ')
    assert pipe_extras(load_pipeline(p, kind='img2img'))[0].value == res.settings[0]['extras']['Lora hashes']
    _, said = caught(lambda: replay(res.settings[0], load_pipeline()))
    assert any('load the LoRA first: load_lora(pipe, FOLDER)' in m for m in said), said


def test_a_lora_folder_without_the_named_weights_is_named(tmp_path):
    (tmp_path / 'l').mkdir(); (tmp_path / 'l' / 'other.safetensors').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r"has no pytorch_lora_weights.safetensors; it holds \['other.safetensors'\]"):
        lcm_pipeline(lora=tmp_path / 'l')


def test_the_losses_run_with_the_models_on_another_device_than_the_schedule(pipe, cpu_indexed, on_meta):
    "On a GPU the schedule and the generator stay on the CPU while the UNets and batches move; `lcm_loss` once indexed "
    "the schedule with timesteps already moved, which broke every `--device cuda` run (found on an H200)."
    from sd_intro.distill import lcm_loss
    u, lat, cond = on_meta.unet, on_meta.latents, on_meta.cond
    ac = cpu_indexed(pipe.scheduler.alphas_cumprod.float())
    loss = lcm_loss(u, u, ac, lat, cond, cond[:1], torch.Generator().manual_seed(0), num_ddim_timesteps=20)
    assert loss.device.type == 'meta' and loss.shape == ()
    assert anchor_loss(u, ac, lat, lat, cond).device.type == 'meta'
