"Fine-tuning (sd_intro.finetune): data checks, full and LoRA runs on the embedded model, checkpoints, resume, the CLI."
import json
import numpy as np
import pytest
import torch
from PIL import Image

import sd_intro.finetune as ft
from sd_intro.core import EMBEDDED_MODEL, load_pipeline
import subprocess, sys

FAST = dict(batch_size=4, lr=1e-3, progress=False)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return ft.write_shapes_folder(tmp_path_factory.mktemp('data') / 'creatures', n_new=12, n_old=4, seed=3)


@pytest.fixture(scope='module')
def data(folder):
    return ft.load_captioned(folder)


def fresh_pipeline():
    "A pipeline of its own (load_pipeline's is shared, and load_lora_weights changes the pipeline it is given)."
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def image(pipe, prompt='a red creature on a blue background'):
    "One picture as floats, straight from the pipeline (no rounding to 8 bits), with a fixed seed."
    return pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type='np').images[0]


# ---- data ------------------------------------------------------------------------------------------------------

def test_folder_loads_with_captions(data):
    assert len(data) == 16
    assert all(c.strip() for c in data.captions)
    assert data.image(0).size == (64, 64) and data.image(0).mode == 'RGB'
    new = [data.captions[i] for i in range(len(data)) if data.where(i).startswith('new')]
    assert len(new) == 12 and all('creature' in c for c in new)


def _folder(tmp_path, name, n=3):
    d = ft.write_shapes_folder(tmp_path / name, n_new=n, n_old=0)
    return d, [json.loads(l) for l in (d / 'metadata.jsonl').read_text().splitlines()]


def _rewrite(d, rows): (d / 'metadata.jsonl').write_text('\n'.join(map(json.dumps, rows)) + '\n')


def test_empty_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r'empty: the folder is empty \(no png'): ft.load_captioned(tmp_path / 'empty')


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such folder'): ft.load_captioned(tmp_path / 'nowhere')


def test_no_metadata(tmp_path):
    d, rows = _folder(tmp_path, 'nometa'); (d / 'metadata.jsonl').unlink()
    with pytest.raises(ValueError, match='no metadata.jsonl, so no captions'): ft.load_captioned(d)


def test_blank_caption_names_file_and_line(tmp_path):
    d, rows = _folder(tmp_path, 'blank'); rows[1]['text'] = ' '; _rewrite(d, rows)
    with pytest.raises(ValueError, match=rf"{rows[1]['file_name']}: blank caption \(line 2 of metadata.jsonl\)"): ft.load_captioned(d)


def test_missing_caption_field_names_file(tmp_path):
    d, rows = _folder(tmp_path, 'missing'); del rows[0]['text']; _rewrite(d, rows)
    with pytest.raises(ValueError, match=rf"{rows[0]['file_name']}: no caption \(line 1 of metadata.jsonl has no 'text'"): ft.load_captioned(d)


def test_image_without_metadata_line(tmp_path):
    d, rows = _folder(tmp_path, 'unlisted'); _rewrite(d, rows[:2])
    with pytest.raises(ValueError, match=rf"{rows[2]['file_name']}: no caption \(the image is not listed"): ft.load_captioned(d)


def test_listed_file_missing(tmp_path):
    d, rows = _folder(tmp_path, 'gone'); (d / rows[1]['file_name']).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{rows[1]['file_name']}: listed on line 2 of metadata.jsonl, but there is no such file"):
        ft.load_captioned(d)


def test_unreadable_image_names_file(tmp_path):
    d, rows = _folder(tmp_path, 'broken'); (d / rows[2]['file_name']).write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    with pytest.raises(ValueError, match=rf"{rows[2]['file_name']}: not a readable image"): ft.load_captioned(d)


def test_bad_json_line(tmp_path):
    d, rows = _folder(tmp_path, 'json'); (d / 'metadata.jsonl').write_text('{"file_name": "new-0000.png", "text": "a"\n')
    with pytest.raises(ValueError, match=r'metadata.jsonl line 1: not valid JSON'): ft.load_captioned(d)


def test_wrong_caption_column_of_folder(tmp_path):
    d, rows = _folder(tmp_path, 'col')
    with pytest.raises(ValueError, match=r"caption_column='caption' is not a field of .*metadata.jsonl: its fields are \['file_name', 'text'\]"):
        ft.load_captioned(d, caption_column='caption')


@pytest.fixture(scope='module')
def dataset(data):
    import datasets
    return datasets.Dataset.from_dict({'img': [data.image(i) for i in range(3)], 'caption': ['a red creature', 'a creature', 'a star']})


def test_dataset_with_own_column_names(dataset):
    d = ft.load_captioned(dataset, image_column='img', caption_column='caption')
    assert len(d) == 3 and d[1][1] == 'a creature' and d[1][0].size == (64, 64)


@pytest.mark.parametrize('kw, msg', [
    (dict(), r"image_column='image' is not a column of the dataset: its columns are \['img', 'caption'\]"),
    (dict(image_column='img'), r"caption_column='text' is not a column of the dataset: its columns are \['img', 'caption'\]"),
    (dict(image_column='caption', caption_column='caption'), r"row 0 of the dataset: column 'caption' holds 'a red creature', which is neither an image"),
])
def test_dataset_wrong_columns(dataset, kw, msg):
    with pytest.raises(ValueError, match=msg): ft.load_captioned(dataset, **kw)


def test_dataset_blank_and_empty(dataset):
    blank = dataset.map(lambda r, i: {'caption': None if i == 2 else r['caption']}, with_indices=True)
    with pytest.raises(ValueError, match="row 2 of the dataset: blank caption in column 'caption'"):
        ft.load_captioned(blank, image_column='img', caption_column='caption')
    with pytest.raises(ValueError, match='the dataset is empty'):
        ft.load_captioned(dataset.select([]), image_column='img', caption_column='caption')


def test_dataset_unreadable_image():
    import datasets
    ds = datasets.Dataset.from_dict({'image': [{'bytes': b'not a png', 'path': None}], 'text': ['a creature']},
                                    features=datasets.Features({'image': datasets.Image(), 'text': datasets.Value('string')}))
    with pytest.raises(ValueError, match='row 0 of the dataset: not a readable image'): ft.load_captioned(ds)


def test_batches_repeat_and_cover_the_data(data):
    a, b = ft.training_batch(data, 5, 4, 64, seed=1, random_flip=True), ft.training_batch(data, 5, 4, 64, seed=1, random_flip=True)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert sorted(i for s in range(4) for i in ft.batch_indices(16, 4, s, seed=2)) == list(range(16))


# ---- training --------------------------------------------------------------------------------------------------

def test_full_two_steps_save_and_reload(data, tmp_path):
    from diffusers import StableDiffusionPipeline
    res = ft.finetune(data, tmp_path / 'run', method='full', steps=2, ema=True, **FAST)
    assert len(res.losses) == 2 and all(np.isfinite(res.losses))
    assert res.saved == tmp_path / 'run' / 'pipeline' and (res.saved / 'model_index.json').exists()
    back = StableDiffusionPipeline.from_pretrained(res.saved)
    back.set_progress_bar_config(disable=True)
    tuned, base = res.pipe.unet.state_dict(), load_pipeline().unet.state_dict()
    for k, v in back.unet.state_dict().items(): assert torch.equal(v, tuned[k]), k
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # it did train
    np.testing.assert_allclose(image(back), image(res.pipe), atol=1e-4)


def test_lora_two_steps_save_and_reload(data, tmp_path):
    res = ft.finetune(data, tmp_path / 'run', method='lora', rank=4, lora_alpha=8, steps=2, **FAST)
    assert (res.saved / 'pytorch_lora_weights.safetensors').exists()
    n = sum(p.numel() for n, p in res.pipe.unet.named_parameters() if 'lora' in n)
    assert 0 < n < 0.05 * sum(p.numel() for p in load_pipeline().unet.parameters())
    pipe = fresh_pipeline()
    before = image(pipe)
    pipe.load_lora_weights(res.saved, weight_name='pytorch_lora_weights.safetensors')
    after, tuned = image(pipe), image(res.pipe)
    np.testing.assert_allclose(after, tuned, atol=1e-3)
    assert np.abs(after - before).max() > 1e-4  # the adapter changes the picture


def test_validation_before_checkpoints_after(data, tmp_path):
    res = ft.finetune(data, tmp_path / 'run', method='lora', steps=3, checkpoint_every=2, validation_prompts=('a red creature', 'a star'),
                      validation_seeds=(0, 1), validation_steps=3, **FAST)
    assert sorted(res.validation) == [0, 2, 3] and all(len(v) == 4 for v in res.validation.values())
    assert res.grid().size[0] > 4 * 128 and (tmp_path / 'run' / 'validation.png').exists()
    assert [p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()] == ['step-000002']


def test_resume_gives_the_same_losses(data, tmp_path):
    kw = dict(method='full', steps=4, ema=True, random_flip=True, caption_dropout=0.2, **FAST)
    whole = ft.finetune(data, tmp_path / 'whole', **kw)
    part = ft.finetune(data, tmp_path / 'parts', stop_at=2, **kw)
    assert part.saved is None and len(part.losses) == 2 and ft.latest_checkpoint(tmp_path / 'parts').name == 'step-000002'
    rest = ft.finetune(data, tmp_path / 'parts', resume=True, **kw)
    assert rest.losses == whole.losses
    for (k, a), b in zip(whole.pipe.unet.state_dict().items(), rest.pipe.unet.state_dict().values()): assert torch.equal(a, b), k


def test_crash_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    kw = dict(method='lora', steps=3, checkpoint_every=1, **FAST)
    whole = ft.finetune(data, tmp_path / 'whole', **kw)
    import sd_intro.training as training   # (checkpoints are the training loop's)
    real, calls = training.save_file, []
    def disk_full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
            open(path, 'wb').write(b'half a safetensors file')
            raise OSError(28, 'No space left on device')
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(training, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left'): ft.finetune(data, tmp_path / 'crash', **kw)
    monkeypatch.undo()
    ckpts = tmp_path / 'crash' / 'checkpoints'
    assert sorted(p.name for p in ckpts.iterdir()) == ['step-000001']  # no half-written step 2, no temporary folder
    state, weights, _, _ = ft.load_checkpoint(ckpts / 'step-000001')
    assert state['step'] == 1 and len(state['losses']) == 1 and weights
    rest = ft.finetune(data, tmp_path / 'crash', resume=True, **kw)
    assert rest.losses == whole.losses


def test_resume_refuses_other_settings(data, tmp_path):
    ft.finetune(data, tmp_path / 'run', method='lora', steps=3, stop_at=1, **FAST)
    with pytest.raises(ValueError, match=r"cannot resume: .*'lr': \(0.001, 0.002\)"):
        ft.finetune(data, tmp_path / 'run', method='lora', steps=3, resume=True, **{**FAST, 'lr': 2e-3})
    with pytest.raises(FileExistsError, match='pass resume=True to continue it, overwrite=True'):
        ft.finetune(data, tmp_path / 'run', method='lora', steps=3, **FAST)
    res = ft.finetune(data, tmp_path / 'run', method='lora', steps=1, overwrite=True, **FAST)
    assert res.saved is not None and not (tmp_path / 'run' / 'checkpoints').exists()


def test_bad_settings():
    with pytest.raises(TypeError, match=r"unknown fine-tuning settings \['step'\]"): ft.FinetuneConfig.make(step=3)
    with pytest.raises(ValueError, match="method='dreambooth' is not one of"): ft.FinetuneConfig(method='dreambooth')
    with pytest.raises(ValueError, match='stop_at=5: between 1 and steps=3'): ft.FinetuneConfig(steps=3, stop_at=5)


@pytest.mark.parametrize('kw,msg', [
    (dict(steps=1.5), 'steps=1.5: use a whole number'), (dict(resolution=-64), 'resolution=-64: use a multiple of 8'),
    (dict(resolution=0), 'resolution=0'), (dict(lr='1e-4'), "lr='1e-4': use a positive number"),
    (dict(lr_scheduler='cosinus'), "lr_scheduler='cosinus': use one of diffusers' schedules"),
    (dict(warmup_steps=-1), 'warmup_steps=-1'), (dict(ema_decay=2), 'ema_decay=2'), (dict(snr_gamma=-1), 'snr_gamma=-1'),
    (dict(checkpoint_every=-1), 'checkpoint_every=-1'), (dict(num_workers=-1), 'num_workers=-1'),
    (dict(validation_prompts=['a creature'], validation_seeds=[]), 'give at least one seed'),
    (dict(validation_seeds=['a']), 'validation_seeds')])
def test_bad_settings_are_refused_before_anything_is_written(data, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg): ft.finetune(data, tmp_path / 'run', **{**FAST, 'steps': 2, **kw})
    assert not (tmp_path / 'run').exists()


def test_fp16_on_a_cpu_is_refused_and_leaves_the_process_usable(data, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA GPU"):
        ft.finetune(data, tmp_path / 'run', method='lora', steps=1, mixed_precision='fp16', **FAST)
    assert not (tmp_path / 'run').exists()
    assert len(ft.finetune(data, tmp_path / 'run', method='lora', steps=1, **FAST).losses) == 1   # default settings still run


def test_a_finished_run_is_not_replaced_without_overwrite(data, tmp_path):
    out = tmp_path / 'run'
    first = ft.finetune(data, out, method='lora', steps=1, **FAST)
    weights = sorted(p.read_bytes() for p in first.saved.iterdir())
    for kw in (dict(method='lora'), dict(method='full'), dict(method='lora', resume=True)):
        with pytest.raises(FileExistsError, match=r"already holds the result of a finished run \(lora/\)"):
            ft.finetune(data, out, steps=1, **kw, **FAST)
    assert sorted(p.read_bytes() for p in first.saved.iterdir()) == weights      # untouched
    again = ft.finetune(data, out, method='full', steps=1, overwrite=True, **FAST)
    assert again.saved.name == 'pipeline' and not (out / 'lora').exists()        # one result per folder


def test_resume_with_nothing_to_resume_says_so(data, tmp_path):
    with pytest.warns(UserWarning, match='holds no checkpoint to resume'):
        ft.finetune(data, tmp_path / 'new', method='lora', steps=1, resume=True, **FAST)


def test_command_line(folder, tmp_path, capsys, command_line):
    command_line.run(ft.main, ['--data', folder, '--out', tmp_path / 'cli', '--method', 'full', '--steps', '2',
                               '--batch_size', '2', '--lr', '1e-4', '--ema', '--no-progress', '--no-check_images'])
    assert 'saved' in capsys.readouterr().out and (tmp_path / 'cli' / 'pipeline' / 'unet').exists()
    cfg = json.loads((tmp_path / 'cli' / 'config.json').read_text())
    assert cfg['method'] == 'full' and cfg['ema'] and cfg['lr'] == 1e-4 and not cfg['check_images'] and not cfg['progress']
    assert cfg['batch_size'] == 2 and cfg['steps'] == 2 and cfg['model'] == EMBEDDED_MODEL


def test_command_line_help_and_bad_options(command_line):
    command_line.check(ft.main, 'sd_intro.finetune', ft.FinetuneConfig)


def test_command_line_recipes_and_checks(monkeypatch, command_line):
    "A recipe gives the settings the options leave at their defaults; missing data and bad settings are named first."
    from types import SimpleNamespace
    got = []
    monkeypatch.setattr(ft, 'finetune', lambda data, out, model=None, **kw: got.append(dict(kw, data=data, out=out, model=model))
                        or SimpleNamespace(main_process=False))
    command_line.run(ft.main, ['--recipe', 'pokemon-lora', '--out', 'o', '--steps', '3', '--rank', '8', '--resume'])
    want = dict(ft.RECIPES['pokemon-lora'], out='o', steps=3, rank=8, resume=True)
    assert got == [want]
    for argv, msg in ((['--out', 'o'], 'give --data'), (['--data', 'd', '--out', 'o', '--steps', '0'], 'steps=0: use a whole number'),
                      (['--recipe', 'pokemon-full', '--out', 'o', '--lr_scheduler', 'fast'], "lr_scheduler='fast'")):
        with pytest.raises(SystemExit, match=msg): command_line.run(ft.main, argv)
    assert len(got) == 1


def test_recipes_are_valid_settings():
    for name, r in ft.RECIPES.items():
        cfg = ft.FinetuneConfig.make(**{k: v for k, v in r.items() if k not in ('model', 'data')})
        if name.startswith('pokemon'): assert cfg.resolution == 512 and cfg.mixed_precision == 'fp16', name
        else: assert cfg.resolution is None and cfg.mixed_precision is None and cfg.method == 'lora', name   # the shipped creature LoRA's
    assert ft.RECIPES['pokemon-full']['ema'] and ft.RECIPES['pokemon-lora']['method'] == 'lora'


def test_dataloader_workers_give_the_same_run(data, tmp_path):
    kw = dict(method='lora', steps=2, random_flip=True, **FAST)
    a = ft.finetune(data, tmp_path / 'a', **kw)
    b = ft.finetune(data, tmp_path / 'b', num_workers=2, **kw)
    assert a.losses == b.losses


def test_other_precision_in_the_same_process(data, tmp_path):
    "A notebook runs a float32 fine-tune, then one in bfloat16: accelerate's process-wide state must not refuse it."
    a = ft.finetune(data, tmp_path / 'a', method='lora', steps=1, **FAST)
    b = ft.finetune(data, tmp_path / 'b', method='lora', steps=1, mixed_precision='bf16', **FAST)
    c = ft.finetune(data, tmp_path / 'c', method='lora', steps=1, mixed_precision='no', **FAST)
    assert np.isfinite(b.losses[0]) and abs(b.losses[0] - a.losses[0]) < 0.05 and c.losses == a.losses


def test_write_shapes_folder_is_whole_or_absent(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"new_shape='dragon' is not a shape of this world"):
        ft.write_shapes_folder(tmp_path / 'a', n_new=2, n_old=0, new_shape='dragon')
    assert not (tmp_path / 'a').exists()
    import sd_intro.creatures as creatures   # write_shapes_folder's module (sd_intro.finetune re-exports it)
    calls, real = [], creatures.render
    def render(scene):   # Ctrl-C at the third picture
        calls.append(scene)
        if len(calls) == 3: raise KeyboardInterrupt
        return real(scene)
    monkeypatch.setattr(creatures, 'render', render)
    with pytest.raises(KeyboardInterrupt): ft.write_shapes_folder(tmp_path / 'b', n_new=4, n_old=0)
    assert list(tmp_path.iterdir()) == []                      # no half-written folder, no temporary one
    monkeypatch.setattr(creatures, 'render', real)
    assert len(ft.load_captioned(ft.write_shapes_folder(tmp_path / 'b', n_new=4, n_old=0))) == 4   # the rerun works


def test_numpy_settings_a_path_model_and_home_folders(data, tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.setenv('HOME', str(tmp_path))
    res = ft.finetune(data, '~/run', model=Path(EMBEDDED_MODEL), method='lora', steps=np.int64(1),
                      lr=np.float32(1e-3), batch_size=np.int64(4), progress=False)
    assert res.saved == tmp_path / 'run' / 'lora' and json.loads((tmp_path / 'run' / 'config.json').read_text())['steps'] == 1
    assert not (Path.cwd() / '~').exists()
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(FileExistsError, match='is a file; pass a folder'): ft.finetune(data, tmp_path / 'afile', steps=1, **FAST)


def test_creature_data_is_large_flat_and_never_in_the_unseen_pairs(tmp_path):
    folder = ft.write_shapes_folder(tmp_path / 'c', n_new=60, n_old=0, seed=3)
    caps = [json.loads(l)['text'] for l in (folder / 'metadata.jsonl').read_text().splitlines()]
    assert not any(w in c for c in caps for w in ('small', 'outlined', 'striped'))
    for c, b in ft.UNSEEN_PAIRS: assert not any(f"{c} creature on " in x and f" {b} background" in x for x in caps)
    with pytest.raises(TypeError, match='new_scene='): ft.write_shapes_folder(tmp_path / 'd', n_new=1, new_scene={'radius': 0.3})
    other = ft.write_shapes_folder(tmp_path / 'e', n_new=20, n_old=0, new_scene={})   # every size and style again
    assert len((other / 'metadata.jsonl').read_text().splitlines()) == 20


def test_creature_prompts_use_unseen_pairs_and_size_words():
    ps = ft.creature_prompts(40, seed=1, size='large')
    assert all(p.startswith('a large ') for p in ps)
    for p in ft.creature_prompts(40, seed=2):
        c, b = p.split()[1], p.split(' on ')[1].split()[1]
        assert (c, b) in ft.UNSEEN_PAIRS, p


def test_vae_round_trip_and_ears_kept(pipe):
    kept = ft.ears_kept(pipe.vae, n=4, styles=('flat',))
    assert set(kept) == {'small', 'medium', 'large'} and all(k['clean_rate'] == 1.0 for k in kept.values())
    assert kept['large']['vae'][0].shape == (64, 64, 3) and kept['large']['vae'][0].dtype == np.uint8


def test_shipped_creature_lora_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in p.unet.state_dict().items() if 'to_q' in k}
    p.load_lora_weights(str(ft.CREATURE_LORA), weight_name='pytorch_lora_weights.safetensors')
    assert any('lora' in k for k in p.unet.state_dict())


# ==== reliability (issue 17): nothing a user made is lost; dataset mistakes named ======================================

@pytest.fixture(scope='module')
def small_folder(tmp_path_factory):
    return ft.write_shapes_folder(tmp_path_factory.mktemp('data') / 'creatures', n_new=6, n_old=2, seed=3)


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_runs_lock_ends_with_it(small_folder, tmp_path, lock_holder):
    out = tmp_path / 'run'; out.mkdir()
    other = lock_holder.hold(out)   # another process
    with pytest.raises(RuntimeError, match=rf'in use by another training run \(process {other} on '):
        ft.finetune(small_folder, out, method='lora', steps=1, **FAST)
    assert not (out / 'lora').exists()
    lock_holder.kill(other)   # killed with SIGKILL: its operating-system lock ends with it
    res = ft.finetune(small_folder, out, method='lora', steps=1, **FAST)   # nothing to take over, nothing to clean
    assert res.saved is not None and not (out / '.sd_intro.lock.json').exists()   # released when done


def test_overwrite_removes_only_what_runs_wrote(small_folder, tmp_path):
    out = tmp_path / 'run'
    ft.finetune(small_folder, out, method='lora', steps=2, stop_at=1, validation_prompts=['a creature'], validation_steps=2, **FAST)
    (out / 'validation' / 'my-notes.txt').write_text('mine')
    (out / 'checkpoints' / 'README').write_text('mine too')
    ft.finetune(small_folder, out, method='lora', steps=1, overwrite=True, **FAST)
    assert (out / 'validation' / 'my-notes.txt').read_text() == 'mine' and (out / 'checkpoints' / 'README').exists()
    assert not list((out / 'checkpoints').glob('step-*'))


@pytest.mark.parametrize('where', ['same', 'inside'])
def test_data_folder_as_run_folder_is_refused(small_folder, where):
    before = sorted(p.name for p in small_folder.iterdir())
    out = small_folder if where == 'same' else small_folder / 'run'
    with pytest.raises(ValueError, match='are the same folder' if where == 'same' else 'lie one inside the other'):
        ft.finetune(small_folder, out, method='lora', steps=1, **FAST)
    assert sorted(p.name for p in small_folder.iterdir()) == before


def test_resume_with_other_data_names_the_change_and_needs_asking(small_folder, tmp_path):
    other = ft.write_shapes_folder(tmp_path / 'other', n_new=6, n_old=2, seed=4)
    out = tmp_path / 'run'
    ft.finetune(small_folder, out, method='lora', steps=2, stop_at=1, **FAST)
    with pytest.raises(ValueError, match=r"cannot resume: .*'data'.*resume_changed=True"):
        ft.finetune(other, out, method='lora', steps=2, resume=True, **FAST)
    with pytest.warns(UserWarning, match=r"resume_changed=True: resuming although .*'data'"):
        res = ft.finetune(other, out, method='lora', steps=2, resume=True, resume_changed=True, **FAST)
    assert res.saved is not None and len(res.losses) == 2


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(small_folder, tmp_path):
    kw = dict(method='lora', steps=3, checkpoint_every=1, **FAST)
    whole = ft.finetune(small_folder, tmp_path / 'whole', **kw)
    out = tmp_path / 'run'
    ft.finetune(small_folder, out, stop_at=2, **kw)
    f = out / 'checkpoints' / 'step-000002' / 'trainable.safetensors'
    f.write_bytes(f.read_bytes()[:100])                      # cut short, as by a full disk outside our control
    with pytest.warns(UserWarning, match=r'step-000002: trainable.safetensors is damaged.*from the previous complete one, step-000001'):
        res = ft.finetune(small_folder, out, resume=True, **kw)
    assert res.losses == whole.losses


def _caption_folder(tmp_path, lines, extra=()):
    d = tmp_path / 'd'; d.mkdir()
    Image.new('RGB', (64, 64), 'red').save(d / 'a.png')
    for name in extra: (d / name).write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (d / 'metadata.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
    return d


@pytest.mark.parametrize('lines,msg', [
    ([b'{"file_name": "a.png", "text": "a red caf\xe9"}'], r"metadata.jsonl line 1: not UTF-8 text"),
    ([b'{"file_name": "../a.png", "text": "x"}', b'{"file_name": "a.png", "text": "x"}'], "line 1: file_name '../a.png' points outside"),
    ([b'{"file_name": "/etc/passwd", "text": "x"}', b'{"file_name": "a.png", "text": "x"}'], "line 1: file_name '/etc/passwd' is an absolute path"),
    ([b'{"file_name": "a.png", "text": 42}'], r"caption on line 1 of metadata.jsonl is a int \(42\), not text"),
    ([b'{"file_name": "a.png", "text": "x"}', b'{"file_name": "a.png", "text": "y"}'], "lines 1 and 2 both caption 'a.png'")])
def test_dataset_mistakes_are_named(tmp_path, lines, msg):
    with pytest.raises(ValueError, match=msg): ft.check_imagefolder(_caption_folder(tmp_path, lines))


def test_macos_resource_files_are_ignored(tmp_path):
    d = _caption_folder(tmp_path, [b'{"file_name": "a.png", "text": "a red square"}'], extra=['._a.png'])
    assert ft.check_imagefolder(d) == {'a.png': 'a red square'}
    assert len(ft.load_captioned(d)) == 1


def test_make_keeps_a_chosen_learning_rate():
    assert ft.FinetuneConfig.make(ft.FinetuneConfig(lr=3e-4), method='full').lr == 3e-4
    assert ft.FinetuneConfig.make(ft.FinetuneConfig(), method='full').lr == 1e-5


def test_captioned_rows_of_your_own_need_no_datasets(monkeypatch):
    "`CaptionedImages` over rows of your own passes through `load_captioned` without importing `datasets` (a GPU box "
    "may lack it: found on one)."
    from sd_intro.captioned import CaptionedImages, load_captioned
    class Rows(list):
        def __getitem__(self, k): return [r[k] for r in self] if isinstance(k, str) else list.__getitem__(self, k)
    data = CaptionedImages(Rows([dict(image=Image.new('RGB', (8, 8), 'red'), text='a red square')]))
    monkeypatch.setitem(sys.modules, 'datasets', None)   # importing it now fails
    assert load_captioned(data) is data and data[0][1] == 'a red square' and data.image(0).size == (8, 8)


@pytest.mark.parametrize('random_flip', [False, True])
def test_each_picture_goes_through_the_encoder_once_unless_flips_change_it(folder, tmp_path, monkeypatch, random_flip):
    from diffusers import AutoencoderKL
    encoded, encode = [], AutoencoderKL.encode
    def counting(self, x, *a, **kw):
        encoded.append(len(x)); return encode(self, x, *a, **kw)
    monkeypatch.setattr(AutoencoderKL, 'encode', counting)
    r = ft.finetune(folder, tmp_path / 'run', method='lora', rank=2, steps=5, random_flip=random_flip, **FAST)
    assert r.step == 5   # 20 pictures seen, of 16: every one once, and 4 of them again
    assert sum(encoded) == (20 if random_flip else 16), encoded   # (with flips a picture may differ each time: encoded each time)
