"Lesson 2's sampler and guidance sweep: same images as diffusers' pipeline, on public APIs, with clear errors."
import warnings
import numpy as np
import pytest
import torch
from sd_intro.core import generate, generators, load_pipeline, replay
from sd_intro.guidance import (SEED_SCALES, Sampled, Sweep, decode, denoise, encode_prompts, guidance_sweep,
                               initial_latents, predicted_x0, sample)

PROMPT = 'a red circle on a blue background'
STEPS = 4   # few steps: equality of the loops does not need a good picture


def px(a, b):
    "Largest per-pixel difference between two lists of PIL images."
    return max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a, b, strict=True))


@pytest.fixture
def swap_scheduler(pipe):
    "Run a test with another scheduler class on the shared pipeline, then put the original back."
    old = pipe.scheduler
    def swap(cls, **kw):
        pipe.scheduler = cls.from_config(old.config, **kw)
        return pipe
    yield swap
    pipe.scheduler = old


def test_encode_prompts_shapes_and_negative(pipe):
    cond, uncond = encode_prompts(pipe, PROMPT, n=3)
    assert cond.shape[0] == uncond.shape[0] == 3 and cond.shape == uncond.shape
    empty, _ = encode_prompts(pipe, '')
    torch.testing.assert_close(uncond[:1], empty)               # "without the prompt" is the empty prompt...
    _, neg = encode_prompts(pipe, PROMPT, negative_prompt='blue')
    blue, _ = encode_prompts(pipe, 'blue')
    torch.testing.assert_close(neg, blue)                         # ...or the negative prompt instead of it
    c2, u2 = encode_prompts(pipe, [PROMPT, 'a green star'], negative_prompt=['blue', 'red'])
    assert c2.shape[0] == 2 and not torch.equal(u2[0], u2[1])


def test_encode_prompts_bad_inputs(pipe):
    with pytest.raises(ValueError, match='no prompts given'): encode_prompts(pipe, [])
    with pytest.raises(ValueError, match='2 for 1 prompts'): encode_prompts(pipe, PROMPT, negative_prompt=['a', 'b'])


def test_sample_equals_pipeline(pipe):
    ours = sample(pipe, PROMPT, seed=[3, 4], num_inference_steps=STEPS)
    out = pipe([PROMPT] * 2, generator=generators([3, 4]), num_inference_steps=STEPS, output_type='latent').images
    torch.testing.assert_close(ours.latents, out, rtol=1e-5, atol=1e-5)
    assert px(ours.images, generate(pipe, PROMPT, seed=[3, 4], num_inference_steps=STEPS).images) == 0
    assert isinstance(ours, Sampled) and ours.settings[1]['seed'] == 4 and ours.settings[0]['steps'] == STEPS


def test_sample_negative_prompt_equals_pipeline(pipe):
    ours = sample(pipe, PROMPT, seed=5, num_inference_steps=STEPS, negative_prompt='blue', guidance_scale=5)
    ref = generate(pipe, PROMPT, seed=5, num_inference_steps=STEPS, negative_prompt='blue', guidance_scale=5)
    assert px(ours.images, ref.images) == 0
    assert ours.settings[0]['negative_prompt'] == 'blue'


@pytest.mark.parametrize('name', ['PNDMScheduler', 'EulerDiscreteScheduler', 'EulerAncestralDiscreteScheduler'])
def test_sample_equals_pipeline_other_schedulers(pipe, swap_scheduler, name):
    "PNDM is Stable Diffusion 1.4's scheduler; Euler scales its inputs; Euler a draws noise from the generator."
    import diffusers
    kw = dict(skip_prk_steps=True) if name == 'PNDMScheduler' else {}
    swap_scheduler(getattr(diffusers, name), **kw)
    ours = sample(pipe, PROMPT, seed=[1, 2], num_inference_steps=STEPS)
    ref = generate(pipe, PROMPT, seed=[1, 2], num_inference_steps=STEPS)
    assert px(ours.images, ref.images) <= 1


def test_trace_records_the_two_predictions_and_their_mix(pipe):
    g = 6.0
    res = sample(pipe, PROMPT, seed=1, num_inference_steps=STEPS, guidance_scale=g, record=True)
    assert len(res.trace) == STEPS
    st = res.trace[1]
    assert {'t', 'latents', 'cond', 'uncond', 'guided', 'x0', 'x0_cond', 'x0_uncond'} <= set(st)
    torch.testing.assert_close(st['guided'], st['uncond'] + g * (st['cond'] - st['uncond']))
    # x0 is affine in the prediction, so the images mix with the same weights as the predictions
    torch.testing.assert_close(st['x0'], st['x0_uncond'] + g * (st['x0_cond'] - st['x0_uncond']), rtol=1e-4, atol=1e-4)
    # and it is what DDIM itself calls the predicted original sample
    pipe.scheduler.set_timesteps(STEPS)
    ddim = pipe.scheduler.step(st['guided'], st['t'], st['latents']).pred_original_sample
    torch.testing.assert_close(st['x0'], ddim, rtol=1e-4, atol=1e-4)
    imgs = decode(pipe, torch.cat([st['x0_uncond'], st['x0_cond'], st['x0']]))
    assert len(imgs) == 3 and imgs[0].size == (64, 64)


def test_predicted_x0_sigma_schedulers(pipe, swap_scheduler):
    "Euler works on sigma-scaled latents: our x0 must agree with its own predicted original sample."
    from diffusers import EulerDiscreteScheduler
    swap_scheduler(EulerDiscreteScheduler)
    res = sample(pipe, PROMPT, seed=2, num_inference_steps=STEPS, record=True)
    st = res.trace[2]
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    for t in sched.timesteps[:3]: x_in = sched.scale_model_input(st['latents'], t)  # move the step index to step 2
    x0 = predicted_x0(pipe, x_in, st['guided'], st['t'])
    ref = sched.step(st['guided'], st['t'], st['latents']).pred_original_sample
    torch.testing.assert_close(x0, ref, rtol=1e-4, atol=1e-4)


def test_guidance_at_most_one_turns_cfg_off_and_warns(pipe):
    with pytest.warns(UserWarning, match="negative_prompt='blue' is ignored"):
        off = sample(pipe, PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=1.0, negative_prompt='blue',
                     record=True)
    assert off.trace[0]['uncond'] is None
    with pytest.warns(UserWarning, match='turns classifier-free guidance off'):
        plain = sample(pipe, PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=1.0)
    assert px(off.images, plain.images) == 0              # the negative prompt did nothing
    with pytest.warns(UserWarning):
        half = sample(pipe, PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=0.5)
        ref = generate(pipe, PROMPT, seed=7, num_inference_steps=STEPS, guidance_scale=0.5)
    assert px(half.images, ref.images) == 0               # diffusers does no guidance below 1 either


def test_guidance_sweep_equals_separate_calls(pipe):
    scales = (1.1, 3, 14)
    sw = guidance_sweep(pipe, PROMPT, scales, n=3, seed=10, num_inference_steps=STEPS)
    assert isinstance(sw, Sweep) and len(sw) == 9 and len(sw.labels) == 9
    assert sw.grid().size[0] == 3 * 128 and sw.grid().size[1] > 3 * 128   # tiles shown at 128 px, labels under them
    for s in scales:
        ref = generate(pipe, PROMPT, seed=10, n=3, guidance_scale=s, num_inference_steps=STEPS)
        assert px(sw.row(s), ref.images) <= 1
        assert [st['seed'] for st in sw.settings if st['guidance_scale'] == s] == [10, 11, 12]
    assert px([replay(sw.settings[4], pipe)], [sw.images[4]]) <= 1     # each image's settings make it again


def test_guidance_sweep_prompt_list_negative_and_scale_one(pipe):
    prompts = ['a red circle', 'a green star']
    with pytest.warns(UserWarning, match='ignored'):
        sw = guidance_sweep(pipe, prompts, (1.0, 7), n=None, seed=[4, 9], num_inference_steps=STEPS,
                            negative_prompt='blue')
    with pytest.warns(UserWarning):
        one = generate(pipe, prompts, seed=[4, 9], guidance_scale=1.0, num_inference_steps=STEPS, negative_prompt='blue')
    seven = generate(pipe, prompts, seed=[4, 9], guidance_scale=7, num_inference_steps=STEPS, negative_prompt='blue')
    assert px(sw.row(1.0), one.images) <= 1 and px(sw.row(7.0), seven.images) <= 1


def test_seed_scales():
    assert SEED_SCALES == (1.1, 3, 7, 14)


def test_decode_uses_the_vae_scaling_factor(pipe):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    old = pipe.vae.config.scaling_factor
    a = decode(pipe, z)
    pipe.vae.register_to_config(scaling_factor=old * 2)
    try: b = decode(pipe, z * 2)
    finally: pipe.vae.register_to_config(scaling_factor=old)
    assert px(a, b) <= 1


def test_bad_inputs(pipe):
    cond, uncond = encode_prompts(pipe, PROMPT, n=2)
    pipe.scheduler.set_timesteps(STEPS)
    z = initial_latents(pipe, generators([0, 1]))
    with pytest.raises(ValueError, match='cond has 2 rows for 3 latents'):
        denoise(pipe, torch.cat([z, z[:1]]), cond, uncond, pipe.scheduler.timesteps)
    with pytest.raises(ValueError, match='uncond must be given'):
        denoise(pipe, z, cond, None, pipe.scheduler.timesteps)
    with pytest.raises(ValueError, match='3 scales for 2 latents'):
        denoise(pipe, z, cond, uncond, pipe.scheduler.timesteps, guidance_scales=[1, 2, 3])
    with pytest.raises(ValueError, match='negative scale'):
        denoise(pipe, z, cond, uncond, pipe.scheduler.timesteps, guidance_scales=[-1, 2])
    with pytest.raises(ValueError, match='guidance_scale=-2: use a number of 0 or more'):
        sample(pipe, PROMPT, guidance_scale=-2, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match='num_inference_steps=0'):
        sample(pipe, PROMPT, num_inference_steps=0)
    with pytest.raises(ValueError, match='multiples of 8'):
        initial_latents(pipe, generators([0]), height=60)
    with pytest.raises(ValueError, match='no guidance scales'):
        guidance_sweep(pipe, PROMPT, [], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match='n=4 but 2 prompts'):
        guidance_sweep(pipe, ['a', 'b'], num_inference_steps=STEPS)


def test_local_checkpoint_folder(pipe, tmp_path):
    "The real-checkpoint path: a pipeline folder on disk, loaded by `load_pipeline`, sampled by hand."
    pipe.save_pretrained(tmp_path / 'sd', safe_serialization=True)
    local = load_pipeline(str(tmp_path / 'sd'))
    ours = sample(local, PROMPT, seed=0, num_inference_steps=STEPS)
    assert px(ours.images, generate(pipe, PROMPT, seed=0, num_inference_steps=STEPS).images) == 0
    assert ours.settings[0]['model'] == str(tmp_path / 'sd')   # a local checkpoint is recorded by its folder


def test_sweep_and_helper_mistakes(pipe):
    from sd_intro.core import generators
    with pytest.raises(TypeError, match=r'scales=7.5: pass a list'): guidance_sweep(pipe, PROMPT, scales=7.5)
    with pytest.raises(ValueError, match=r"n='2'"): guidance_sweep(pipe, PROMPT, n='2')
    with pytest.raises(ValueError, match=r'n=-1'): guidance_sweep(pipe, PROMPT, n=-1)
    with pytest.raises(ValueError, match=r'num_inference_steps=0'): guidance_sweep(pipe, PROMPT, num_inference_steps=0)
    with pytest.raises(ValueError, match=r'height=60'): sample(pipe, PROMPT, height=60, num_inference_steps=STEPS)
    with pytest.raises(TypeError, match=r'pass generators\(seeds\), not the seeds'): initial_latents(pipe, [0, 1])
    assert initial_latents(pipe, generators([0, 1])).shape[0] == 2
