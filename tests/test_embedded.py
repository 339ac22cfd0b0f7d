"sd_intro.embedded's command line: its options, and what it hands `make_embedded`."
from pathlib import Path
import sd_intro
import sd_intro.embedded as E


def test_command_line_help_and_bad_options(command_line):
    command_line.check(E.main, 'sd_intro.embedded')


def test_command_line_hands_its_options_to_make_embedded(monkeypatch, tmp_path, command_line):
    got = []
    monkeypatch.setattr(E, 'make_embedded', lambda out, work, **kw: got.append(dict(kw, out=out, work=work)))
    command_line.run(E.main, ['--out', tmp_path / 'm', '--unet_steps', '5', '--n_images', '8', '--caption_noise', '0.5'])
    command_line.run(E.main, [])
    package = Path(sd_intro.__file__).parent
    (a, b) = got
    assert (a['out'], a['work'], a['unet_steps'], a['n_images'], a['caption_noise'], a['seed'], a['device']) == \
           (str(tmp_path / 'm'), None, 5, 8, 0.5, 0, 'cpu')
    assert (b['out'], b['judge_out'], b['unet_steps']) == (package / 'models' / 'shapes-sd', package / 'assets' / 'judge.safetensors', E.UNET_STEPS)
    assert a['judge_out'] == b['judge_out'] and callable(a['log'])


def test_diffusion_loss_runs_with_the_unet_on_another_device_than_the_schedule(pipe, cpu_indexed, on_meta):
    "The schedule and the generator stay on the CPU, the UNet and the batch move (the 'meta' device stands in for a GPU)."
    import torch
    from diffusers import DDPMScheduler
    u, lat, cond = on_meta.unet, on_meta.latents, on_meta.cond
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sched.alphas_cumprod = cpu_indexed(sched.alphas_cumprod)
    assert E.diffusion_loss(u, sched, lat, cond, torch.Generator().manual_seed(0)).device.type == 'meta'
    sched = DDPMScheduler.from_config(pipe.scheduler.config)   # (diffusers' `add_noise` moved the last one's schedule)
    sched.alphas_cumprod = cpu_indexed(sched.alphas_cumprod)
    with torch.device('meta'):   # fine-tuning runs the loss inside `torch.device(device)` on a GPU: the draws stay on the CPU
        assert E.diffusion_loss(u, sched, lat, cond, torch.Generator().manual_seed(0)).device.type == 'meta'


def test_the_unet_stage_resumes_quietly_and_refuses_other_settings(tmp_path):
    "Resumed with log=None it says nothing (and does not fail); resumed with another batch size it names the change."
    import pytest, torch
    from sd_intro.training import checkpoints
    torch.manual_seed(0)
    tok = E.build_tokenizer()
    def parts():
        p = E.build_components(tok, seed=0)
        for k in ('text_encoder', 'vae'): p[k].eval().requires_grad_(False)
        return p
    kw = dict(bs=2, n_images=8, eval_every=0, ckpt_every=1, log=None)
    E.train_unet(parts(), tmp_path, steps=1, **kw)
    E.train_unet(parts(), tmp_path, steps=2, **kw)
    assert [c.name for c in checkpoints(tmp_path)] == ['step-000002', 'step-000001']
    with pytest.raises(ValueError, match=r"other settings .*'bs': \(2, 4\).*delete .*checkpoints to train the UNet stage"):
        E.train_unet(parts(), tmp_path, steps=3, **dict(kw, bs=4))
