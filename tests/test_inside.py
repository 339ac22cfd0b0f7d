"Lesson 6's helpers: the encoder by hand, the loop from separately loaded parts, loss guidance, textual inversion."
import json
import numpy as np
import pytest
import torch
from sd_intro.core import EMBEDDED_MODEL, generate, quiet_loading
from sd_intro.inside import (LossGuidance, Parts, add_token, colour_loss, encode_by_hand, images_only, images_to_latents,
                             latents_to_images, load_parts, one_token, sample_parts, save_learned_embeds, swap_word,
                             text_embeddings, textual_inversion, token_rows)
import shutil

PROMPT = 'a red circle on a blue background'
STEPS = 4   # equality of the loops does not need a good picture


def px(a, b):
    "Largest per-pixel difference between two lists of PIL images."
    return max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope='module')
def parts(): return load_parts()


@pytest.fixture(scope='module')
def creatures(tmp_path_factory):
    from sd_intro.creatures import write_shapes_folder
    return write_shapes_folder(tmp_path_factory.mktemp('ti') / 'creatures', n_new=8, n_old=2, seed=0)


def test_token_rows(pipe):
    rows = token_rows(pipe.tokenizer, PROMPT)
    assert len(rows) == pipe.tokenizer.model_max_length == 24
    assert rows[0]['id'] == pipe.tokenizer.bos_token_id and rows[8]['id'] == pipe.tokenizer.eos_token_id
    assert [r['mask'] for r in rows] == [1] * 9 + [0] * 15
    with pytest.raises(TypeError, match='one prompt as a str'): token_rows(pipe.tokenizer, [PROMPT])


def test_encode_by_hand_equals_the_encoder(pipe):
    te, tok = pipe.text_encoder, pipe.tokenizer
    ids = tok([PROMPT, '', 'a star'], padding='max_length', max_length=24, return_tensors='pt').input_ids
    with torch.no_grad():
        torch.testing.assert_close(encode_by_hand(te, te.get_input_embeddings()(ids)), te(ids)[0], atol=1e-5, rtol=1e-5)
        short = ids[:, :10]   # fewer positions than the maximum work too
        torch.testing.assert_close(encode_by_hand(te, te.get_input_embeddings()(short)), te(short)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='this text encoder has 24'): encode_by_hand(te, torch.zeros(1, 25, 64))


def test_swap_word(pipe):
    same = swap_word(pipe, PROMPT, 'circle', 'circle')
    torch.testing.assert_close(same, text_embeddings(pipe, PROMPT), atol=1e-5, rtol=1e-5)
    star = swap_word(pipe, PROMPT, 'circle', 'star')
    torch.testing.assert_close(star, text_embeddings(pipe, PROMPT.replace('circle', 'star')), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a word of"): swap_word(pipe, PROMPT, 'square', 'star')
    with pytest.raises(ValueError, match="new_word='zebra' is .* tokens"): swap_word(pipe, PROMPT, 'circle', 'zebra')
    with pytest.raises(ValueError, match='pass one word'): one_token(pipe.tokenizer, '')


def test_parts_make_the_pipeline_pixels(pipe, parts):
    assert isinstance(parts, Parts) and parts.vae_scale_factor == pipe.vae_scale_factor
    ref = generate(pipe, [PROMPT, 'a star'], seed=[3, 9], num_inference_steps=STEPS).images
    assert px(sample_parts(parts, [PROMPT, 'a star'], seed=[3, 9], num_inference_steps=STEPS), ref) == 0
    emb = text_embeddings(parts, [PROMPT, 'a star'])
    assert px(sample_parts(parts, emb, seed=[3, 9], num_inference_steps=STEPS), ref) == 0
    assert parts.unet is not pipe.unet   # loaded on their own


def test_vae_round_trip(pipe):
    from sd_intro.shapes import make_dataset, to_pil
    imgs, _, _ = make_dataset(8, seed=1)
    lat = images_to_latents(pipe.vae, [to_pil(a) for a in imgs])
    assert lat.shape == (8, 4, 8, 8)
    back = np.stack([np.asarray(b, float) for b in latents_to_images(pipe.vae, lat)])
    wrong = np.stack([np.asarray(b, float) for b in latents_to_images(pipe.vae, lat, scaled=False)])
    err = np.abs(back - imgs).mean()
    assert err < 12 and np.abs(wrong - imgs).mean() > 2 * err


def test_loss_guidance(pipe):
    ref = generate(pipe, PROMPT, seed=0, num_inference_steps=STEPS).images
    with LossGuidance(pipe, colour_loss('green'), scale=0): same = generate(pipe, PROMPT, seed=0, num_inference_steps=STEPS).images
    assert px(same, ref) == 0
    with LossGuidance(pipe, colour_loss('green'), scale=40, every=1) as lg:
        greener = generate(pipe, PROMPT, seed=0, num_inference_steps=STEPS).images
    assert len(lg.losses) == STEPS and 'step' not in pipe.scheduler.__dict__
    green = np.array([40, 170, 60], float)
    dist = lambda im: np.abs(np.asarray(im, float) - green).mean()
    assert dist(greener[0]) < dist(ref[0])
    with pytest.raises(RuntimeError):   # unwrapped after an error too
        with LossGuidance(pipe, colour_loss()): raise RuntimeError('boom')
    assert 'step' not in pipe.scheduler.__dict__
    with pytest.raises(ValueError, match="colour='teal'"): colour_loss('teal')
    with pytest.raises(ValueError, match='scale=-1'): LossGuidance(pipe, colour_loss(), scale=-1)
    from sd_intro.pipelines import swapped_scheduler
    with swapped_scheduler(pipe, 'Euler'):
        with pytest.raises(ValueError, match='EulerDiscreteScheduler'): LossGuidance(pipe, colour_loss())


def test_textual_inversion_round_trip(creatures, tmp_path):
    from diffusers import StableDiffusionPipeline
    p = load_parts()
    before = p.text_encoder.get_input_embeddings().weight.detach().clone()
    inv = textual_inversion(p, creatures, steps=2, batch_size=4, lr=1e-2)
    table = p.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == before.shape[0] + 1 and inv.token_id == before.shape[0]
    torch.testing.assert_close(table[:-1], before, atol=0, rtol=0)   # only the new row was trained
    init = before[one_token(p.tokenizer, 'animal')]
    assert not torch.equal(inv.embedding, init) and len(inv.losses) == 2
    f = save_learned_embeds(inv, tmp_path / 'learned_embeds.safetensors')
    from safetensors.torch import load_file
    saved = load_file(f)
    assert list(saved) == ['<creature>'] and saved['<creature>'].shape == (1, 64)
    with quiet_loading():
        fresh = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
    fresh.load_textual_inversion(str(f))
    new = fresh.tokenizer.convert_tokens_to_ids('<creature>')
    torch.testing.assert_close(fresh.text_encoder.get_input_embeddings().weight[new], inv.embedding)
    ids = fresh.tokenizer('a red <creature>', add_special_tokens=False).input_ids
    assert new in ids and len(ids) == 3


def test_textual_inversion_bad_input_changes_nothing(creatures, tmp_path):
    p = load_parts()
    n = len(p.tokenizer)
    with pytest.raises(ValueError, match="init_word='zebra'"): textual_inversion(p, creatures, init_word='zebra')
    with pytest.raises(ValueError, match="word='dragon' is in none"): textual_inversion(p, creatures, word='dragon')
    with pytest.raises(ValueError, match='lr=0'): textual_inversion(p, creatures, lr=0)
    with pytest.raises(ValueError, match='already in the vocabulary'): textual_inversion(p, creatures, token='circle</w>')
    with pytest.raises(FileNotFoundError, match='no such folder'): textual_inversion(p, tmp_path / 'nowhere')
    assert len(p.tokenizer) == n and p.text_encoder.get_input_embeddings().weight.shape[0] == n
    with pytest.raises(ValueError, match='without spaces'): add_token(p, 'two words', 'animal')


def test_save_learned_embeds_checks_its_path(tmp_path):
    from sd_intro.inside import Inversion
    inv = Inversion('<x>', 0, torch.zeros(64), [], 0.0, 0)
    with pytest.raises(ValueError, match='.safetensors'): save_learned_embeds(inv, tmp_path / 'x.bin')
    with pytest.raises(FileNotFoundError, match='does not exist'): save_learned_embeds(inv, tmp_path / 'no' / 'x.safetensors')
    assert list(tmp_path.iterdir()) == []


def test_images_only(creatures, tmp_path):
    out = images_only(creatures, tmp_path / 'pics')
    names = sorted(q.name for q in out.iterdir())
    assert 'metadata.jsonl' not in names and len(names) == 10 and all(n.endswith('.png') for n in names)
    with pytest.raises(FileExistsError, match='not an empty folder'): images_only(creatures, out)
    with pytest.raises(FileNotFoundError, match='no such folder'): images_only(tmp_path / 'nowhere', tmp_path / 'x')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no pictures'): images_only(tmp_path / 'empty', tmp_path / 'y')
    assert not (tmp_path / 'y').exists()


def test_fit_conditioning_trains_the_whole_encoder_output_and_leaves_the_unet(parts):
    from sd_intro.inside import fit_conditioning, text_embeddings
    from sd_intro.shapes import Scene, render, to_pil
    pics = [to_pil(render(Scene('circle', 'red', 'green', size=0.33)))] * 4
    w = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    start = text_embeddings(parts, ['a red creature on a green background'])
    cond = fit_conditioning(parts, pics, 'a red creature on a green background', steps=2, batch_size=2)
    assert cond.shape == start.shape and not cond.requires_grad and not torch.equal(cond, start)
    assert all(torch.equal(w[k], v) for k, v in parts.unet.state_dict().items())
    assert not any(p.requires_grad for p in parts.unet.parameters())
    with pytest.raises(ValueError, match='steps='): fit_conditioning(parts, pics, 'x', steps=0)
    with pytest.raises(ValueError, match='lr='): fit_conditioning(parts, pics, 'x', lr=-1)
    with pytest.raises(ValueError, match='images is empty'): fit_conditioning(parts, [], 'x')


# ==== models and records (issue 31): load_parts checks as load_pipeline does ===========================================

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
