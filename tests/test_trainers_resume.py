"Reliability round 4 (issue 31), trainers: killed with SIGKILL at a point, each trainer resumes to the uninterrupted run's result, validation pictures included; nothing is unpickled; damaged or edited state is named with the fix; no user file is deleted."
import json, os, pickle, shutil, signal, sys, textwrap, traceback, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sd_intro.finetune as ft
from sd_intro.distill import LCM_WEIGHTS, LCM_INFO, distill
from sd_intro.embedded import make_embedded
from sd_intro.training import checkpoints

pytestmark = pytest.mark.usefixtures('one_thread')   # the killed runs train in a fork on one thread; the runs they are compared with must too (float sums depend on it)


FT = dict(method='lora', steps=3, checkpoint_every=1, batch_size=2, lr=1e-3, progress=False,
          validation_prompts=['a creature', 'a red circle on a blue background'], validation_steps=2)
TINY = dict(steps=3, batch_size=2, n_images=8, anchor_pairs=4, rank=2, ckpt_every=1)
EMB = dict(seed=0, text_steps=2, vae_steps=2, judge_steps=2, unet_steps=4, n_images=16, bs=4, ckpt_every=1, eval_every=0)


def killed(tmp_path, code: str):
    """Run `code` in a fork of this test's process (one thread, its output to a log file next to the run); it must end
    killed by SIGKILL (`kill()` in it). A fork starts at once, with the libraries already loaded; what it changes
    (patched functions, a lock it takes) stays in it, and the kill is a real one: no handler, no clean-up."""
    log = tmp_path / f"killed-{len(list(tmp_path.glob('killed-*.log')))}.log"
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, 'w', buffering=1, closefd=False)
            torch.set_num_threads(1)
            exec(compile("import os, signal, torch\n" + textwrap.dedent(code), str(log.with_suffix('.py')), 'exec'),
                 {'__name__': '__killed__', 'kill': lambda: os.kill(os.getpid(), signal.SIGKILL)})
        except BaseException: traceback.print_exc()
        finally: os._exit(3)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"not killed (exit {os.waitstatus_to_exitcode(status)}): {log.read_text()[-3000:]}"


def same_tensors(a: dict, b: dict) -> bool: return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im: return np.asarray(im.convert('RGB'))


class Evil:
    "A pickle that would create a file when loaded: loading it must not happen."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (open, (str(self.marker), 'w'))


# ---- fine-tuning ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return ft.write_shapes_folder(tmp_path_factory.mktemp('ftdata') / 'creatures', n_new=6, n_old=2, seed=3)


@pytest.fixture(scope='module')
def whole(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('ftwhole') / 'run'
    return ft.finetune(data, out, **FT)


def _resume(data, out):
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*taking over the lock')   # the killed run's lock
        return ft.finetune(data, out, resume=True, **FT)


def _same_run(res, whole):
    assert res.losses == whole.losses
    assert same_tensors(load_file(res.saved / 'pytorch_lora_weights.safetensors'),
                        load_file(whole.saved / 'pytorch_lora_weights.safetensors'))
    assert np.array_equal(pixels(res.out / 'validation.png'), pixels(whole.out / 'validation.png'))
    assert json.loads((res.out / 'losses.json').read_text()) == whole.losses
    assert sorted(res.validation) == [0, 1, 2, 3]


def test_a_stopped_finetune_with_validation_prompts_resumes_to_the_same_run(data, whole, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(data, out, stop_at=2, **FT)
    with Image.open(out / 'validation' / 'step-000002.png') as im: assert im.size == (2 * 64, 64)   # exact pixels
    _same_run(ft.finetune(data, out, resume=True, **FT), whole)


def test_a_resume_reads_the_enlarged_strips_older_versions_wrote(data, whole, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(data, out, stop_at=2, **FT)
    for p in (out / 'validation').glob('step-*.png'):   # as the previous version saved them: tiles enlarged to 128 px
        im = Image.open(p).convert('RGB'); im.resize((im.width * 2, im.height * 2), Image.NEAREST).save(p)
    _same_run(ft.finetune(data, out, resume=True, **FT), whole)


KILL_FT = {
    'after checkpoint 2': """
        orig = ft.save_checkpoint
        def save_checkpoint(out, step, *a, **k):
            r = orig(out, step, *a, **k)
            if step == 2: kill()
            return r
        ft.save_checkpoint = save_checkpoint""",
    'inside checkpoint 2': """
        import sd_intro.training as training   # (checkpoints are the training loop's)
        orig = training.save_file
        def save_file(tensors, path, *a, **k):
            orig(tensors, path, *a, **k)
            if 'step-000002' in str(path): kill()
        training.save_file = save_file""",
    'after validation 3, before the result': """
        ft.save_finetuned = lambda *a, **k: kill()""",
}


@pytest.mark.parametrize('where', list(KILL_FT))
def test_finetune_killed_resumes_bit_identically_with_validation(data, whole, tmp_path, where):
    out = tmp_path / 'run'
    killed(tmp_path, f"import sd_intro.finetune as ft\n{textwrap.dedent(KILL_FT[where])}\n"
                     f"ft.finetune({str(data)!r}, {str(out)!r}, **{FT!r})\n")
    assert not (out / 'lora').exists()
    _same_run(_resume(data, out), whole)


def test_an_edited_state_json_is_named_and_the_previous_checkpoint_used(data, whole, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(data, out, stop_at=2, **FT)
    f = out / 'checkpoints' / 'step-000002' / 'state.json'
    s = json.loads(f.read_text()); s['losses'][0] = 0.001; f.write_text(json.dumps(s))
    with pytest.warns(UserWarning, match=r'step-000002: state.json was changed after the run wrote it.*previous complete one, step-000001'):
        res = ft.finetune(data, out, resume=True, **FT)
    _same_run(res, whole)


def test_an_edited_step_without_a_digest_is_named(data, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(data, out, stop_at=1, **FT)
    f = out / 'checkpoints' / 'step-000001' / 'state.json'
    s = json.loads(f.read_text()); s.pop('digest'); s['step'] = 2; f.write_text(json.dumps(s))   # as older runs wrote it
    with pytest.raises(ValueError, match=r"state.json says step 2, but its folder is step-000001.*overwrite=True"):
        ft.finetune(data, out, resume=True, **FT)


def test_a_crafted_optimizer_file_is_not_unpickled(data, tmp_path):
    out, marker = tmp_path / 'run', tmp_path / 'ran'
    ft.finetune(data, out, stop_at=1, **FT)
    torch.save({'optimizer': Evil(marker)}, out / 'checkpoints' / 'step-000001' / 'optimizer.pt')
    with pytest.raises(ValueError, match=r'optimizer.pt holds pickled objects .*not load those'):
        ft.finetune(data, out, resume=True, **FT)
    assert not marker.exists()


def test_saving_a_lora_keeps_the_users_files_in_its_folder(data, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(data, out, **dict(FT, steps=1, validation_prompts=()))
    (out / 'lora' / 'NOTES.md').write_text('mine')
    ft.finetune(data, out, overwrite=True, **dict(FT, steps=1, validation_prompts=()))
    assert (out / 'lora' / 'NOTES.md').read_text() == 'mine'


# ---- distillation --------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def lcm_whole(tmp_path_factory):
    return load_file(distill(tmp_path_factory.mktemp('dwhole') / 'lcm', log=None, **TINY) / LCM_WEIGHTS)


KILL_DISTILL = {
    'after step 2': "log = lambda m: kill() if m.startswith('step 2') else None",
    'while saving the LoRA': "log = None\nD.save_lcm_lora = lambda *a, **k: kill()",
    'while writing a checkpoint': """
        log = None
        import sd_intro.training as training   # (checkpoints are the training loop's)
        orig = training.save_file
        def save_file(tensors, path, *a, **k):
            orig(tensors, path, *a, **k)
            if 'step-000002' in str(path): kill()
        training.save_file = save_file""",
}


@pytest.mark.parametrize('where', list(KILL_DISTILL))
def test_distill_killed_resumes_bit_identically(lcm_whole, tmp_path, where):
    out = tmp_path / 'lcm'
    killed(tmp_path, f"import sd_intro.distill as D\n{textwrap.dedent(KILL_DISTILL[where])}\n"
                     f"D.distill({str(out)!r}, log=log, **{TINY!r})\n")
    assert not (out / LCM_WEIGHTS).exists()
    said = []
    assert same_tensors(load_file(distill(out, log=said.append, **TINY) / LCM_WEIGHTS), lcm_whole)
    assert said[0].startswith('resumed at step')


def _stopped_distill(tmp_path):
    "A distillation stopped during its third step: its work folder holds the checkpoints of steps 1 and 2."
    class Stop(Exception): pass
    def stop(m):
        if m.startswith('step 2'): raise Stop
    with pytest.raises(Stop): distill(tmp_path / 'lcm', log=stop, **TINY)
    work = tmp_path / 'lcm-work'
    assert [c.name for c in checkpoints(work)] == ['step-000002', 'step-000001']
    return work


def test_distill_loads_no_pickled_code(tmp_path):
    work, marker = _stopped_distill(tmp_path), tmp_path / 'ran'
    for ck in checkpoints(work): torch.save({'optimizer': Evil(marker)}, ck / 'optimizer.pt')
    with pytest.raises(ValueError, match=r'optimizer.pt holds pickled objects .*not load those.*No checkpoint in .* can be '
                                         r'resumed: delete .*checkpoints to start afresh \(the cached latents'):
        distill(tmp_path / 'lcm', log=None, **TINY)
    assert not marker.exists() and not (tmp_path / 'lcm').exists()


def test_a_damaged_or_edited_distill_checkpoint_is_named_with_the_fix(lcm_whole, tmp_path):
    work = _stopped_distill(tmp_path)
    f = work / 'checkpoints' / 'step-000002' / 'state.json'
    s = json.loads(f.read_text()); s['losses'][0] = 0.001; f.write_text(json.dumps(s))     # an edited loss
    with pytest.warns(UserWarning, match=r'step-000002: state.json was changed after the run wrote it.*previous complete one, step-000001'):
        assert same_tensors(load_file(distill(tmp_path / 'lcm', log=None, **TINY) / LCM_WEIGHTS), lcm_whole)
    work = _stopped_distill(tmp_path / 'again')
    for ck in checkpoints(work):                                                           # both cut short
        w = ck / 'trainable.safetensors'; w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r'trainable.safetensors is damaged or cut short.*No checkpoint in .* can be '
                                         r'resumed: delete .*checkpoints to start afresh'):
        distill(tmp_path / 'again' / 'lcm', log=None, **TINY)


def test_a_distill_checkpoint_of_an_older_version_is_named(tmp_path):
    work = tmp_path / 'lcm-work'; work.mkdir()
    (work / 'checkpoint.pt').write_bytes(b'an old one-file checkpoint')
    with pytest.raises(ValueError, match=r'checkpoint.pt is a checkpoint of an older sd_intro.*delete the file to start afresh'):
        distill(tmp_path / 'lcm', log=None, **TINY)
    assert not (tmp_path / 'lcm').exists()


def test_a_work_folder_in_use_names_the_distillation(tmp_path):
    said = []
    def log(line):   # called while the run holds its work folder: a second run there is refused
        if said: return
        try: distill(tmp_path / 'other', work=tmp_path / 'lcm-work', log=None, **TINY); said.append('ran')
        except RuntimeError as e: said.append(str(e))
    distill(tmp_path / 'lcm', log=log, **dict(TINY, steps=1))
    assert said and 'in use by another distillation run' in said[0], said
    assert not (tmp_path / 'other').exists()


def test_distill_overwrite_keeps_the_users_files(tmp_path):
    out = tmp_path / 'mine'; out.mkdir()
    (out / 'thesis.tex').write_text('years of work'); (out / 'data').mkdir(); (out / 'data' / 'x.csv').write_text('1,2')
    distill(out, overwrite=True, log=None, **dict(TINY, steps=1))
    assert (out / 'thesis.tex').read_text() == 'years of work' and (out / 'data' / 'x.csv').read_text() == '1,2'
    assert (out / LCM_WEIGHTS).is_file() and (out / LCM_INFO).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_distill_on_a_missing_gpu_says_so_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"device='cuda', but this torch sees no CUDA GPU.*device='cpu'"):
        distill(tmp_path / 'lcm', device='cuda', **TINY)
    assert list(tmp_path.iterdir()) == []


# ---- the embedded model's stages -----------------------------------------------------------------------------

def _weights(folder):
    return {f"{p.parent.name}/{k}": v for p in sorted(Path(folder).glob('*/*.safetensors')) for k, v in load_file(p).items()}


@pytest.fixture(scope='module')
def embedded_whole(tmp_path_factory):
    "An uninterrupted run of make_embedded: its model folder and its work folder (stages, UNet checkpoint)."
    d = tmp_path_factory.mktemp('embedded')
    make_embedded(d / 'whole', d / 'whole-work', log=None, **EMB)
    return d / 'whole', d / 'whole-work'


def test_make_embedded_killed_in_two_stages_resumes_bit_identically(embedded_whole, tmp_path):
    whole, whole_work = embedded_whole
    out, work = tmp_path / 'run', tmp_path / 'run-work'
    # the tokenizer stage is kept with a run because `tokenizers` breaks BPE ties differently in each process; this run
    # was killed after it (a kill inside it leaves no tokenizer/, and the rebuilt one may number pieces otherwise)
    shutil.copytree(whole_work / 'tokenizer', work / 'tokenizer')
    call = f"make_embedded({str(out)!r}, {str(work)!r}, log=log, **{EMB!r})\n"
    killed(tmp_path, "from sd_intro.embedded import make_embedded\n"
                     "log = lambda m: kill() if m.startswith('vae step 0') else None\n" + call)
    assert (work / 'text_encoder').is_dir() and not (work / 'vae').exists()
    killed(tmp_path, "from sd_intro.embedded import make_embedded\n"
                     "log = lambda m: kill() if m == 'unet checkpoint at step 2' else None\n" + call)
    said = []
    make_embedded(out, work, log=said.append, **EMB)
    assert 'resumed at step 2' in said
    a, b = _weights(whole), _weights(out)
    assert len(a) > 100 and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_unet_stage_loads_no_pickled_code_and_names_a_damaged_checkpoint(embedded_whole, tmp_path):
    for a, b in zip(embedded_whole, ('m', 'w')): shutil.copytree(a, tmp_path / b)   # a finished run of EMB's 4 UNet steps,
    more = dict(EMB, unet_steps=5)                                                   # to be continued from its checkpoint
    cks, marker = checkpoints(tmp_path / 'w'), tmp_path / 'ran'
    assert [c.name for c in cks] == ['step-000004', 'step-000003']
    good = {c: (c / 'optimizer.pt').read_bytes() for c in cks}
    for c in cks: torch.save({'optimizer': Evil(marker)}, c / 'optimizer.pt')
    with pytest.raises(ValueError, match=r'optimizer.pt holds pickled objects.*No checkpoint in .* can be resumed: delete '
                                         r'.*checkpoints to train the UNet stage from its start'):
        make_embedded(tmp_path / 'm', tmp_path / 'w', log=None, **more)
    assert not marker.exists()
    for c in cks: (c / 'optimizer.pt').write_bytes(good[c][:2000])
    with pytest.raises(ValueError, match=r'optimizer.pt is damaged or cut short.*delete .*checkpoints to train the UNet stage'):
        make_embedded(tmp_path / 'm', tmp_path / 'w', log=None, **more)
    (tmp_path / 'w' / 'vae' / 'config.json').write_text('{')   # a stage folder changed by hand
    for c in cks: (c / 'optimizer.pt').write_bytes(good[c])
    with pytest.raises(ValueError, match=r'the saved vae stage, cannot be loaded.*Delete the folder'):
        make_embedded(tmp_path / 'm', tmp_path / 'w', log=None, **more)
    (tmp_path / 'w' / 'unet_ckpt.pt').write_bytes(b'an old one-file checkpoint')
    shutil.copytree(embedded_whole[1] / 'vae', tmp_path / 'w' / 'vae', dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r'unet_ckpt.pt is a checkpoint of an older sd_intro.*delete the file to train the UNet stage'):
        make_embedded(tmp_path / 'm', tmp_path / 'w', log=None, **more)


def test_a_work_folder_in_use_names_the_embedded_run(embedded_whole, tmp_path):
    from sd_intro.training import run_lock
    with run_lock(tmp_path / 'w', what='ControlNet training'):
        with pytest.raises(RuntimeError, match=r'in use by another ControlNet training run'):
            make_embedded(tmp_path / 'm', tmp_path / 'w', log=None, **EMB)
    assert not (tmp_path / 'm').exists()


def test_saving_a_pipeline_keeps_its_model_card(tmp_path):
    from sd_intro.core import load_pipeline, save_pipeline
    out = save_pipeline(load_pipeline(), tmp_path / 'model')
    (out / 'README.md').write_text('# my model card')
    save_pipeline(load_pipeline(), out)
    assert (out / 'README.md').read_text() == '# my model card' and (out / 'unet').is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ['model']   # nothing set aside is left


# ---- textual inversion ---------------------------------------------------------------------------------------

def test_textual_inversion_killed_leaves_the_saved_vector_whole_and_a_rerun_is_identical(data, tmp_path):
    from sd_intro.inside import load_parts, textual_inversion, save_learned_embeds
    kw = dict(steps=4, batch_size=4, seed=1)
    path = tmp_path / 'learned_embeds.safetensors'
    first = textual_inversion(load_parts(), data, **kw)
    save_learned_embeds(first, path)
    before = path.read_bytes()
    killed(tmp_path, f"""
        import sd_intro.embedded as E
        from sd_intro.inside import load_parts, textual_inversion
        orig, n = E.diffusion_loss, [0]
        def loss(*a, **k):
            n[0] += 1
            if n[0] == 3: kill()
            return orig(*a, **k)
        E.diffusion_loss = loss
        textual_inversion(load_parts(), {str(data)!r}, **{kw!r})""")
    killed(tmp_path, f"""
        import safetensors.torch as st
        from sd_intro.inside import load_parts, textual_inversion, save_learned_embeds
        inv = textual_inversion(load_parts(), {str(data)!r}, **dict({kw!r}, seed=2))
        orig = st.save_file
        def save(tensors, filename, *a, **k): orig(tensors, filename, *a, **k); kill()
        st.save_file = save
        save_learned_embeds(inv, {str(path)!r})""")
    assert path.read_bytes() == before                       # the kill while saving left the earlier file whole
    again = textual_inversion(load_parts(), data, **kw)      # a rerun: nothing was written mid-run to resume from
    assert torch.equal(again.embedding, first.embedding) and again.losses == first.losses


@pytest.mark.parametrize('token, msg', [('red', r"already in the vocabulary \(as 'red</w>'\)"),
                                        ('Red', r"already in the vocabulary"),
                                        ('circ', r"part of the word 'circle'")])
def test_textual_inversion_refuses_a_token_prompts_already_say(data, token, msg):
    from sd_intro.inside import load_parts, textual_inversion
    parts = load_parts()
    n = len(parts.tokenizer)
    with pytest.raises(ValueError, match=msg): textual_inversion(parts, data, token=token, steps=1)
    assert len(parts.tokenizer) == n
