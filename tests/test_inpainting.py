"Lesson 4: inpainting masks, the inpainting pipeline through generate/replay, the blend by hand, and bad inputs."
import types, warnings
import numpy as np
import pytest
import torch
from PIL import Image
from sd_intro.core import (format_parameters, generate, load_pipeline, parse_parameters, read_settings, replay,
                           save_image)
from sd_intro.inpainting import (REGIONS, pasted_back, blend, change_outside, check_inpaint_inputs, check_mask, inpaint_by_hand,
                                 inpaint_pipeline, inpaint_start, is_inpainting, mask_id, object_pixels, repaint,
                                 replay_inpainting, save_inpainting, scene_mask, seam)
from sd_intro.shapes import Scene, render, to_pil

STEPS = 4   # few steps: equality of loops does not need a good picture
SCENE = Scene('circle', 'red', 'blue')
PICTURE = to_pil(render(SCENE))
MASK = scene_mask(SCENE, 'object')
PROMPT = 'a green circle on a blue background'


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))

def close(a, b):
    "The same pictures up to float rounding: at most 1/255 apart (a batch of one against a batch of n, or by hand)."
    return len(a) == len(b) and all(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() <= 1 for x, y in zip(a, b))


@pytest.fixture(scope='module')
def inp(pipe):
    return inpaint_pipeline(pipe)


# ------------------------------------------------------------------------------------------------ masks
def test_scene_masks_cover_their_regions():
    obj = object_pixels(SCENE)
    m = {r: np.asarray(scene_mask(SCENE, r)) > 127 for r in REGIONS}
    assert (m['object'] >= obj).all() and (m['box'] >= m['object']).all()
    assert m['background'][0, 0] and not m['background'][32, 32]
    assert (m['object'] & ~obj).any(), "grow=2 reaches past the object"
    assert np.array_equal(np.asarray(scene_mask(SCENE, grow=0)) > 127, obj)
    striped = object_pixels(Scene('star', 'red', 'blue', style='outlined'))
    assert np.array_equal(striped, object_pixels(Scene('star', 'red', 'blue'))), "outlines mask the whole silhouette"


@pytest.mark.parametrize('kw, err, msg', [
    (dict(region='sky'), ValueError, "region='sky'"),
    (dict(grow=-1), ValueError, 'grow=-1'),
    (dict(grow=1.5), ValueError, 'grow=1.5'),
])
def test_scene_mask_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg): scene_mask(SCENE, **kw)
    with pytest.raises(TypeError, match='shapes.Scene'): scene_mask('circle')


# ------------------------------------------------------------------------------------------------ check_mask
@pytest.mark.parametrize('mask, err, msg', [
    (MASK.resize((32, 32)), ValueError, r'mask_image is 32x32 but image is 64x64.*Image.NEAREST'),
    (PICTURE, ValueError, r'colour \(RGB\) picture.*scene_mask'),
    (MASK.convert('RGBA'), ValueError, r"mode 'RGBA'.*convert\('L'\)"),
    (MASK.convert('F'), ValueError, r"mode 'F'"),
    (Image.new('L', (64, 64), 0), ValueError, 'all black.*paint white'),
    (Image.new('L', (64, 64), 255), ValueError, 'all white.*txt2img'),
    (np.zeros((64, 64, 3), np.uint8), TypeError, r'H x W bool or uint8 array'),
    (np.zeros((64, 64), np.float32), TypeError, r'array of float32'),
    ([MASK, MASK], TypeError, 'pass one mask'),
    (3, TypeError, 'mask_image is a int'),
    ('no/such/mask.png', FileNotFoundError, r"mask_image='no/such/mask.png' does not exist"),
])
def test_check_mask_names_the_mistake(mask, err, msg):
    with pytest.raises(err, match=msg): check_mask(mask, PICTURE)


def test_check_mask_accepts_masks_in_every_reasonable_form(tmp_path):
    arr = np.asarray(MASK) > 127
    assert np.array_equal(np.asarray(check_mask(arr)), np.asarray(MASK))
    assert np.array_equal(np.asarray(check_mask(MASK.convert('RGB'))), np.asarray(MASK))    # grey RGB
    assert np.array_equal(np.asarray(check_mask(MASK.convert('1'))), np.asarray(MASK))
    MASK.save(tmp_path / 'm.png')
    assert np.array_equal(np.asarray(check_mask(tmp_path / 'm.png')), np.asarray(MASK))
    assert mask_id(arr) == mask_id(MASK) == mask_id(MASK.convert('RGB'))


def test_a_mask_smaller_than_one_latent_is_refused():
    dot = Image.new('L', (64, 64), 0); dot.putpixel((3, 3), 255)
    with pytest.raises(ValueError, match='misses every latent'): check_mask(dot)


def test_inputs_are_one_copy_per_image_except_with_a_crop():
    imgs, masks = check_inpaint_inputs(PICTURE, MASK, 3)
    assert len(imgs) == len(masks) == 3
    img, mask = check_inpaint_inputs(PICTURE, MASK, 3, padding_mask_crop=4)
    assert isinstance(img, Image.Image) and isinstance(mask, Image.Image)
    with pytest.raises(TypeError, match='pass one picture'): check_inpaint_inputs([PICTURE], MASK, 1)


# ------------------------------------------------------------------------------------------------ pipelines
def test_inpaint_pipeline_shares_parts_and_is_made_once(pipe, inp):
    assert is_inpainting(inp) and not is_inpainting(pipe)
    assert inp.unet is pipe.unet and inp.vae is pipe.vae
    assert inpaint_pipeline(pipe) is inp and inpaint_pipeline(inp) is inp
    assert load_pipeline(pipe, kind='inpaint').unet is pipe.unet
    with pytest.raises(TypeError, match='pass a loaded pipeline'): inpaint_pipeline('embedded')


def test_a_mask_on_a_pipeline_that_does_not_inpaint_names_the_fix(pipe):
    fix = r"takes no mask_image=.*inpaint_pipeline\(pipe\)"
    with pytest.raises(TypeError, match=fix): generate(pipe, PROMPT, mask_image=MASK, num_inference_steps=STEPS)
    i2i = load_pipeline(pipe, kind='img2img')
    with pytest.raises(TypeError, match=fix):
        generate(i2i, PROMPT, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)


def test_inpainting_needs_its_inputs(inp):
    with pytest.raises(ValueError, match='inpainting pipeline needs image='): generate(inp, PROMPT, mask_image=MASK)
    with pytest.raises(ValueError, match='needs mask_image='): generate(inp, PROMPT, image=PICTURE)
    with pytest.raises(ValueError, match='all black'):
        generate(inp, PROMPT, image=PICTURE, mask_image=Image.new('L', (64, 64), 0))


def test_generate_records_the_mask_and_a_seed_makes_its_picture_in_any_batch(inp, tmp_path):
    res = generate(inp, PROMPT, seed=0, n=3, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)
    s = res.settings[2]
    assert s['mask'] == mask_id(MASK) and s['strength'] == 1.0
    alone = generate(inp, PROMPT, seed=2, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)
    assert close(alone.images, res.images[2:])
    assert parse_parameters(format_parameters(s))['mask'] == s['mask']
    p = save_image(res[2], tmp_path / 'x.png', s)
    with pytest.raises(ValueError, match='holds neither the starting image nor the mask'): replay(p, inp)
    assert close([replay(p, inp, image=PICTURE, mask_image=MASK)], res.images[2:])
    with pytest.warns(UserWarning, match='not the mask these settings were made with'):
        replay(p, inp, image=PICTURE, mask_image=scene_mask(SCENE, 'box'))


def test_save_and_replay_inpainting_beside_files(pipe, inp, tmp_path):
    res = generate(inp, PROMPT, seed=5, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)
    files = save_inpainting(res[0], tmp_path / 'g.png', res.settings[0], PICTURE, MASK)
    assert [f.name for f in files] == ['g.png', 'g.mask.png', 'g.start.png']
    assert read_settings(files[0])['mask'] == mask_id(MASK)
    assert same([replay_inpainting(files[0], pipe)], res.images)
    files[1].unlink()
    with pytest.raises(FileNotFoundError, match=r'g\.mask\.png.*keep them together'): replay_inpainting(files[0], pipe)


def test_save_inpainting_writes_all_three_or_none(inp, tmp_path):
    res = generate(inp, PROMPT, seed=5, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match='not the mask these settings were made with'):
        save_inpainting(res[0], tmp_path / 'g.png', res.settings[0], PICTURE, scene_mask(SCENE, 'box'))
    with pytest.raises(ValueError, match='use save_image'):
        save_inpainting(res[0], tmp_path / 'g.png', {'prompt': 'x'}, PICTURE, MASK)
    with pytest.raises(ValueError, match=r'\.png name'):
        save_inpainting(res[0], tmp_path / 'g.jpg', res.settings[0], PICTURE, MASK)
    assert list(tmp_path.iterdir()) == [], "nothing half-written"


# ------------------------------------------------------------------------------------------------ by hand
def test_one_blend_step_matches_the_pipeline(pipe, inp):
    from sd_intro.core import generators
    from sd_intro.guidance import denoise, encode_prompts
    seen = []
    generate(inp, PROMPT, seed=1, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS,
             callback_on_step_end=lambda p, i, t, kw: seen.append(kw['latents'].clone()) or kw)
    st = inpaint_start(pipe, PICTURE, MASK, generators([1]), STEPS)
    cond, uncond = encode_prompts(pipe, PROMPT)
    ts = st['timesteps']
    stepped, _ = denoise(pipe, seen[1], cond, uncond, ts[2:3], 7.5)
    torch.testing.assert_close(blend(pipe, stepped, st['x0'], st['noise'], st['mask'], ts[3]), seen[2], atol=1e-4, rtol=0)


def test_inpaint_by_hand_makes_the_pipeline_pictures(pipe, inp):
    res = generate(inp, PROMPT, seed=0, n=2, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS)
    hand = inpaint_by_hand(pipe, PICTURE, MASK, PROMPT, seed=0, n=2, num_inference_steps=STEPS)
    assert close(hand.images, res.images) and hand.settings == res.settings
    weak = generate(inp, PROMPT, seed=0, image=PICTURE, mask_image=MASK, num_inference_steps=STEPS * 2, strength=0.6)
    assert close(inpaint_by_hand(pipe, PICTURE, MASK, PROMPT, seed=0, num_inference_steps=STEPS * 2, strength=0.6).images,
                weak.images)


def test_inpaint_by_hand_refuses_a_9_channel_unet():
    fake = types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(in_channels=9)))
    with pytest.raises(ValueError, match='takes 9 input channels.*generate'): inpaint_by_hand(fake, PICTURE, MASK, PROMPT)


# ------------------------------------------------------------------------------------------------ measures
def test_change_outside_and_seam_on_known_pictures():
    assert change_outside([PICTURE], PICTURE, MASK) == dict(outside=0.0, edge=0.0, far=0.0)
    a = np.asarray(PICTURE).copy(); a[0, 0] += 10     # one pixel far from the mask
    c = change_outside([Image.fromarray(a)], PICTURE, MASK)
    assert c['edge'] == 0 and c['far'] > 0 and c['outside'] > 0
    assert seam(PICTURE, MASK) == 0.0                           # the grown mask's edge lies in flat blue


def test_pasting_back_keeps_the_outside_exactly(pipe):
    made = repaint(pipe, PICTURE, MASK, PROMPT, n=2, num_inference_steps=STEPS, judged=False)
    assert made.change['outside'] > 0, "the VAE round trip changes the outside a little"
    r = pasted_back(made, judged=False)
    assert r.change['outside'] == 0.0 and r.success is None and len(r.images) == 2
    soft = pasted_back(made, blur=2, judged=False)   # a cross-fade: only just outside the edge changes
    assert soft.change['far'] < made.change['far'] and soft.change['edge'] > 0


# ------------------------------------------------------------------------------------------------ a real-checkpoint shape
def test_a_9_channel_inpainting_checkpoint_loads_and_generates(pipe, tmp_path):
    "A local stand-in for stable-diffusion-inpainting: the embedded model with a (random) 9-channel UNet."
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, 'in_channels': 9})
    StableDiffusionInpaintPipeline(**{**pipe.components, 'unet': unet}).save_pretrained(tmp_path / 'inpaint-9')
    big = load_pipeline(str(tmp_path / 'inpaint-9'), kind='inpaint')
    assert type(big).__name__ == 'StableDiffusionInpaintPipeline' and big.unet.config.in_channels == 9
    res = generate(big, PROMPT, seed=0, n=2, image=PICTURE, mask_image=MASK, num_inference_steps=2)
    assert res[0].size == (64, 64) and res.settings[0]['mask'] == mask_id(MASK)
    with pytest.raises(ValueError, match='9 input channels'): inpaint_by_hand(big, PICTURE, MASK, PROMPT)


def test_paste_original_keeps_the_kept_region_exactly():
    from sd_intro.inpainting import paste_original, scene_mask
    scene = Scene('circle', 'red', 'blue'); picture = to_pil(render(scene))
    mask = scene_mask(scene, 'background', grow=2)
    other = Image.new('RGB', picture.size, (240, 220, 40))
    kept = np.asarray(np.asarray(mask) < 128)
    out = paste_original([other], picture, mask)[0]
    assert (np.asarray(out)[kept] == np.asarray(picture)[kept]).all()
    assert (np.asarray(out)[~kept] == np.asarray(other)[~kept]).all()
    assert change_outside([paste_original([other], picture, mask, blur=2)[0]], picture, mask)['outside'] < 20
    with pytest.raises(ValueError, match='mask_image is 32x32'): paste_original([other], picture, mask.resize((32, 32)))


@pytest.mark.parametrize('kw, err, msg', [
    (dict(blur=-1), ValueError, r'blur=-1: use a number of pixels, 0 or more'),
    (dict(blur='2'), ValueError, r"blur='2'"),
    (dict(blur=True), ValueError, r'blur=True'),
    (dict(images=[Image.new('RGB', (32, 32))]), ValueError, r"images \['0: 32x32'\] are not 64x64 like picture"),
    (dict(images=Image.new('RGB', (64, 64))), TypeError, r'images is one picture; pass a list'),
    (dict(mask_image=Image.new('L', (32, 32), 255)), ValueError, r'mask_image is 32x32 but image is 64x64'),
])
def test_paste_original_bad_arguments_name_the_argument(kw, err, msg):
    from sd_intro.inpainting import paste_original
    args = {**dict(images=[PICTURE], picture=PICTURE, mask_image=scene_mask(SCENE, 'background', grow=2)), **kw}
    with pytest.raises(err, match=msg): paste_original(**args)


def test_the_background_edit_keeps_the_circle(inp, pipe):
    "Lesson 4's background edit: as made the circle is painted over; pasted back through a 1-px feather it changes no more than the VAE round trip + 2/255."
    from sd_intro.inpainting import paste_original, vae_round_trip
    mask = scene_mask(SCENE, 'background', grow=2)
    made = generate(inp, 'a yellow background', seed=[1, 3], image=PICTURE, mask_image=mask, num_inference_steps=10)
    inside = lambda im: change_outside([im], PICTURE, mask)['outside']
    vae = inside(vae_round_trip(pipe, PICTURE))
    assert 0 < vae < 10
    assert min(inside(im) for im in made.images) > vae + 20, "the pipeline alone paints the small kept circle over"
    for im in paste_original(made.images, PICTURE, mask, blur=1):
        assert inside(im) <= vae + 2, (inside(im), vae)
