"Public API of sd_intro.core: grids, devices, loading (embedded and local 'real' checkpoints), seeding, settings."
import json, os, re, shutil, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

import sd_intro
from sd_intro.core import (EMBEDDED_MODEL, image_grid, choose_dtype, resolve_model, load_pipeline, generate, save_image,
                           read_settings, replay, parse_parameters, format_parameters, seeds_for, scheduler_for)
from sd_intro.loading import _has_fp16_variant, _LOADED   # the loader's own cache and weight probe (moved with it)


def tiles(n, size=(8, 8)): return [Image.new('RGB', size, (i * 20 % 255, 0, 0)) for i in range(n)]


# --- image_grid ---------------------------------------------------------------------------------
def test_grid_infers_missing_dimension_and_leaves_last_row_empty():
    g = image_grid(tiles(5), cols=3, min_tile=0)
    assert g.size == (24, 16)
    assert g.getpixel((20, 12)) == (255, 255, 255)   # the 6th tile is empty
    assert image_grid(tiles(6), rows=2, min_tile=0).size == (24, 16)
    assert image_grid(tiles(4), min_tile=0).size == (16, 16)     # as square as possible
    assert image_grid(tiles(4)).size == (256, 256)   # shown at 128 px a tile by default


def test_grid_labels_add_a_strip_under_each_tile():
    g = image_grid(tiles(2, (32, 32)), labels=['1.1', '14'], min_tile=0)
    assert g.size[0] == 64 and g.size[1] > 32 + 14
    strip = np.asarray(g)[33:, :32]
    assert (strip < 128).any(), "the label text was not drawn"


@pytest.mark.parametrize('imgs,kw,msg', [([], {}, 'imgs is empty'),
                                         (tiles(1) + tiles(1, (4, 4)), {}, 'mixed sizes'),
                                         (tiles(5), dict(rows=2, cols=2), 'too small'),
                                         (tiles(2), dict(labels=['a']), 'one label per image')])
def test_grid_bad_input(imgs, kw, msg):
    with pytest.raises(ValueError, match=msg): image_grid(imgs, **kw)


# --- devices and dtypes -------------------------------------------------------------------------
def test_dtype_by_device():
    assert choose_dtype('cpu') == ('cpu', torch.float32)
    assert choose_dtype('mps') == ('mps', torch.float32)
    assert choose_dtype('cuda') == ('cuda', torch.float16)
    assert choose_dtype('cpu', 'bf16') == ('cpu', torch.bfloat16)


def test_fp16_on_cpu_is_a_clear_error_not_a_torch_crash():
    with pytest.raises(ValueError, match=r"float16 on device='cpu'.*dtype=torch.float32"):
        load_pipeline(device='cpu', dtype=torch.float16)


# --- resolving and loading ----------------------------------------------------------------------
def test_model_resolution_order(monkeypatch):
    assert resolve_model() == EMBEDDED_MODEL == sd_intro.EMBEDDED_MODEL
    monkeypatch.setenv('SD_INTRO_MODEL', '/some/folder')
    assert resolve_model() == '/some/folder'
    assert resolve_model('x/y') == 'x/y'


def test_deleted_runwayml_id_maps_to_mirror():
    with pytest.warns(UserWarning, match='deleted'):
        assert resolve_model('runwayml/stable-diffusion-v1-5') == 'stable-diffusion-v1-5/stable-diffusion-v1-5'


def test_embedded_pipeline_loads_fast_and_is_a_real_sd_pipeline(pipe):
    from diffusers import StableDiffusionPipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    assert Path(EMBEDDED_MODEL, 'model_index.json').exists()
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == 'cpu'


def test_img2img_reuses_loaded_components(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline
    i2i = load_pipeline(pipe, kind='img2img')
    assert isinstance(i2i, StableDiffusionImg2ImgPipeline)
    assert i2i.unet is pipe.unet and i2i.vae is pipe.vae and i2i.text_encoder is pipe.text_encoder
    i2i_again = load_pipeline(kind='img2img')       # by name: a pipeline of its own (read from disk once, copied)
    assert isinstance(i2i_again, StableDiffusionImg2ImgPipeline) and i2i_again.unet is not pipe.unet


def test_bad_kind(pipe):
    with pytest.raises(ValueError, match="kind='depth2img'"): load_pipeline(kind='depth2img')


def test_missing_local_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match='model_index.json'):
        load_pipeline(str(tmp_path / 'nothing-here'))


def test_missing_hub_model_offline_names_model_and_fix(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(OSError, match=r"'someone/not-cached-model'.*huggingface-cli download someone/not-cached-model"):
        load_pipeline('someone/not-cached-model')


def test_local_checkpoint_loads_keeps_its_safety_checker_and_reports_blanked_images(local_checkpoint):
    assert _has_fp16_variant(local_checkpoint)
    assert not _has_fp16_variant(EMBEDDED_MODEL)
    pipe = load_pipeline(local_checkpoint)
    assert pipe.safety_checker is not None
    with pytest.warns(UserWarning, match='safety checker blanked 2 of 2'):
        res = generate(pipe, 'a red circle', seed=[1, 2], num_inference_steps=2)
    assert res.nsfw == [True, True] and all(s['nsfw'] for s in res.settings)
    assert np.asarray(res[0]).max() == 0    # blanked: black, and now reported


def test_bin_only_checkpoint_is_refused_with_the_fix(tmp_path, local_checkpoint):
    d = tmp_path / 'bin-only'
    shutil.copytree(local_checkpoint, d)
    for f in d.glob('*/*.safetensors'): f.unlink()
    (d / 'unet' / 'diffusion_pytorch_model.bin').write_bytes(b'not really a pickle')
    with pytest.raises((ValueError, FileNotFoundError, OSError), match='safetensors'):
        load_pipeline(str(d))


# --- seeded generation --------------------------------------------------------------------------
def test_seed_gives_same_image_whatever_batch_size_or_position(pipe):
    alone = np.asarray(generate(pipe, 'a blue star', seed=5, num_inference_steps=5)[0], int)
    batch = generate(pipe, 'a blue star', seed=[9, 5, 7], num_inference_steps=5)
    assert np.abs(np.asarray(batch[1], int) - alone).max() <= 2
    assert np.abs(np.asarray(batch[0], int) - alone).max() > 2   # another seed is another image


def test_generate_returns_settings_of_each_image(pipe):
    res = generate(pipe, ['a red circle', 'a green square'], seed=3, negative_prompt='blue', num_inference_steps=4,
                   guidance_scale=5.0)
    assert len(res) == 2 and [s['seed'] for s in res.settings] == [3, 4]
    s = res.settings[1]
    assert s | dict(prompt='a green square', negative_prompt='blue', steps=4, guidance_scale=5.0, width=64, height=64,
                    sampler='DDIM', model='embedded', nsfw=False) == s


@pytest.mark.parametrize('kw,msg', [(dict(seed=[1, 2], n=3), 'one seed per image'),
                                    (dict(num_inference_steps=0), 'num_inference_steps=0'),
                                    (dict(guidance_scale=-1.0), 'guidance_scale=-1.0: use a number of 0 or more'),
                                    (dict(n=3, prompt=['a', 'b']), 'n=3 but 2 prompts')])
def test_generate_bad_input(pipe, kw, msg):
    kw = {'prompt': 'a red circle', **kw}
    with pytest.raises(ValueError, match=msg): generate(pipe, **kw)


def test_guidance_at_most_one_warns_that_negative_prompt_is_dropped(pipe):
    with pytest.warns(UserWarning, match="negative_prompt='red' is ignored"):
        generate(pipe, 'a circle', negative_prompt='red', guidance_scale=1.0, num_inference_steps=2)


# --- settings in PNGs ---------------------------------------------------------------------------
def test_save_read_replay_roundtrip(pipe, tmp_path):
    res = generate(pipe, 'a yellow triangle on a black background', seed=11, negative_prompt='red',
                   num_inference_steps=6, guidance_scale=6.0)
    p = save_image(res[0], tmp_path / 'x.png', res.settings[0])
    s = read_settings(p)
    assert s['seed'] == 11 and s['negative_prompt'] == 'red' and s['steps'] == 6 and s['sampler'] == 'DDIM'
    assert 'Steps: 6, Sampler: DDIM, CFG scale: 6.0, Seed: 11, Size: 64x64' in Image.open(p).info['parameters']
    assert np.array_equal(np.asarray(replay(p, pipe)), np.asarray(res[0]))


def test_replay_swaps_the_scheduler_and_restores_it(pipe):
    res = generate(pipe, 'a red star', seed=1, num_inference_steps=4)
    s = dict(res.settings[0], sampler='Euler')
    before = type(pipe.scheduler)
    img = replay(s, pipe)
    assert type(pipe.scheduler) is before
    assert not np.array_equal(np.asarray(img), np.asarray(res[0]))   # Euler makes another image


def test_reads_automatic1111_parameters():
    text = ('a wolf\nNegative prompt: blurry, low quality\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, '
            'Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0')
    s = parse_parameters(text)
    assert s == dict(prompt='a wolf', negative_prompt='blurry, low quality', steps=20, sampler='Euler a',
                     guidance_scale=7.0, seed=42, width=512, height=768, model='v1-5-pruned-emaonly',
                     extra={'Model hash': '6ce0161689', 'Version': 'v1.6.0'})
    assert scheduler_for(s['sampler']).__name__ == 'EulerAncestralDiscreteScheduler'


def test_save_image_bad_paths_lose_nothing(tmp_path):
    img = Image.new('RGB', (8, 8))
    with pytest.raises(ValueError, match='use a .png name'): save_image(img, tmp_path / 'x.jpg', {})
    with pytest.raises(FileNotFoundError, match='create it first'): save_image(img, tmp_path / 'no' / 'x.png', {})
    (tmp_path / 'keep.png').write_bytes(b'old')

    class Broken(Image.Image):
        def save(self, *a, **k): raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'): save_image(Broken(), tmp_path / 'keep.png', {})
    assert (tmp_path / 'keep.png').read_bytes() == b'old'       # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ['keep.png']  # and no temp file is left


def test_read_settings_of_plain_png(tmp_path):
    Image.new('RGB', (4, 4)).save(tmp_path / 'plain.png')
    with pytest.raises(ValueError, match="no 'parameters' text chunk"): read_settings(tmp_path / 'plain.png')


def test_public_names_are_reexported():
    for name in ['load_pipeline', 'EMBEDDED_MODEL', 'image_grid', 'generate', 'save_image', 'read_settings', 'replay']:
        assert hasattr(sd_intro, name), name


@pytest.mark.filterwarnings('ignore:height x width')   # (the size note is tested on its own; here only the record)
@pytest.mark.parametrize('output_type', ['pil', 'np', 'pt'])
def test_settings_record_width_and_height_for_every_output_type(pipe, output_type):
    res = generate(pipe, 'a red circle', seed=0, num_inference_steps=2, height=64, width=96, output_type=output_type)
    assert (res.settings[0]['width'], res.settings[0]['height']) == (96, 64)


def test_settings_name_the_embedded_model_portably_and_old_path_records_still_replay(pipe):
    res = generate(pipe, 'a red circle', seed=3, num_inference_steps=4)
    assert res.settings[0]['model'] == 'embedded' and resolve_model('embedded') == EMBEDDED_MODEL
    old = dict(res.settings[0], model='/some/other/machine/site-packages/sd_intro/models/shapes-sd')
    with warnings.catch_warnings():
        warnings.simplefilter('error')          # a path recorded by an older version is the same model: no warning
        again = replay(old, pipe)
    assert np.array_equal(np.asarray(again), np.asarray(res[0]))
    with pytest.warns(UserWarning, match='were made with model'):
        replay(dict(res.settings[0], model='CompVis/stable-diffusion-v1-4'), pipe)


@pytest.mark.parametrize('kw,err,msg', [
    (dict(steps=2), TypeError, 'takes no steps= here; use num_inference_steps='),
    (dict(guidance=3), TypeError, 'use guidance_scale='),
    (dict(num_inference_stpes=2), TypeError, 'did you mean num_inference_steps='),
    (dict(generator=None), TypeError, 'use seed='),
    (dict(strength=0.5), TypeError, "kind='img2img'"),
    (dict(seed='42'), TypeError, 'use seed=42'),
    (dict(seed=[1, 2.5]), TypeError, 'each seed=2.5'),
    (dict(guidance_scale=float('inf')), ValueError, 'guidance_scale=inf'),
    (dict(guidance_scale='7.5'), ValueError, "guidance_scale='7.5'"),
    (dict(num_inference_steps=True), ValueError, 'num_inference_steps=True'),
    (dict(height=0), ValueError, 'height=0: use a multiple of 8'),
    (dict(width=100_000), ValueError, 'width=100000'),
    (dict(negative_prompt=['x', 'y']), TypeError, 'negative_prompt: 2 for 1 prompts'),
    (dict(prompt=123), TypeError, 'prompt=123 is a int'),
    (dict(prompt=['a', None]), TypeError, 'None is a NoneType'),
])
def test_generate_mistakes_are_named_before_any_work(pipe, monkeypatch, kw, err, msg):
    "Each mistake names its argument and the fix, and the pipeline is never called (nothing was silently ignored)."
    monkeypatch.setattr(pipe, 'encode_prompt', lambda *a, **k: pytest.fail('the pipeline ran'))
    kw = {'prompt': 'a red circle', 'num_inference_steps': 2, **kw}
    with pytest.raises(err, match=re.escape(msg)): generate(pipe, **kw)


def test_generate_takes_numpy_whole_numbers(pipe):
    g = generate(pipe, 'a red circle', seed=np.int64(3), num_inference_steps=np.int64(2))
    assert g.settings[0]['seed'] == 3 and g.settings[0]['steps'] == 2


def test_img2img_through_generate(pipe):
    from sd_intro.img2img import sketch_path
    i2i = load_pipeline(pipe, kind='img2img')
    with pytest.raises(ValueError, match='needs image='): generate(i2i, 'a red star')
    with pytest.raises(ValueError, match=r'raise num_inference_steps to at least 4'):
        generate(i2i, 'a red star', image=sketch_path(), strength=0.3, num_inference_steps=2)
    with pytest.raises(ValueError, match=r'strength=nan'):
        generate(i2i, 'a red star', image=sketch_path(), strength=float('nan'))
    with pytest.raises(TypeError, match=r'size from the starting image'):
        generate(i2i, 'a red star', image=sketch_path(), height=64)
    rgba = Image.new('RGBA', (64, 64), (255, 0, 0, 0))        # transparent: white after load_image, not latents
    g = generate(i2i, 'a red star', image=rgba, strength=0.5, num_inference_steps=4)
    assert g[0].size == (64, 64) and g.settings[0]['strength'] == 0.5


def test_plms_warm_up_needs_four_steps(pipe):
    from diffusers import PNDMScheduler
    from sd_intro.pipelines import swapped_scheduler
    with swapped_scheduler(pipe, PNDMScheduler.from_config(pipe.scheduler.config)):
        with pytest.raises(ValueError, match='PLMS'): generate(pipe, 'a red star', num_inference_steps=3)
        assert len(generate(pipe, 'a red star', num_inference_steps=4)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='cuda', but this torch sees no CUDA GPU"): load_pipeline(device='cuda')
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device: use 'cuda'"): load_pipeline(device='gpu')


def test_torch_dtype_is_taken_as_dtype():
    assert load_pipeline(torch_dtype=torch.float32).unet.dtype == torch.float32
    with pytest.raises(TypeError, match='not both'): load_pipeline(dtype='float32', torch_dtype=torch.float32)
    with pytest.raises(ValueError, match='floating-point dtype'): load_pipeline(dtype=torch.int8)


def test_a_loaded_pipeline_with_device_or_dtype_is_refused(pipe):
    with pytest.raises(ValueError, match=r'pipe.to\(device, dtype\)'): load_pipeline(pipe, kind='img2img', device='cpu')


def test_broken_and_missing_folders_name_the_problem(tmp_path, monkeypatch):
    broken = tmp_path / 'broken'
    shutil.copytree(EMBEDDED_MODEL, broken)
    shutil.rmtree(broken / 'vae')
    with pytest.raises(OSError, match=r'the pipeline folder has no vae/ folder, which model_index.json lists'):
        load_pipeline(broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no folder of that name in .*not a Hub id"): load_pipeline('my-model')


def test_save_image_and_replay_mistakes(pipe, tmp_path):
    res = generate(pipe, 'a red circle', seed=[1, 2], num_inference_steps=2)
    with pytest.raises(TypeError, match=r'Generation of 2 images; save one at a time'): save_image(res, tmp_path / 'a.png')
    with pytest.raises(TypeError, match=r'settings is a list of 2'): save_image(res[0], tmp_path / 'a.png', res.settings)
    one = generate(pipe, 'a red circle', seed=3, num_inference_steps=2)
    assert read_settings(save_image(one, tmp_path / 'one.png'))['seed'] == 3          # a one-image Generation is fine
    with pytest.raises(ValueError, match=r'settings have no seed'): replay({'prompt': 'x'}, pipe)
    with pytest.raises(ValueError, match=r'from img2img .*starting image'): replay({**one.settings[0], 'strength': 0.5}, pipe)
    assert not any(p.name.startswith('.') for p in tmp_path.iterdir())              # no temporary files left


def test_every_weight_of_the_shipped_model_loads():
    "A library version that cannot map a weight name leaves it random with only a log line: check none is left out."
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    for cls, sub in ((CLIPTextModel, 'text_encoder'), (UNet2DConditionModel, 'unet'), (AutoencoderKL, 'vae')):
        _, info = cls.from_pretrained(EMBEDDED_MODEL, subfolder=sub, output_loading_info=True)
        assert not info['missing_keys'] and not info['unexpected_keys'], (sub, info)


def test_save_pipeline_writes_classic_text_encoder_names_and_reloads_the_same(pipe, tmp_path):
    from safetensors.torch import load_file
    from sd_intro.core import save_pipeline
    out = save_pipeline(pipe, tmp_path / 'copy')
    keys = list(load_file(out / 'text_encoder' / 'model.safetensors'))
    assert keys and all(k.startswith('text_model.') for k in keys)          # the names every transformers 5.x reads
    again = load_pipeline(out)
    a = generate(pipe, 'a red star on a blue background', seed=1, num_inference_steps=4)[0]
    b = generate(again, 'a red star on a blue background', seed=1, num_inference_steps=4)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['copy']            # written atomically: no temporary folder


def test_calls_the_checks_must_not_refuse(pipe, tmp_path, monkeypatch):
    "Legitimate variations found by probing: each must work, not be refused."
    g = generate(pipe, ['a red star', 'a blue circle'], negative_prompt=['green', 'yellow'], num_inference_steps=2)
    assert [s['negative_prompt'] for s in g.settings] == ['green', 'yellow']
    assert generate(pipe, 'a red star', seed=np.array(7), num_inference_steps=2).settings[0]['seed'] == 7
    i2i = load_pipeline(pipe, kind='img2img')
    start = generate(pipe, 'a red star', num_inference_steps=2, output_type='np').images[0]   # floats in [0, 1]
    d = generate(i2i, 'a blue star', image=start, num_inference_steps=4)
    assert d.settings[0]['strength'] == 0.8            # the pipeline's default strength is recorded, not left out
    assert load_pipeline(torch_dtype='auto').unet.dtype == torch.float32
    monkeypatch.setenv('HOME', str(tmp_path))
    p = save_image(g[0], '~/a.png', g.settings[0])
    assert p == tmp_path / 'a.png' and read_settings('~/a.png')['negative_prompt'] == 'green'
    with pytest.raises(TypeError, match=r'replay\(src, pipe\)'): replay(pipe, p)


def test_automatic1111_karras_samplers_replay_on_karras_sigmas(pipe):
    from diffusers import DPMSolverMultistepScheduler
    from sd_intro.pipelines import swapped_scheduler
    karras = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with swapped_scheduler(pipe, karras):
        g = generate(pipe, 'a red star on a blue background', seed=4, num_inference_steps=4)
    assert g.settings[0]['sampler'] == 'DPM++ 2M Karras'
    again = replay(g.settings[0], pipe)               # from the pipeline's own DDIM: swaps to DPM++ on Karras sigmas
    assert np.abs(np.asarray(again, int) - np.asarray(g[0], int)).max() <= 1
    assert type(pipe.scheduler).__name__ == 'DDIMScheduler'   # restored


def test_a_variant_the_folder_lacks_is_named():
    with pytest.raises(ValueError, match=r"has no variant='fp16' weights; leave out variant="): load_pipeline(variant='fp16')


def test_a_callback_that_forgets_to_return_is_named(pipe):
    with pytest.raises(TypeError, match=r'end it with `return callback_kwargs`'):
        generate(pipe, 'a red star', num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: None)
    with pytest.raises(TypeError, match='is not callable'): generate(pipe, 'a red star', num_inference_steps=2, callback_on_step_end=3)
    seen = []
    generate(pipe, 'a red star', num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1]
    with pytest.warns(UserWarning, match='latents= decides the starting noise'):
        generate(pipe, 'a red star', num_inference_steps=2, latents=torch.randn(1, 4, 8, 8))
    assert image_grid(generate(pipe, 'a red star', num_inference_steps=2)[0]).size == (128, 128)   # one image is a grid of one
