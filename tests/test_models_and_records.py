"Reliability round 4 (issue 31), models and records: an LCM is used as one through generate too, pictures name the LoRA that made them and replay says when it is missing, load_parts checks as load_pipeline does, web-UI JPEG/WebP records are read and out-of-range fields refused by name, pipelines sharing a scheduler are thread-safe."
import json, shutil, threading, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

import sd_intro.finetune as ft
from sd_intro.core import (EMBEDDED_MODEL, generate, load_lora, load_pipeline, make_scheduler, read_settings, replay,
                           save_image)
from sd_intro.distill import LCM_LORA, lcm_generate, lcm_pipeline

PROMPT = 'a red circle on a blue background'


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


# ---- an LCM is used as what it is ---------------------------------------------------------------------------

@pytest.mark.parametrize('kw', [dict(num_inference_steps=12, guidance_scale=7.5), dict(), dict(num_inference_steps=50)])
def test_generate_refuses_steps_an_lcm_was_not_distilled_for(lcm, kw):
    with pytest.raises(ValueError, match=r'distilled for 1 to \d steps .*base model'): generate(lcm, PROMPT, **kw)


def test_generate_on_an_lcm_warns_on_guidance_as_lcm_generate_does(lcm):
    _, said = caught(lambda: generate(lcm, PROMPT, num_inference_steps=4))   # generate's default scale, 7.5
    assert any('guides again on top of the guidance baked into this model' in m for m in said), said
    res, said = caught(lambda: lcm_generate(lcm, PROMPT, num_inference_steps=4))
    assert said == [], said                                          # its own defaults: no advice, nothing twice
    res2, said = caught(lambda: generate(lcm, PROMPT, num_inference_steps=4, guidance_scale=1.0))
    assert said == [] and np.array_equal(np.asarray(res[0]), np.asarray(res2[0]))


def test_an_lcm_picture_names_its_lora_and_replays_on_the_lcm_only(lcm, pipe, tmp_path):
    res = lcm_generate(lcm, PROMPT, seed=3, num_inference_steps=4)
    lora = res.settings[0]['extras']['Lora hashes']
    assert lora.startswith('shapes-lcm-lora: ') and len(lora.split(': ')[1]) == 12
    path = save_image(res[0], tmp_path / 'lcm.png', res.settings[0])
    assert read_settings(path)['extras'] == {'Lora hashes': lora}
    again, said = caught(lambda: replay(path, lcm))
    assert said == [] and np.array_equal(np.asarray(again), np.asarray(res[0]))   # no "use a scale above 1" advice
    _, said = caught(lambda: replay(path, load_pipeline()))
    assert any(f"made with Lora hashes: {lora}, and this pipeline has none" in m and 'lcm_pipeline(lora=' in m
               for m in said), said
    base = generate(pipe, PROMPT, num_inference_steps=2).settings[0]
    with warnings.catch_warnings(record=True) as ws:   # a base-model picture on the LCM: said, then refused by its sampler
        warnings.simplefilter('always')
        with pytest.raises(TypeError, match=r"samples with DDIMScheduler, not a latent consistency model's"): replay(base, lcm)
    assert any('made with Lora hashes: none, and this pipeline has shapes-lcm-lora' in str(w.message) for w in ws)


def test_a_finetune_lora_is_refused_as_an_lcm_and_recorded_when_loaded(tuned_lora, tmp_path):
    with pytest.raises(ValueError, match=r"is not an LCM-LoRA: it has no distill.json and adapts only attention layers"):
        lcm_pipeline(lora=tuned_lora)
    from sd_intro.core import pipe_extras
    p = load_lora(load_pipeline(), tuned_lora)
    res = generate(p, PROMPT, num_inference_steps=2)
    assert res.settings[0]['extras']['Lora hashes'].startswith('lora: ')
    assert pipe_extras(load_pipeline(p, kind='img2img'))[0].value == res.settings[0]['extras']['Lora hashes']
    _, said = caught(lambda: replay(res.settings[0], load_pipeline()))
    assert any('load the LoRA first: load_lora(pipe, FOLDER)' in m for m in said), said


def test_a_lora_folder_without_the_named_weights_is_named(tmp_path):
    (tmp_path / 'l').mkdir(); (tmp_path / 'l' / 'other.safetensors').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r"has no pytorch_lora_weights.safetensors; it holds \['other.safetensors'\]"):
        lcm_pipeline(lora=tmp_path / 'l')


# ---- load_parts checks as load_pipeline does ------------------------------------------------------------------

def test_load_parts_names_missing_folders_parts_and_a_foreign_scheduler(tmp_path, monkeypatch):
    from sd_intro.inside import load_parts
    with pytest.raises(FileNotFoundError, match=r"no diffusers pipeline folder there"): load_parts(tmp_path / 'nothing')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no folder of that name in .*not a Hub id"): load_parts('my-model')
    m = tmp_path / 'm'; shutil.copytree(EMBEDDED_MODEL, m); shutil.rmtree(m / 'unet')
    with pytest.raises(FileNotFoundError, match=r"has no unet/ folder"): load_parts(m)
    shutil.rmtree(m); shutil.copytree(EMBEDDED_MODEL, m)
    cfg = json.loads((m / 'scheduler' / 'scheduler_config.json').read_text())
    (m / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(dict(cfg, _class_name='AutoencoderKL')))
    with pytest.raises(ValueError, match=r"names 'AutoencoderKL', which is not a diffusers scheduler"): load_parts(m)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='sees no CUDA GPU'): load_parts(device='cuda')


def test_load_parts_loads_without_float32_notes(capfd):
    from sd_intro.inside import load_parts
    capfd.readouterr()
    parts = load_parts()
    assert 'should be kept in float32' not in ''.join(capfd.readouterr()) and parts.unet.dtype == torch.float32


# ---- records from outside ------------------------------------------------------------------------------------

WEBUI = ('a red circle\nNegative prompt: blue\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, '
         'Model: sd15, Lora hashes: "detail: 0123456789ab"')


@pytest.mark.parametrize('fmt, head, enc', [('JPEG', b'UNICODE\0', 'utf-16-be'), ('WEBP', b'UNICODE\0', 'utf-16-be'),
                                            ('JPEG', b'UNICODE\0', 'utf-16-le'), ('JPEG', b'ASCII\0\0\0', 'ascii')])
def test_webui_jpeg_and_webp_records_are_read_from_exif(tmp_path, fmt, head, enc):
    exif = Image.Exif()
    exif[0x8769] = {0x9286: head + WEBUI.encode(enc)}   # the Exif IFD's UserComment, as the web UI writes it
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


# ---- threads -------------------------------------------------------------------------------------------------

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
