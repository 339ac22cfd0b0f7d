"Lesson 1 helpers (sd_intro.pipelines): step-by-step recording with callback_on_step_end, sweeps, scheduler swaps."
import json
import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from sd_intro.core import generators, load_pipeline, Generation
from sd_intro.pipelines import (StepRecorder, Progress, decode_latents, denoising_progress, markdown_table, predict_x0,
                                scheduler_sweep, steps_sweep, swapped_scheduler, sweep_table, timesteps_for)

PROMPT = 'a red circle on a blue background'


def px(img): return np.asarray(img, int)


def test_callback_on_two_step_call_gives_two_decoded_images(pipe):
    rec = StepRecorder(pipe)
    with rec:
        out = pipe(PROMPT, num_inference_steps=2, generator=generators([0]), callback_on_step_end=rec)
    p = rec.progress(out.images[0])
    assert isinstance(p, Progress) and len(p) == 2
    assert [im.size for im in p.latents] == [(64, 64)] * 2
    assert [im.size for im in p.predicted] == [(64, 64)] * 2
    assert p.steps == [0, 1] and p.timesteps == timesteps_for(pipe.scheduler, 2)
    assert p.x0_source == 'scheduler' and p.start.size == (64, 64)
    assert np.array_equal(px(p.latents[-1]), px(out.images[0]))  # the last latents decode to the output
    assert torch.equal(rec.start, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))  # the seed's noise
    assert 'step' not in pipe.scheduler.__dict__


def test_recorder_does_not_change_the_image(pipe):
    plain = pipe(PROMPT, num_inference_steps=3, generator=generators([5])).images[0]
    p = denoising_progress(pipe, PROMPT, seed=5, num_inference_steps=3)
    assert np.array_equal(px(plain), px(p.image))
    assert p.settings['seed'] == 5 and p.settings['steps'] == 3


def test_every_keeps_the_last_step(pipe):
    p = denoising_progress(pipe, PROMPT, num_inference_steps=5, every=3)
    assert p.steps == [0, 3, 4]
    assert p.start.size == (64, 64)  # the starting noise comes first in the strip
    assert p.strip().size[0] == 4 * 128 and p.strip().size[1] > 2 * 128
    assert p.strip(size=32).size[0] == 4 * 128   # small tiles are shown at 128 px


def test_index_follows_one_image_of_a_batch(pipe):
    rec = StepRecorder(pipe, index=1)
    with rec:
        out = pipe([PROMPT] * 2, num_inference_steps=2, generator=generators([0, 1]), callback_on_step_end=rec)
    assert np.abs(px(rec.progress().latents[-1]) - px(out.images[1])).max() <= 2  # batched decoding: last-bit float noise


def test_scheduler_is_unwrapped_after_an_error(pipe):
    rec = StepRecorder(pipe)
    with pytest.raises(ValueError, match='divisible by 8'):
        with rec:
            pipe(PROMPT, num_inference_steps=2, height=60, width=60, callback_on_step_end=rec)
    assert 'step' not in pipe.scheduler.__dict__


@pytest.mark.parametrize('sampler,source', [('DDIM', 'scheduler'), ('Euler', 'scheduler'), ('Euler a', 'scheduler'),
                                            ('DPM++ 2M', 'alphas_cumprod'), ('UniPC', 'alphas_cumprod')])
def test_every_scheduler_records_x0(pipe, sampler, source):
    with swapped_scheduler(pipe, sampler):
        rec = StepRecorder(pipe)
        with rec:
            out = pipe(PROMPT, num_inference_steps=3, generator=generators([2]), callback_on_step_end=rec)
    p = rec.progress(out.images[0])
    assert p.x0_source == source and len(p.predicted) == 3 and None not in p.predicted
    assert np.abs(px(p.latents[-1]) - px(out.images[0])).max() <= 1


def test_sigma_space_latents_are_brought_to_the_unets_scale(pipe):
    from sd_intro.pipelines import _sigma_scale
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config); euler.set_timesteps(5)
    euler.step(eps, euler.timesteps[0], x * euler.init_noise_sigma)
    sigma = float(euler.sigmas[1])
    assert sigma > 1 and abs(_sigma_scale(euler) - 1 / (sigma ** 2 + 1) ** 0.5) < 1e-6  # what scale_model_input does
    ddim = DDIMScheduler.from_config(pipe.scheduler.config); ddim.set_timesteps(5)
    ddim.step(eps, ddim.timesteps[0], x)
    assert _sigma_scale(ddim) == 1.0


def test_predict_x0_agrees_with_the_schedulers(pipe):
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config); ddim.set_timesteps(5)
    t = ddim.timesteps[1]
    torch.testing.assert_close(predict_x0(ddim, eps, t, sample), ddim.step(eps, t, sample).pred_original_sample)
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config); dpm.set_timesteps(5)
    t = dpm.timesteps[0]
    dpm.step(eps, t, sample)
    torch.testing.assert_close(predict_x0(dpm, eps, t, sample), dpm.model_outputs[-1])  # DPM-Solver++ works in x0
    unipc = UniPCMultistepScheduler.from_config(pipe.scheduler.config); unipc.set_timesteps(5)
    t = unipc.timesteps[0]
    unipc.step(eps, t, sample)
    torch.testing.assert_close(predict_x0(unipc, eps, t, sample), unipc.model_outputs[-1])  # so does UniPC


def test_recorder_outside_with_records_latents_only(pipe):
    rec = StepRecorder(pipe)
    out = pipe(PROMPT, num_inference_steps=2, generator=generators([0]), callback_on_step_end=rec)
    p = rec.progress(out.images[0])
    assert len(p.latents) == 2 and p.predicted == [None, None] and p.x0_source == 'unknown' and p.start is None
    assert p.strip().size[0] == 2 * 128


def test_predict_x0_bad_prediction_type(pipe):
    s = DDIMScheduler.from_config(pipe.scheduler.config)
    s.register_to_config(prediction_type='flow')
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="prediction_type='flow'"): predict_x0(s, x, 10, x)


def test_img2img_pipeline(pipe):
    i2i = load_pipeline(pipe, kind='img2img')
    init = Image.new('RGB', (64, 64), (40, 80, 220))
    p = denoising_progress(i2i, PROMPT, seed=3, num_inference_steps=4, every=1, image=init, strength=0.5)
    assert len(p) == 2 and p.start is not None  # img2img runs int(steps * strength) steps, from the noised image


def test_local_v_prediction_checkpoint(pipe, tmp_path):
    "A local diffusers folder whose scheduler predicts v (like Stable Diffusion 2) takes the v formula."
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    cfg = tmp_path / 'scheduler' / 'scheduler_config.json'
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), 'prediction_type': 'v_prediction'}))
    vpipe = load_pipeline(str(tmp_path))
    assert vpipe.scheduler.config.prediction_type == 'v_prediction'
    with swapped_scheduler(vpipe, 'DPM++ 2M'):
        p = denoising_progress(vpipe, PROMPT, num_inference_steps=2)
    assert p.x0_source == 'alphas_cumprod' and len(p.predicted) == 2


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match='every=0'): StepRecorder(pipe, every=0)
    with pytest.raises(ValueError, match='index=-1'): StepRecorder(pipe, index=-1)
    with pytest.raises(ValueError, match='nothing recorded'): StepRecorder(pipe).progress()
    with pytest.raises(ValueError, match='sets callback_on_step_end'):
        denoising_progress(pipe, PROMPT, callback_on_step_end=lambda *a: {})
    with pytest.raises(ValueError, match='num_inference_steps=0'): denoising_progress(pipe, PROMPT, num_inference_steps=0)
    rec = StepRecorder(pipe, index=3)
    with pytest.raises(IndexError, match='index=3 but the batch has 1'):
        with rec: pipe(PROMPT, num_inference_steps=1, callback_on_step_end=rec)
    with pytest.raises(ValueError, match='N x C x h x w'): decode_latents(pipe, torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match='3 channels'): decode_latents(pipe, torch.zeros(1, 3, 8, 8))


def test_swapped_scheduler_restores(pipe):
    old = pipe.scheduler
    with swapped_scheduler(pipe, EulerDiscreteScheduler) as s:
        assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and s is pipe.scheduler
        assert s.config.beta_schedule == old.config.beta_schedule  # from_config keeps the training schedule
    assert pipe.scheduler is old
    with pytest.raises(RuntimeError, match='boom'):
        with swapped_scheduler(pipe, 'DPM++ 2M'): raise RuntimeError('boom')
    assert pipe.scheduler is old
    with pytest.raises(ValueError, match='not a known sampler'):
        with swapped_scheduler(pipe, 'Magic'): pass
    with pytest.raises(TypeError, match='sampler=3'):
        with swapped_scheduler(pipe, 3): pass


def test_timesteps_for_leaves_the_scheduler_alone(pipe):
    before = list(pipe.scheduler.timesteps)
    assert timesteps_for(pipe.scheduler, 1) == [1]  # 'leading' spacing: one step starts at timestep 1
    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing')
    assert timesteps_for(trailing, 2) == [999, 499]
    assert list(pipe.scheduler.timesteps) == before


def test_sweeps(pipe):
    res = steps_sweep(pipe, [PROMPT, 'a green star'], steps=(1, 3), seed=[4, 5])
    assert list(res) == [1, 3]
    assert [s['steps'] for s in res[3].settings] == [3, 3] and [s['seed'] for s in res[1].settings] == [4, 5]
    old = pipe.scheduler
    by = scheduler_sweep(pipe, PROMPT, ('DDIM', EulerDiscreteScheduler), num_inference_steps=2, seed=1)
    assert list(by) == ['DDIM', 'Euler'] and by['Euler'].settings[0]['sampler'] == 'Euler'
    assert pipe.scheduler is old


def test_sweep_table_and_markdown(pipe):
    from sd_intro.shapes import JudgeNet
    red, blue = Image.new('RGB', (64, 64), 'red'), Image.new('RGB', (64, 64), 'blue')
    res = {1: Generation([red, red], [dict(prompt='a red circle')] * 2),
           50: Generation([red, blue], [dict(prompt='a blue square')] * 2)}
    rows = sweep_table(res, reference=50, net=JudgeNet())
    assert set(rows[1]) == {'colour', 'shape', 'all', 'Δ ref'}
    assert rows[50]['Δ ref'] == 0 and rows[1]['Δ ref'] > 0
    assert all(0 <= rows[1][k] <= 1 for k in ('colour', 'shape', 'all'))
    assert set(sweep_table(res, reference=50, judged=False)[1]) == {'Δ ref'}
    with pytest.raises(KeyError, match='reference=2'): sweep_table(res, reference=2, judged=False)
    assert markdown_table({5: {'colour': 0.5, 'Δ ref': 3.25}}, 'steps') == \
        '| steps | colour | Δ ref |\n|---|---|---|\n| 5 | 50% | 3.2 |'
