"The playground panel's logic, driven from Python: no browser, no kernel (ipywidgets work without a frontend)."
import datetime, io, threading
import numpy as np
import pytest
from PIL import Image

from sd_intro.core import generate, read_settings
from sd_intro import widgets
from sd_intro.widgets import Playground, check_settings, playground, scheduler_choices, size_choices, to_png

PROMPT = 'a red circle on a blue background'


@pytest.fixture
def pg(pipe):
    p = playground(pipe, steps=4, preview_every=0)  # preview_every=0: decode every step, so previews are tested
    yield p
    p.stop(); assert p.wait(60)


def gate_steps(pg):
    "Make `pg`'s runs pause inside their first step until the returned event is set."
    gate, entered = threading.Event(), threading.Event()
    orig = pg._on_step
    def slow(*a):
        entered.set(); assert gate.wait(30)
        return orig(*a)
    pg._on_step = slow
    return gate, entered


def png_bytes(colour='green', size=(40, 30)):
    buf = io.BytesIO(); Image.new('RGB', size, colour).save(buf, format='PNG'); return buf.getvalue()


def upload(pg, content, name):
    pg.upload.value = ({'name': name, 'type': 'image/png', 'size': len(content), 'content': memoryview(content),
                        'last_modified': datetime.datetime.now(datetime.timezone.utc)},)


def test_panel_opens_on_the_pipeline(pg, pipe):
    assert pg.size.value == (64, 64) and pg.scheduler.value == 'DDIMScheduler'
    assert pg.pipe is not pipe and pg.pipe.unet is pipe.unet
    assert 'application/vnd.jupyter.widget-view+json' in pg._repr_mimebundle_()
    assert pg.history == [] and not pg.busy and pg.selected is None
    assert pg.new_seed() == pg.seed.value


def test_choices(pipe):
    names = [n for _, n in scheduler_choices(pipe)]
    assert names[0] == 'DDIMScheduler' and 'EulerAncestralDiscreteScheduler' in names and 'EDMEulerScheduler' not in names
    assert all(w % 16 == 0 and h % 16 == 0 for _, (w, h) in size_choices(pipe))
    assert Image.open(io.BytesIO(to_png(Image.new('RGB', (64, 64))))).size == (256, 256)


def test_generate_is_generate(pg, pipe):
    pg.seed.value = 5
    assert pg.generate(wait=True), pg.message
    assert len(pg.history) == 1 and pg.selected == 0
    assert pg.message.startswith('Done in'), pg.message
    ref = generate(pipe, PROMPT, seed=5, num_inference_steps=4)
    assert np.array_equal(np.asarray(pg.history[0].image), np.asarray(ref[0]))
    assert pg.history[0].settings == ref.settings[0]
    assert pg.progress.value == pg.progress.max == 4
    assert 1 <= pg.last_run['previews'] <= 3  # the first step at least; never the last (the result replaces it)
    assert not pg.busy and not pg.generate_btn.disabled and pg.stop_btn.disabled
    assert 'Seed: 5' in pg.caption.value


def test_previews_are_throttled(pipe):
    pg = playground(pipe, steps=6, preview_every=1000)
    assert pg.generate(wait=True)
    assert pg.last_run['previews'] == 1  # the first step's, then nothing for 1000 s


def test_second_click_during_a_run_is_refused(pg):
    gate, entered = gate_steps(pg)
    pg.generate_btn.click()
    assert entered.wait(30) and pg.busy and pg.generate_btn.disabled
    pg.seed.value = 99                         # editing during a run prepares the next one
    assert not pg.generate()
    assert 'Still generating' in pg.message
    started = []                               # many clicks at once from other threads: none starts a run
    ts = [threading.Thread(target=lambda: started.append(pg.generate())) for _ in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert started == [False] * 8
    gate.set()
    assert pg.wait(60)
    assert [h.settings['seed'] for h in pg.history] == [0]
    assert len(pg.history_box.children) == 1
    assert pg.generate(wait=True)
    assert [h.settings['seed'] for h in pg.history] == [0, 99]


def test_stop(pg):
    pg.steps.value = 20
    gate, entered = gate_steps(pg)
    assert pg.generate()
    assert entered.wait(30)
    pg.stop_btn.click()
    gate.set()
    assert pg.wait(60)
    assert 'Stopped after 1 of 20 steps' in pg.message, pg.message
    assert pg.history == [] and not pg.busy


@pytest.mark.parametrize('field,value,expected', [
    ('prompt', '   ', 'The prompt is empty'),
    ('steps', 0, 'Steps is 0'),
    ('steps', -5, 'Steps is -5'),
    ('guidance', -1.0, 'Guidance scale is -1.0: use 0 or more'),
    ('seed', -3, 'Seed is -3'),
])
def test_bad_values_give_a_message(pg, field, value, expected):
    getattr(pg, field).value = value
    assert pg.generate() is False
    assert expected in pg.message and pg._msg[0] == 'error'
    assert 'Traceback' not in pg.msg.value and pg.history == [] and not pg.busy


def test_every_problem_at_once(pg):
    pg.prompt.value, pg.steps.value, pg.guidance.value = '', 0, -2.0
    assert not pg.generate()
    assert len(pg.message.splitlines()) == 3, pg.message


def test_images_that_fail_to_load(pg, tmp_path):
    pg.image_path.value = str(tmp_path / 'nope.png')
    assert 'could not be loaded' in pg.message and pg._msg[0] == 'error'
    assert not pg.generate() and 'could not be loaded' in pg.message
    (tmp_path / 'text.png').write_text('this is not a picture')
    pg.image_path.value = str(tmp_path / 'text.png')
    assert 'could not be loaded' in pg.message and pg._init is None
    upload(pg, b'garbage bytes', 'broken.png')
    assert "'broken.png' could not be loaded" in pg.message
    assert not pg.generate() and pg.history == []
    pg.clear_btn.click()
    assert pg.generate(wait=True) and len(pg.history) == 1   # cleared: text to image again


def test_img2img_from_upload_and_restore(pg):
    assert pg.strength.disabled                          # strength is for img2img only
    upload(pg, png_bytes('green', (40, 30)), 'green.png')
    assert pg._init_label == 'green.png' and pg.init_thumb.layout.display is None and not pg.strength.disabled
    pg.steps.value, pg.strength.value = 10, 0.5
    assert pg.generate(wait=True), pg.message
    assert 'img2img runs 5 of the 10 steps' in pg.message
    assert pg.progress.max == 5 and pg.history[0].settings['strength'] == 0.5
    assert pg.history[0].init_image.size == (64, 64) and pg.history[0].init_label == 'green.png'
    pg.clear_image()
    pg.scheduler.value, pg.seed.value, pg.prompt.value = 'EulerDiscreteScheduler', 7, 'a blue star'
    assert pg.generate(wait=True)
    assert pg.history[1].settings['sampler'] == 'Euler' and 'strength' not in pg.history[1].settings
    pg.history_box.children[0].children[1].click()  # the first thumbnail's button
    assert (pg.selected, pg.seed.value, pg.prompt.value, pg.scheduler.value) == (0, 0, PROMPT, 'DDIMScheduler')
    assert pg.strength.value == 0.5 and pg._init is not None and pg.history_box.children[0].children[1].button_style == 'info'
    assert pg.generate(wait=True)
    assert np.array_equal(np.asarray(pg.history[2].image), np.asarray(pg.history[0].image))  # made again, exactly
    pg.history_box.children[1].children[1].click()
    assert pg._init is None and pg.scheduler.value == 'EulerDiscreteScheduler'


def test_every_scheduler_runs(pg, pipe):
    own = type(pipe.scheduler)
    for _, name in scheduler_choices(pipe):
        pg.scheduler.value, pg.steps.value = name, 2
        if name == 'PNDMScheduler':  # PLMS with Runge-Kutta warm-up cannot run 2 steps: a message says so
            assert not pg.generate() and 'at least 4 steps' in pg.message
            pg.steps.value = 4
        assert pg.generate(wait=True), pg.message
        assert pg.message.startswith('Done'), (name, pg.message)
    assert type(pipe.scheduler) is own  # the lesson's pipeline keeps its scheduler


def test_failures_in_the_run_become_messages(pg, monkeypatch):
    def boom(*a, **k): raise RuntimeError('CUDA out of memory (pretend)')
    monkeypatch.setattr(widgets, 'generate', boom)
    assert pg.generate(wait=True)
    assert pg.message == 'Generation failed: RuntimeError: CUDA out of memory (pretend)'
    assert 'Traceback' in pg.last_error and not pg.busy and not pg.generate_btn.disabled and pg.history == []


def test_guidance_notes(pg):
    pg.guidance.value, pg.negative.value = 1.0, 'blue'
    assert pg.generate(wait=True)
    assert 'negative prompt is ignored' in pg.message and pg.history[0].settings['guidance_scale'] == 1.0


def test_save(pg, tmp_path):
    assert pg.save(tmp_path) is None and 'Nothing to save' in pg.message
    pg.seed.value = 11
    assert pg.generate(wait=True)
    a, b = pg.save(tmp_path / 'out'), pg.save(tmp_path / 'out')
    assert a != b and a.exists() and b.exists()           # a folder: numbered, nothing overwritten
    assert read_settings(a) == {k: v for k, v in read_settings(b).items()}
    s = read_settings(a)
    assert (s['seed'], s['steps'], s['prompt'], s['sampler'], s['width']) == (11, 4, PROMPT, 'DDIM', 64)
    pg.save_path.value = str(tmp_path / 'mine.png')
    pg.save_btn.click()
    assert read_settings(tmp_path / 'mine.png')['seed'] == 11 and 'Saved #1' in pg.message
    assert pg.save(tmp_path / 'missing' / 'x.png') is None and 'does not exist' in pg.message
    (tmp_path / 'afile').write_text('')
    assert pg.save(tmp_path / 'afile') is None and 'Could not save' in pg.message


def test_check_settings_directly(pipe):
    ok = dict(prompt='a red circle', negative_prompt='', seed=1, steps=30, guidance_scale=7.5, width=64, height=64)
    assert check_settings(ok, pipe) == []
    with pytest.raises(ValueError, match='The width is 60: use a multiple of 8'): check_settings({**ok, 'width': 60})
    with pytest.raises(ValueError, match='from 1 to 1000'): check_settings({**ok, 'steps': 5000}, pipe)
    with pytest.raises(ValueError, match='Guidance scale is nan'): check_settings({**ok, 'guidance_scale': float('nan')})
    with pytest.raises(ValueError, match='Strength is 0'): check_settings({**ok, 'strength': 0})
    with pytest.raises(ValueError, match=r'raise the steps to at least 4'): check_settings({**ok, 'steps': 3, 'strength': 0.3})
    assert 'cut off' in check_settings({**ok, 'prompt': 'a red circle ' * 10}, pipe)[0]


def test_a_real_checkpoint_with_a_safety_checker_runs_and_the_panel_reports_blanked_images(local_checkpoint):
    from sd_intro.core import load_pipeline
    p = playground(load_pipeline(local_checkpoint), steps=2, preview_every=0)
    try:
        assert 'tiny-sd on cpu' in p.panel.children[0].value   # the header names the checkpoint
        assert p.generate(wait=True), p.message
        assert p.message.startswith('Done in') and 'safety checker blanked 1 of 1' in p.message, p.message
        assert len(p.history) == 1 and p.history[0].settings['nsfw'] is True
    finally:
        p.stop(); assert p.wait(60)


def test_half_precision_pipeline_runs_previews_and_img2img():
    "On CUDA the playground gets float16 weights; bfloat16 on the CPU takes the same reduced-precision paths here."
    import torch
    from sd_intro.core import load_pipeline
    p = playground(load_pipeline(device='cpu', dtype=torch.bfloat16), steps=6, preview_every=0)
    try:
        assert p.pipe.unet.dtype == torch.bfloat16 and p.pipe.vae.dtype == torch.bfloat16
        assert p.generate(wait=True) and p.message.startswith('Done in'), (p.message, p.last_error)
        assert p.last_run['previews'] >= 1                      # live previews decode reduced-precision latents
        lo, hi = zip(*p.history[0].image.getextrema())
        assert max(hi) - min(lo) > 60                           # a picture, not a flat or NaN-black frame
        p.set_image(p.history[0].image); p.strength.value = 0.5
        assert p.generate(wait=True) and p.message.startswith('Done in'), (p.message, p.last_error)
        assert len(p.history) == 2 and p.last_run['steps'] == 3
    finally:
        p.stop(); assert p.wait(60)


def test_save_to_a_non_png_name_is_refused_without_making_a_folder(pg, tmp_path):
    assert pg.generate(wait=True)
    assert pg.save(tmp_path / 'x.jpg') is None and 'use a .png name' in pg.message
    assert not (tmp_path / 'x.jpg').exists()
