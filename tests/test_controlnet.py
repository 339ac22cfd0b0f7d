"sd_intro.controlnet: public API, bad input, kill -9 and resume, and the shipped ControlNet loaded by plain diffusers."
import json, os, pickle, signal, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_intro.core import load_pipeline, generate, save_image, read_settings, replay, EMBEDDED_MODEL
from sd_intro.shapes import Scene
from sd_intro.controlnet import (CONTROLNET_MODEL, ControlNetConfig, checkpoints, clear_run, control_batch, control_mask,
                                 controlnet_pipeline, from_drawing, load_controlnet, make_controlnet, outline,
                                 replay_controlled, resumable_checkpoint, save_controlled, scribble, silhouette,
                                 train_controlnet)

ROOT = Path(__file__).resolve().parents[1]
STAR = Scene('star', 'white', 'black', x=0.5, y=0.45, size=0.3)
TINY = ['--steps', '4', '--batch_size', '2', '--checkpoint_every', '1', '--validation_images', '2', '--validation_steps', '2',
        '--threads', '1', '--no-progress']


@pytest.fixture(scope='module')
def cpipe(pipe): return controlnet_pipeline(pipe)


def test_controls():
    for img in (silhouette(STAR), outline(STAR), scribble(STAR, seed=2)):
        assert img.size == (64, 64) and img.mode == 'RGB'
    full, ring, shaky = (control_mask(f(STAR)) for f in (silhouette, outline, scribble))
    assert abs(int(ring.sum()) - int(full.sum())) < 0.1 * full.sum()      # an outline asks for its inside
    assert (shaky & full).sum() / (shaky | full).sum() > 0.6
    paper = Image.new('RGB', (256, 256), 'white')
    assert np.asarray(from_drawing(paper)).max() == 0                     # white paper: a black control
    a, b = control_batch(5, 3, seed=1), control_batch(5, 3, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_zero_init_is_bit_identical(pipe):
    cn = make_controlnet(pipe.unet, zero_embedding_out=False)
    c = controlnet_pipeline(pipe, cn)
    a = generate(pipe, 'a red star on a blue background', seed=[1, 2], num_inference_steps=4)
    b = generate(c, 'a red star on a blue background', seed=[1, 2], image=silhouette(STAR), num_inference_steps=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_bad_control_images(cpipe, tmp_path):
    with pytest.raises(ValueError, match='needs image='): generate(cpipe, 'a red star', num_inference_steps=2)
    with pytest.raises(ValueError, match=r'512x512 but the pictures are 64x64'):
        generate(cpipe, 'a red star', image=Image.new('RGB', (512, 512)), num_inference_steps=2)
    with pytest.raises(ValueError, match='transparency'):
        generate(cpipe, 'a red star', image=Image.new('RGBA', (64, 64)), num_inference_steps=2)
    with pytest.raises(ValueError, match="mode 'I'"):
        generate(cpipe, 'a red star', image=Image.new('I', (64, 64)), num_inference_steps=2)
    with pytest.raises(FileNotFoundError, match='no such file'):
        generate(cpipe, 'a red star', image=tmp_path / 'missing.png', num_inference_steps=2)
    with pytest.raises(ValueError, match='controlnet_conditioning_scale=-1'):
        generate(cpipe, 'a red star', image=silhouette(STAR), controlnet_conditioning_scale=-1, num_inference_steps=2)
    with pytest.raises(ValueError, match='2 control pictures for 3 images'):
        generate(cpipe, 'a red star', n=3, image=[silhouette(STAR)] * 2, num_inference_steps=2)


def test_record_and_replay(pipe, cpipe, tmp_path):
    ctl = scribble(STAR, seed=1)
    res = generate(cpipe, 'a red star on a blue background', seed=3, image=ctl, controlnet_conditioning_scale=0.8,
                   num_inference_steps=4)
    s = res.settings[0]
    assert s['control_scale'] == 0.8 and s['controlnet'] == 'shapes-controlnet' and s['control'].startswith('c')
    png, cpng = save_controlled(res[0], tmp_path / 'star.png', s, ctl)
    back = read_settings(png)
    assert {k: back[k] for k in ('controlnet', 'control', 'control_scale')} == {k: s[k] for k in ('controlnet', 'control', 'control_scale')}
    assert np.array_equal(np.asarray(replay_controlled(png, cpipe)), np.asarray(res[0]))
    with pytest.raises(ValueError, match='pass control_image='): replay(png, cpipe)
    with pytest.raises(ValueError, match='pass a ControlNet pipeline'): replay(png, pipe, control_image=ctl)
    with pytest.warns(UserWarning, match='not the control picture'): replay(png, cpipe, control_image=silhouette(STAR))
    with pytest.raises(ValueError, match='not the control picture these settings'):
        save_controlled(res[0], tmp_path / 'x.png', s, silhouette(STAR))
    assert not (tmp_path / 'x.png').exists() and not (tmp_path / 'x.control.png').exists()
    plain = generate(pipe, 'a red star', num_inference_steps=2)
    with pytest.raises(ValueError, match='made without a ControlNet'): replay(plain.settings[0], cpipe)


def test_config_and_folder_refusals(tmp_path):
    with pytest.raises(ValueError, match='lr=0'): ControlNetConfig(lr=0)
    with pytest.raises(ValueError, match='kinds='): ControlNetConfig(kinds=('edges',))
    with pytest.raises(TypeError, match=r"\['batchsize'\]"): train_controlnet(tmp_path / 'r', batchsize=3)
    (tmp_path / 'f').write_text('x')
    with pytest.raises(FileExistsError, match='is a file'): train_controlnet(tmp_path / 'f')
    with pytest.raises(FileNotFoundError, match='no such folder'): load_controlnet(tmp_path / 'nothing')


def test_command_line_help_and_bad_options(tmp_path, command_line):
    from sd_intro.controlnet import main
    command_line.check(main, 'sd_intro.controlnet', ControlNetConfig)
    with pytest.raises(SystemExit, match='checkpoint_every=0: use a whole number of at least 1'):
        command_line.run(main, ['--out', tmp_path / 'run', '--checkpoint_every', '0'])
    assert not (tmp_path / 'run').exists()


def _train(command_line, out, *extra):
    "The command line (parsed as `python -m sd_intro.controlnet` parses it), run in this process."
    from sd_intro.controlnet import main
    command_line.run(main, ['--out', out, *TINY, *extra])


def _result(out):
    hist = json.loads((out / 'history.json').read_text())
    strips = {p.name: np.asarray(Image.open(p)) for p in sorted((out / 'validation').glob('step-*.png'))}
    return load_file(str(out / 'controlnet' / 'diffusion_pytorch_model.safetensors')), hist, strips


def test_kill_9_and_resume_is_bit_identical(tmp_path, command_line):
    from sd_intro.controlnet import main
    _train(command_line, tmp_path / 'straight')
    w0, h0, v0 = _result(tmp_path / 'straight')
    out = tmp_path / 'killed'
    p = command_line.start(main, ['--out', out, *TINY], tmp_path / 'killed.log')   # a process of its own, killed -9 below
    deadline = time.time() + 900
    while not (out / 'checkpoints' / 'step-000002' / 'state.json').exists():
        assert not command_line.ended(p) and time.time() < deadline, 'the run ended before its second checkpoint'
        time.sleep(0.05)
    assert command_line.wait(p, kill=True) == -signal.SIGKILL
    assert not (out / 'controlnet').exists() and (out / '.sd_intro.lock').exists()    # killed: its lock is left behind
    # a kill while a checkpoint was being written leaves a temporary folder: it is not resumed from, and is cleared
    (out / 'checkpoints' / '.tmp-step-000003-99999').mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _train(command_line, out, '--resume')
    w1, h1, v1 = _result(out)
    assert sorted(w0) == sorted(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)
    drop = lambda h: {k: v for k, v in h.items() if k != 'seconds'}   # (the time taken differs, nothing else may)
    assert drop(h0) == drop(h1) and list(v0) == list(v1) and all(np.array_equal(v0[k], v1[k]) for k in v0)
    assert not (out / 'checkpoints' / '.tmp-step-000003-99999').exists()


def test_damaged_edited_and_crafted_checkpoints(tmp_path, command_line):
    out = tmp_path / 'run'
    _train(command_line, out, '--stop_at', '3')
    new, old = checkpoints(out)[:2]
    # an edited state.json is named, and the run falls back to the checkpoint before it
    st = json.loads((new / 'state.json').read_text()); st['step'] = 2; st['losses'][-1] = 0.001
    (new / 'state.json').write_text(json.dumps(st))
    with pytest.warns(UserWarning, match='not as the run wrote it|edited or mixed'): assert resumable_checkpoint(out)[0] == old
    # a crafted optimizer.pt (a pickle that runs code) is refused without running it, and named
    marker = tmp_path / 'pwned'
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    (old / 'optimizer.pt').write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match='optimizer.pt (is damaged|holds pickled)'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); resumable_checkpoint(out)
    assert not marker.exists()
    # overwrite=True removes what runs write, and keeps the user's own files
    (out / 'my-notes.txt').write_text('mine'); (out / 'checkpoints' / 'mine.txt').write_text('mine')
    clear_run(out)
    kept = sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file() and not p.name.startswith('.sd_intro.lock'))
    assert kept == ['checkpoints/mine.txt', 'my-notes.txt']   # (the run lock's empty file stays: filelock keeps it)


def test_shipped_controlnet_without_sd_intro(tmp_path):
    "The shipped folder is plain diffusers: it loads and runs in the three ControlNet pipelines with sd_intro unimportable."
    code = f'''
import sys; sys.modules['sd_intro'] = None   # any import of sd_intro fails
import numpy as np, torch
from PIL import Image
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline)
torch.set_num_threads(1)
cn = ControlNetModel.from_pretrained({CONTROLNET_MODEL!r})
ctl = Image.new('RGB', (64, 64)); ctl.paste((255, 255, 255), (16, 16, 48, 48))
start = Image.new('RGB', (64, 64), (40, 80, 220))
for cls, kw in ((StableDiffusionControlNetPipeline, dict(image=ctl)),
                (StableDiffusionControlNetImg2ImgPipeline, dict(image=start, control_image=ctl, strength=0.9)),
                (StableDiffusionControlNetInpaintPipeline, dict(image=start, mask_image=ctl.convert('L'), control_image=ctl))):
    pipe = cls.from_pretrained({EMBEDDED_MODEL!r}, controlnet=cn, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    img = pipe('a red square on a blue background', num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert img.size == (64, 64), img.size
    print(cls.__name__, 'ok')
'''
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(' ok') == 3


# --- issue 31, reliability round 4: ControlNet used as what it is, users' files kept, records from outside --------------

def test_the_module_has_one_all():
    assert (ROOT / 'sd_intro' / 'controlnet.py').read_text().count('__all__ =') == 1


def test_a_folder_of_the_users_files_is_not_written_over(tmp_path):
    out = tmp_path / 'mine'; (out / 'validation').mkdir(parents=True)
    mine = ('run.json', 'history.json', 'validation.png', 'validation/step-000001.png', 'thesis.tex')
    for f in mine: (out / f).write_text('mine')
    for kw in ({}, dict(overwrite=True)):
        with pytest.raises(FileExistsError, match=r"run.json.*not a ControlNet run's.*nothing there is touched"):
            train_controlnet(out, steps=1, batch_size=1, validation_images=0, progress=False, **kw)
    with pytest.raises(FileExistsError, match="not a ControlNet run's"): clear_run(out)
    assert all((out / f).read_text() == 'mine' for f in mine)


def test_a_folder_in_use_names_the_controlnet_run(tmp_path, command_line):
    from sd_intro.controlnet import main
    out = tmp_path / 'busy'
    p = command_line.start(main, ['--out', out, '--threads', '1', '--steps', '100000', '--batch_size', '1', '--checkpoint_every', '100000',
                                  '--validation_images', '0', '--no-progress'], tmp_path / 'busy.log')   # another process
    try:
        deadline = time.time() + 300
        while not (out / 'run.json').exists():
            assert not command_line.ended(p) and time.time() < deadline, 'the holding run ended early'
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match='in use by another ControlNet training run') as e:
            train_controlnet(out, steps=1, progress=False)
        assert 'fine-tuning' not in str(e.value)
    finally: command_line.wait(p, kill=True)


def test_a_controlnet_refuses_the_flow_model():
    from sd_intro.flow import load_flow
    with pytest.raises(ValueError, match='flow-matching model.*load_pipeline'): controlnet_pipeline(load_flow())


def test_a_control_tensor_of_another_size_and_a_far_scale(cpipe):
    with pytest.raises(ValueError, match='tensor of 32x32 pixels but the pictures are 64x64'):
        generate(cpipe, 'a red star', image=torch.zeros(1, 3, 32, 32), num_inference_steps=2)
    with pytest.warns(UserWarning, match=r'controlnet_conditioning_scale=50: far above the 1.0'):
        generate(cpipe, 'a red star', image=silhouette(STAR), controlnet_conditioning_scale=50, num_inference_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='controlnet_conditioning_scale')
        generate(cpipe, 'a red star', image=silhouette(STAR), controlnet_conditioning_scale=1.5, num_inference_steps=1)


def _png(path, text):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo(); info.add_text('parameters', text)
    Image.new('RGB', (64, 64)).save(path, pnginfo=info)
    return path


def test_records_out_of_range_and_from_the_web_ui(cpipe, tmp_path):
    ctl, head = silhouette(STAR), 'a red star\nSteps: 2, Seed: 1, Size: 64x64, ControlNet: shapes-controlnet, Control: c0, '
    with pytest.raises(ValueError, match=r"the record's 'Control scale: -3.0'"):
        replay(_png(tmp_path / 'a.png', head + 'Control scale: -3'), cpipe, control_image=ctl)
    with pytest.raises(ValueError, match=r"the record's 'Control end: 1.5'"):
        replay(_png(tmp_path / 'b.png', head + 'Control scale: 1, Control end: 1.5'), cpipe, control_image=ctl)
    webui = ('a red star\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, ControlNet 0: "Module: canny, '
             'Model: control_sd15_canny [fef5e48e], Weight: 1, Resize Mode: Crop and Resize"')
    with pytest.raises(ValueError, match="web UI's ControlNet extension.*Weight") as e:
        replay(_png(tmp_path / 'c.png', webui), cpipe, control_image=ctl)
    assert 'made without a ControlNet' not in str(e.value)


def test_load_controlnet_refuses_other_models_and_names_a_damaged_config(tmp_path):
    with pytest.raises(ValueError, match='holds a UNet2DConditionModel, not a ControlNetModel'):
        load_controlnet(Path(EMBEDDED_MODEL) / 'unet')
    d = tmp_path / 'damaged'; d.mkdir(); (d / 'config.json').write_text('{"_class')
    with pytest.raises(ValueError, match='config.json is damaged'): load_controlnet(d)


def test_iou_by_step_holds_the_pipeline_while_it_swaps_weights(pipe, tmp_path):
    "Snapshots are swapped into the ControlNet: another thread drawing with the same pipeline meanwhile still gets its own pictures."
    import threading
    from safetensors.torch import save_file
    from sd_intro.controlnet import heldout_controls, iou_by_step
    cp = controlnet_pipeline(pipe)   # its own ControlNet, loaded afresh
    snaps = tmp_path / 'run' / 'snapshots'; snaps.mkdir(parents=True)
    zero = {k: torch.zeros_like(v).contiguous() for k, v in cp.controlnet.state_dict().items()}   # a ControlNet that does nothing
    for s in (1, 2, 3): save_file(zero, str(snaps / f"step-{s:06d}.safetensors"))
    draw = lambda s: np.asarray(generate(cp, 'a red star on a blue background', seed=s, image=silhouette(STAR), num_inference_steps=3)[0])
    serial = [draw(s) for s in range(6)]
    _, controls, prompts = heldout_controls(2)
    got = [None] * 6
    def drawing():
        for s in range(6): got[s] = draw(s)
    ts = [threading.Thread(target=lambda: iou_by_step(cp, tmp_path / 'run', controls, prompts, num_inference_steps=2)),
          threading.Thread(target=drawing)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert all(g is not None and np.array_equal(g, s) for g, s in zip(got, serial))
