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
import base64, threading, time
from PIL import PngImagePlugin
import sd_intro.core as core
from sd_intro.core import make_scheduler


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


# ==== reliability (issue 17): atomic PNG writes, fresh pipelines, thread safety, records as data, web-UI PNGs, parse errors ===

PROMPT = 'a red circle on a blue background'


def _png(path, text):
    info = PngImagePlugin.PngInfo(); info.add_text('parameters', text)
    Image.new('RGB', (64, 64), 'white').save(path, pnginfo=info)
    return path


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


@pytest.mark.parametrize('name', ['AutoencoderKL', 'StableDiffusionPipeline', 'os.system'])
def test_a_sampler_name_builds_only_schedulers(pipe, name):
    s = dict(prompt=PROMPT, seed=0, steps=2, sampler=name)
    with pytest.raises(ValueError, match='not a known sampler'): replay(s, pipe)
    assert type(pipe.scheduler).__name__ == 'DDIMScheduler'


WEBUI_HIRES = ('a fox in the snow\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, '
         'Seed: 3, Size: 64x64, Model hash: 6ce0161689, Model: embedded, Denoising strength: 0.7, Clip skip: 2, '
         'Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent, Version: v1.10.1')


def test_a_webui_txt2img_png_with_hires_fix_karras_and_clip_skip_replays(pipe, tmp_path):
    from diffusers import DPMSolverMultistepScheduler
    s = read_settings(_png(tmp_path / 'webui.png', WEBUI_HIRES))
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


@pytest.mark.parametrize('field,msg', [('Steps: abc', "'Steps: abc' is not a whole number"),
                                       ('Seed: 1.5', "'Seed: 1.5' is not a whole number"),
                                       ('Size: 64', "'Size: 64' is not WIDTHxHEIGHT"),
                                       ('Size: 64x64x3', "'Size: 64x64x3' is not WIDTHxHEIGHT")])
def test_damaged_png_parameters_are_named(tmp_path, field, msg):
    text = 'a fox\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64'
    k = field.split(':')[0]
    text = re.sub(rf'{k}: [^,]*', field, text)
    with pytest.raises(ValueError, match=re.escape(msg)): read_settings(_png(tmp_path / 'bad.png', text))


def test_absurd_image_counts_are_refused_before_any_allocation(pipe, monkeypatch):
    monkeypatch.setattr(core, 'generators', lambda seeds: pytest.fail(f'allocated {len(seeds)} generators'))
    monkeypatch.setattr(core, 'seeds_for', lambda seed, n: pytest.fail(f'made {n} seeds'))
    with pytest.raises(ValueError, match='n=10000000: .*at most 4096'): generate(pipe, PROMPT, n=10**7)


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


# ==== models and records (issue 31): web-UI JPEG/WebP records, out-of-range fields refused by name, shared schedulers ===

WEBUI_EXIF = ('a red circle\nNegative prompt: blue\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, '
         'Model: sd15, Lora hashes: "detail: 0123456789ab"')


@pytest.mark.parametrize('fmt, head, enc', [('JPEG', b'UNICODE\0', 'utf-16-be'), ('WEBP', b'UNICODE\0', 'utf-16-be'),
                                            ('JPEG', b'UNICODE\0', 'utf-16-le'), ('JPEG', b'ASCII\0\0\0', 'ascii')])
def test_webui_jpeg_and_webp_records_are_read_from_exif(tmp_path, fmt, head, enc):
    exif = Image.Exif()
    exif[0x8769] = {0x9286: head + WEBUI_EXIF.encode(enc)}   # the Exif IFD's UserComment, as the web UI writes it
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new('RGB', (64, 64), 'white').save(path, format=fmt, exif=exif.tobytes())
    s = read_settings(path)
    assert s['prompt'] == 'a red circle' and s['negative_prompt'] == 'blue' and s['steps'] == 20 and s['seed'] == 5
    assert s['extras'] == {'Lora hashes': 'detail: 0123456789ab'} and read_settings(Image.open(path))['sampler'] == 'Euler a'


def test_a_jpeg_without_settings_says_where_they_would_be(tmp_path):
    Image.new('RGB', (8, 8)).save(tmp_path / 'x.jpg')
    with pytest.raises(ValueError, match=r"no 'parameters' text chunk \(PNG\) or EXIF UserComment \(JPEG, WebP\)"):
        read_settings(tmp_path / 'x.jpg')


@pytest.mark.parametrize('field, value, msg', [
    ('clip_skip', 99, r"'Clip skip: 99' is not from 1 \(the last layer\) to 2"),
    ('width', 4096, r"'Size: 4096x64' is 64 times the area"),
    ('steps', 0, r"'Steps: 0' is not from 1 to 1000"),
    ('steps', 5000, r"'Steps: 5000' is not from 1 to 1000"),
    ('guidance_scale', float('inf'), r"'CFG scale: inf' is not a number"),
    ('width', 100, r"'Size: 100x64' is not two multiples of 8")])
def test_out_of_range_record_values_are_refused_by_field(pipe, field, value, msg):
    s = {**dict(prompt=PROMPT, seed=1, steps=2, width=64, height=64), field: value}
    with pytest.raises(ValueError, match=msg): replay(s, pipe)


def test_a_webui_record_of_4096_px_is_refused_before_running(pipe, tmp_path):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo(); info.add_text('parameters', 'a red circle\nSteps: 20, Seed: 1, Size: 4096x4096')
    Image.new('RGB', (8, 8)).save(tmp_path / 'big.png', pnginfo=info)
    with pytest.raises(ValueError, match=r"'Size: 4096x4096' is 4096 times the area this model was trained at \(64x64\)"):
        replay(tmp_path / 'big.png', pipe)


def test_generate_refuses_a_clip_skip_beyond_the_encoder(pipe):
    with pytest.raises(ValueError, match=r'clip_skip=99: .*from 0 to 1 \(this text encoder has 2 layers\)'):
        generate(pipe, PROMPT, num_inference_steps=2, clip_skip=99)


@pytest.mark.parametrize('name', ['FlowMatchEulerDiscreteScheduler', 'FlowMatchHeunDiscreteScheduler'])
def test_a_flow_matching_sampler_is_refused_by_name(pipe, name):
    with pytest.raises(ValueError, match=rf"sampler='{name}' \({name}\) does not work with this pipeline's DDIMScheduler"):
        replay(dict(prompt=PROMPT, seed=1, steps=2, sampler=name), pipe)


def test_pipelines_sharing_a_scheduler_give_the_serial_pictures_from_threads():
    a, b = load_pipeline(), load_pipeline()
    a.scheduler = b.scheduler = make_scheduler('Euler', a.scheduler.config)   # two UNets, one scheduler: Euler counts its steps
    jobs = [(p, s, n) for s in range(3) for p, n in ((a, 8), (b, 6))]
    serial = [np.asarray(generate(p, PROMPT, seed=s, num_inference_steps=n, guidance_scale=3)[0]) for p, s, n in jobs]
    got, errors = [None] * len(jobs), []
    def run(i):
        try: got[i] = np.asarray(generate(jobs[i][0], PROMPT, seed=jobs[i][1], num_inference_steps=jobs[i][2], guidance_scale=3)[0])
        except Exception as e: errors.append(e)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors and all(np.array_equal(x, y) for x, y in zip(got, serial))
