"Lesson 3: loading starting images (local web server, no internet), the shipped sketch, img2img by hand, chains."
import http.server, json, socket, threading, warnings
from functools import partial
import numpy as np
import pytest
from PIL import Image
from sd_intro.core import generate, generators, load_pipeline, seeds_for
from sd_intro.img2img import (Chain, Hop, ResizeNote, StrengthSweep, WOLF_SKETCH_URL, draw_sketch, img2img_by_hand,
                              img2img_pipeline, load_image, noised_start, pixel_diff, replay_chain, run_chain,
                              sketch_path, ssim, steps_run, strength_sweep)
import base64

PROMPT = 'a solid red star on a white background'
STEPS = 5   # few steps: equality of loops does not need a good picture


def same(a, b):
    "Whether two lists of PIL images have exactly the same pixels."
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------- a web server on 127.0.0.1, started by the test
@pytest.fixture
def server(tmp_path):
    "Serve `tmp_path/www` on a free port of 127.0.0.1; `server.hits` lists the paths requested."
    www = tmp_path / 'www'; www.mkdir()
    hits = []
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            return super().do_GET()
        def log_message(self, *a): pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), partial(Handler, directory=str(www)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True); t.start()
    class S: pass
    s = S(); s.www, s.hits, s.url = www, hits, f"http://127.0.0.1:{httpd.server_address[1]}"
    yield s
    httpd.shutdown(); httpd.server_close()


def test_url_downloads_once_then_cache(server, tmp_path):
    draw_sketch(size=64).save(server.www / 'sketch.png')
    cache = tmp_path / 'cache'
    a = load_image(f"{server.url}/sketch.png", cache_dir=cache)
    assert a.mode == 'RGB' and a.size == (64, 64)
    assert server.hits == ['/sketch.png']
    assert list(cache.rglob('sketch.png')), "the download is kept in cache_dir"
    b = load_image(f"{server.url}/sketch.png", cache_dir=cache)
    assert server.hits == ['/sketch.png'], "the second call must not download again"
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_same_file_name_from_two_urls_not_confused(server, tmp_path):
    (server.www / 'a').mkdir(); (server.www / 'b').mkdir()
    Image.new('RGB', (8, 8), 'red').save(server.www / 'a' / 'img.png')
    Image.new('RGB', (8, 8), 'blue').save(server.www / 'b' / 'img.png')
    r = load_image(f"{server.url}/a/img.png", cache_dir=tmp_path)
    b = load_image(f"{server.url}/b/img.png", cache_dir=tmp_path)
    assert r.getpixel((0, 0)) == (255, 0, 0) and b.getpixel((0, 0)) == (0, 0, 255)


def test_dead_url_404(server, tmp_path):
    with pytest.raises(ConnectionError, match=r"url_or_path_or_image='http://127\.0\.0\.1:\d+/gone\.png'.*HTTP 404.*local path"):
        load_image(f"{server.url}/gone.png", cache_dir=tmp_path)


def test_dead_url_no_server(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]   # a port nobody listens on once closed
    with pytest.raises(ConnectionError, match=r"could not download url_or_path_or_image=.*Check the address"):
        load_image(f"http://127.0.0.1:{port}/sketch.png", cache_dir=tmp_path)


def test_url_to_a_web_page_is_not_an_image_and_is_not_cached(server, tmp_path):
    (server.www / 'page.png').write_text('<!DOCTYPE html><html><body>a picture</body></html>')
    with pytest.raises(ValueError, match=r"url_or_path_or_image=.*was downloaded, but it is an HTML/XML page.*Copy image address"):
        load_image(f"{server.url}/page.png", cache_dir=tmp_path)
    Image.new('RGB', (8, 8), 'green').save(server.www / 'page.png')   # fixed on the server: the retry downloads it
    assert load_image(f"{server.url}/page.png", cache_dir=tmp_path).getpixel((0, 0)) == (0, 128, 0)
    assert server.hits == ['/page.png', '/page.png']


def test_other_url_schemes_refused():
    with pytest.raises(ValueError, match="only http:// and https://"):
        load_image('ftp://example.com/sketch.png')


# ---------------------------------------------------------------- local files and images
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"url_or_path_or_image='.*nope\.png' does not exist.*sketch_path\(\)"):
        load_image(tmp_path / 'nope.png')


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_image(tmp_path)


def test_corrupt_file(tmp_path):
    Image.new('RGB', (32, 32), 'red').save(tmp_path / 'ok.png')
    (tmp_path / 'cut.png').write_bytes((tmp_path / 'ok.png').read_bytes()[:60])
    (tmp_path / 'head.jpg').write_bytes(b'\xff\xd8\xff\xe0' + b'\x00' * 20)
    for name in ('cut.png', 'head.jpg'):
        with pytest.raises(ValueError, match=rf"url_or_path_or_image='.*{name}' is a corrupt or truncated image.*re-save"):
            load_image(tmp_path / name)


def test_non_image_file(tmp_path):
    (tmp_path / 'notes.png').write_text('these are my notes')
    with pytest.raises(ValueError, match=r"url_or_path_or_image='.*notes\.png' is not an image \(it does not start like a PNG.*PNG, JPEG"):
        load_image(tmp_path / 'notes.png')


def test_wrong_type_and_array():
    with pytest.raises(TypeError, match="url_or_path_or_image is a list"):
        load_image([1, 2])
    with pytest.raises(TypeError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    a = np.zeros((8, 8, 3), np.uint8); a[..., 2] = 200
    assert load_image(a).getpixel((1, 1)) == (0, 0, 200)


def test_rgba_on_white_and_greyscale_to_rgb(tmp_path):
    im = Image.new('RGBA', (16, 16), (0, 0, 0, 0)); im.putpixel((2, 2), (0, 0, 255, 255)); im.save(tmp_path / 'a.png')
    out = load_image(str(tmp_path / 'a.png'))
    assert out.mode == 'RGB' and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 0, 255)
    assert load_image(Image.new('L', (8, 8), 100)).getpixel((3, 3)) == (100, 100, 100)
    assert load_image(Image.new('LA', (8, 8), (0, 0))).getpixel((3, 3)) == (255, 255, 255)
    p = Image.new('P', (8, 8)); p.putpalette([10, 20, 30] * 256)
    assert load_image(p).getpixel((0, 0)) == (10, 20, 30)
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert load_image(i16).getpixel((0, 0)) == (255, 255, 255)


def test_resizing_says_so(pipe):
    with pytest.warns(ResizeNote, match=r"from 100x50 to 64x64 .*centre-cropped"):
        assert load_image(Image.new('RGB', (100, 50)), size=64).size == (64, 64)
    with pytest.warns(ResizeNote, match=r"from 70x61 to 64x56 \(a multiple of 8"):
        assert load_image(Image.new('RGB', (70, 61))).size == (64, 56)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # nothing to say when the size already fits
        assert load_image(Image.new('RGB', (64, 48))).size == (64, 48)
        assert load_image(Image.new('RGB', (64, 64)), size=(64, 64)).size == (64, 64)
        assert load_image(sketch_path(), size=pipe).size == (64, 64)   # a resize that was asked for, same proportions
        assert load_image(Image.new('RGB', (128, 96)), size=(64, 48)).size == (64, 48)


def test_bad_sizes():
    with pytest.raises(ValueError, match=r"size=60: .*multiples of 8.*try size=\(64, 64\)"):
        load_image(Image.new('RGB', (8, 8)), size=60)
    with pytest.raises(ValueError, match="smaller than 8 pixels"):
        load_image(Image.new('RGB', (5, 40)))


def test_load_image_does_not_change_its_argument():
    im = Image.new('RGBA', (20, 20), (0, 0, 0, 0))
    out = load_image(im, size=8)   # (a size asked for is not noted: only one load_image chose itself)
    assert out.size == (8, 8) and out.mode == 'RGB'
    assert im.mode == 'RGBA' and im.size == (20, 20)


# ---------------------------------------------------------------- the sketch
def test_shipped_sketch():
    p = sketch_path()
    assert p.exists() and p.parent.name == 'assets'
    im = Image.open(p)
    assert im.size == (512, 512) and im.mode == 'RGB'
    a = np.asarray(im, float)
    assert np.abs(a - np.asarray(draw_sketch(), float)).mean() < 1, "shipped sketch differs from draw_sketch()"
    dark = (a.mean(-1) < 100).mean()
    assert 0.02 < dark < 0.2, f"an outline, not a filled shape or a blank page ({dark:.1%} ink)"
    assert tuple(a[2, 2].astype(int)) == (245, 245, 245)      # the shapes world's white paper


def test_draw_sketch_shapes():
    for s in ('circle', 'square', 'triangle', 'star'):
        assert draw_sketch(s, 64).size == (64, 64)
    with pytest.raises(ValueError, match="shape='creature'"):
        draw_sketch('creature')


def test_wolf_url_kept():
    assert WOLF_SKETCH_URL == 'https://s3.amazonaws.com/moonup/production/uploads/1664665907257-noauth.png'


# ---------------------------------------------------------------- the pipeline, strength, steps run
def test_steps_run_matches_diffusers(pipe):
    i2i = img2img_pipeline(pipe)
    sketch = load_image(draw_sketch(size=64))
    for steps, strength in ((10, 0.3), (50, 0.58), (4, 1.0)):
        count = []
        i2i('x', image=sketch, strength=strength, num_inference_steps=steps, generator=generators([0]),
            callback_on_step_end=lambda p, i, t, kw: count.append(i) or kw, output_type='latent')
        assert len(count) == steps_run(steps, strength), (steps, strength)
    assert steps_run(50, 0.58) == 28
    with pytest.raises(ValueError, match="strength=-0.1"):
        steps_run(10, -0.1)


def test_img2img_pipeline_and_num_images_per_prompt(pipe):
    i2i = img2img_pipeline(pipe)
    assert type(i2i).__name__ == 'StableDiffusionImg2ImgPipeline' and img2img_pipeline(i2i) is i2i
    assert i2i.unet is pipe.unet                          # parts shared, not loaded again
    assert img2img_pipeline(pipe) is i2i                  # made once per pipeline...
    old = pipe.scheduler
    try:
        pipe.scheduler = type(old).from_config(old.config)
        assert img2img_pipeline(pipe).scheduler is pipe.scheduler   # ...and again when its parts change
    finally: pipe.scheduler = old
    sketch = load_image(draw_sketch(size=64))
    raw = i2i(prompt=PROMPT, image=sketch, strength=0.8, num_inference_steps=STEPS, num_images_per_prompt=3,
              generator=generators(seeds_for(7, 3))).images
    res = generate(i2i, PROMPT, seed=7, n=3, image=sketch, strength=0.8, num_inference_steps=STEPS)
    assert same(raw, res.images)
    assert res.settings[1]['strength'] == 0.8 and res.settings[1]['seed'] == 8


def test_similarity_measures():
    a = np.asarray(draw_sketch(size=64))
    assert ssim(a, a) == pytest.approx(1.0) and pixel_diff(a, a) == 0
    assert ssim(a, 255 - a) < 0 and pixel_diff(a, 255 - a) > 100
    with pytest.raises(ValueError, match="differ in size"):
        ssim(a, a[:32])
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_diff(a, a[:32])


def test_strength_sweep_small(pipe):
    sw = strength_sweep(pipe, draw_sketch(size=64), 'a solid yellow star on a blue background', strengths=(0.2, 1.0),
                        n=2, num_inference_steps=STEPS, judged=False)
    assert isinstance(sw, StrengthSweep) and [r['steps_run'] for r in sw.rows] == [1, 5]
    assert all(r['adherence'] is None for r in sw.rows) and 'no judge' in sw.table()
    assert sw.grid().size[0] == 3 * 128 and sw.grid().size[1] > 2 * 128
    with pytest.raises(ValueError, match="runs no denoising step"):
        strength_sweep(pipe, draw_sketch(size=64), 'x', strengths=(0.1,), num_inference_steps=5)


# ---------------------------------------------------------------- img2img by hand
def test_by_hand_equals_pipeline(pipe):
    sketch = load_image(draw_sketch(size=64))
    want = generate(img2img_pipeline(pipe), PROMPT, seed=3, n=2, image=sketch, strength=0.6,
                    num_inference_steps=10, negative_prompt='blue')
    got = img2img_by_hand(pipe, sketch, PROMPT, strength=0.6, seed=3, n=2, num_inference_steps=10, negative_prompt='blue')
    assert same(got.images, want.images)
    assert got.settings == want.settings


def test_by_hand_equals_pipeline_at_another_size(pipe):
    wide = load_image(draw_sketch(size=64).crop((0, 16, 64, 48)))          # 64x32: used at its own size, like the pipeline
    want = img2img_pipeline(pipe)(PROMPT, image=wide, strength=0.5, num_inference_steps=4, generator=generators([9])).images
    got = img2img_by_hand(pipe, wide, PROMPT, strength=0.5, seed=9, num_inference_steps=4)
    assert got.images[0].size == (64, 32) and same(got.images, want)
    assert (got.settings[0]['width'], got.settings[0]['height']) == (64, 32)


def test_noised_start_timesteps(pipe):
    sketch = load_image(draw_sketch(size=64))
    lat, ts = noised_start(pipe, sketch, 0.5, 10, generators([0, 1]))
    assert lat.shape == (2, 4, 8, 8) and len(ts) == 5
    pipe.scheduler.set_timesteps(10)
    assert ts.tolist() == pipe.scheduler.timesteps[5:].tolist()
    with pytest.raises(ValueError, match="runs no step"):
        noised_start(pipe, sketch, 0.05, 10, generators([0]))


# ---------------------------------------------------------------- chains
HOPS = [Hop(PROMPT, strength=0.8, steps=STEPS, seed=1000, n=3, keep=2),
        dict(prompt='a striped red star on a white background', strength=0.6, steps=STEPS, seed=5, n=2)]


@pytest.mark.filterwarnings('ignore::sd_intro.img2img.ResizeNote')
def test_chain_runs_records_and_replays(pipe, tmp_path):
    ch = run_chain(pipe, sketch_path(), HOPS)
    assert isinstance(ch, Chain) and [len(g.images) for g in ch.generations] == [3, 2]
    rec = json.loads(json.dumps(ch.record))                 # JSON-ready
    assert rec['start']['source'] == str(sketch_path()) and rec['start']['png_base64']   # kept whole: a record is data
    assert [h['steps_run'] for h in rec['hops']] == [4, 3] and rec['hops'][0]['keep'] == 2
    # hop 2 starts from hop 1's third image
    direct = generate(img2img_pipeline(pipe), 'a striped red star on a white background', seed=5, n=2,
                      image=ch.generations[0].images[2], strength=0.6, num_inference_steps=STEPS)
    assert same(direct.images, ch.generations[1].images)
    again = replay_chain(rec, pipe)
    assert all(same(a.images, b.images) for a, b in zip(ch.generations, again.generations))
    again2 = replay_chain(ch.save(tmp_path / 'chain.json'), pipe)
    assert same(again2.carried, ch.carried) and ch.final is ch.carried[-1]
    assert ch.grid().size[0] == 4 * 128 and ch.grid().size[1] > 2 * 128


def test_chain_from_an_image_embeds_it(pipe):
    start = draw_sketch('circle', 64, seed=1)
    ch = run_chain(pipe, start, [Hop(PROMPT, strength=0.6, steps=STEPS)])
    rec = json.loads(json.dumps(ch.record))
    assert rec['start']['source'] is None and rec['start']['png_base64']
    assert same(replay_chain(rec, pipe).generations[0].images, ch.generations[0].images)
    wide = draw_sketch(size=64).crop((0, 16, 64, 48))
    ch = run_chain(pipe, wide, [Hop(PROMPT, strength=0.5, steps=4)], size=None)     # keep its proportions
    assert (ch.record['width'], ch.record['height']) == (64, 32) and ch.final.size == (64, 32)
    assert same(replay_chain(ch.record, pipe).carried, ch.carried)


def test_replay_warns_on_another_start(pipe):
    ch = run_chain(pipe, draw_sketch('circle', 64), [Hop(PROMPT, strength=0.6, steps=2)])
    with pytest.warns(UserWarning, match="start picture differs"):
        replay_chain(ch.record, pipe, start=draw_sketch('square', 64))


def test_bad_hops(pipe):
    with pytest.raises(ValueError, match=r"keep=3: must index one of the n=3"):
        Hop('x', n=3, keep=3)
    with pytest.raises(ValueError, match="unknown settings \\['init_image'\\]"):
        run_chain(pipe, draw_sketch(size=64), [dict(prompt='x', init_image=None)])
    with pytest.raises(ValueError, match="runs no denoising step"):
        Hop('x', strength=0.01, steps=30)
    with pytest.raises(ValueError, match="hops is empty"):
        run_chain(pipe, draw_sketch(size=64), [])
    with pytest.raises(ValueError, match="not a chain record"):
        replay_chain({'prompt': 'x'}, pipe)


@pytest.mark.parametrize('size,err,msg', [('model', TypeError, 'size=pipe'), ((64,), TypeError, r'\(width, height\)'),
                                          (64.0, TypeError, 'pass an int'), (100_000, ValueError, 'larger than 4096'),
                                          ((60, 64), ValueError, r'try size=\(64, 64\)')])
def test_load_image_sizes(size, err, msg):
    with pytest.raises(err, match=msg): load_image(sketch_path(), size=size)


def test_load_image_channels_first_array():
    with pytest.raises(TypeError, match=r'channels-first.*transpose\(1, 2, 0\)'): load_image(np.zeros((3, 16, 16), np.uint8))
    assert load_image(np.zeros((16, 16, 1), np.uint8)).size == (16, 16)


@pytest.mark.parametrize('kw,err,msg', [(dict(prompt=None), TypeError, 'pass the prompt as a str'),
                                        (dict(prompt='a star', seed='31'), TypeError, "seed='31'"),
                                        (dict(prompt='a star', strength=0), ValueError, 'strength=0'),
                                        (dict(prompt='a star', negative_prompt=None), TypeError, "'' for none")])
def test_hop_checks_its_fields(kw, err, msg):
    with pytest.raises(err, match=msg): Hop(**kw)


def test_chain_save_and_replay_mistakes(pipe, tmp_path):
    chain = run_chain(pipe, sketch_path(), [Hop('a red star on a white background', strength=0.5, steps=STEPS)])
    with pytest.raises(ValueError, match='use a .json name'): chain.save(tmp_path / 'c.png')
    with pytest.raises(FileNotFoundError, match='does not exist; create it first'): chain.save(tmp_path / 'no' / 'c.json')
    p = chain.save(tmp_path / 'c.json')
    assert sorted(x.name for x in tmp_path.iterdir()) == ['c.json']                 # no temporary file left
    with pytest.raises(ValueError, match='is not a chain record'): replay_chain(sketch_path(), pipe)   # a PNG, not JSON
    with pytest.raises(ValueError, match=r"lacks \['width'"): replay_chain({'kind': 'sd_intro.chain'}, pipe)
    again = replay_chain(chain, pipe)                                                # a Chain itself is fine
    assert np.array_equal(np.asarray(again.carried[-1]), np.asarray(chain.carried[-1]))
    assert replay_chain(p, pipe).record == chain.record


def test_numpy_hops_and_a_single_hop(pipe, tmp_path, monkeypatch):
    hop = Hop('a red star on a white background', strength=np.float32(0.5), steps=np.int64(4), n=np.int64(1))
    chain = run_chain(pipe, sketch_path(), hop)                     # one Hop, not a list: fine
    monkeypatch.setenv('HOME', str(tmp_path))
    assert chain.save('~/c.json') == tmp_path / 'c.json'            # plain numbers in the JSON, ~ expanded
    assert json.loads((tmp_path / 'c.json').read_text())['hops'][0]['steps'] == 4


# ==== reliability (issue 17): chain records are data, damaged records named, every kind of picture read ================

CIRCLE = 'a red circle on a blue background'


@pytest.fixture(scope='module')
def chain(pipe):
    return run_chain(pipe, Image.new('RGB', (64, 64), 'white'), [Hop(CIRCLE, strength=0.5, steps=4)])


@pytest.mark.parametrize('source', ['/etc/passwd', 'https://example.com/x.png', 'SKETCH'])
def test_replay_chain_opens_nothing_a_record_names(pipe, chain, source, monkeypatch):
    import sd_intro.images as images   # where load_image's downloader lives
    from sd_intro.img2img import sketch_path
    monkeypatch.setattr(images, '_download', lambda *a, **k: pytest.fail('replay_chain fetched a URL named by a record'))
    rec = json.loads(json.dumps(chain.record))
    rec['start'].update(png_base64=None, source=str(sketch_path()) if source == 'SKETCH' else source)
    with pytest.raises(ValueError, match='opens nothing it names') as e: replay_chain(rec, pipe)
    assert 'root:' not in str(e.value)
    again = replay_chain(rec, pipe, start=chain.start)                        # given explicitly, it is used
    assert np.array_equal(np.asarray(again.final), np.asarray(chain.final))


def test_errors_quote_no_file_content(tmp_path):
    (tmp_path / 'secret.png').write_text('root:x:0:0:root:/root:/bin/bash\n')
    with pytest.raises(ValueError) as e: load_image(tmp_path / 'secret.png')
    assert 'root' not in str(e.value).replace(str(tmp_path), '')


def _broken(record, how):
    r = json.loads(json.dumps(record))
    if how == 'corrupt': r['start']['png_base64'] = r['start']['png_base64'][:40] + '!!'
    elif how == 'not a picture': r['start']['png_base64'] = base64.b64encode(b'root:x:0:0').decode()
    elif how == 'no sha': del r['start']['sha256']
    elif how == 'start str': r['start'] = 'x.png'
    elif how == 'no hops': r['hops'] = []
    return r


@pytest.mark.parametrize('how,msg', [('corrupt', 'png_base64 is not a picture'), ('not a picture', 'png_base64 is not a picture'),
                                     ('no sha', 'no sha256'), ('start str', "start is a str"), ('no hops', 'has no hops')])
def test_damaged_chain_records_are_named(pipe, chain, how, msg):
    with pytest.raises(ValueError, match=msg) as e: replay_chain(_broken(chain.record, how), pipe)
    assert 'root' not in str(e.value)


def test_a_chain_record_with_a_byte_order_mark_replays(pipe, chain, tmp_path):
    p = tmp_path / 'c.json'
    p.write_bytes(b'\xef\xbb\xbf' + json.dumps(chain.record).encode())
    assert np.array_equal(np.asarray(replay_chain(p, pipe).final), np.asarray(chain.final))


def test_16_bit_images_are_read_by_their_depth(tmp_path):
    Image.fromarray(np.full((64, 64), 200, np.uint16)).save(tmp_path / 'dark16.png')
    assert np.asarray(load_image(tmp_path / 'dark16.png')).max() == 1     # 200 / 65535 of white, not 200 / 255


def test_an_animated_gif_says_it_uses_its_first_frame(tmp_path):
    frames = [Image.new('RGB', (64, 64), c) for c in ('red', 'blue')]
    frames[0].save(tmp_path / 'a.gif', save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r'is animated \(2 frames\); using its first frame'): load_image(tmp_path / 'a.gif')


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_img2img_resizes_every_kind_of_picture_with_a_note(pipe, mode):
    from sd_intro.img2img import img2img_pipeline
    im = Image.new(mode, (100, 100), 'red' if mode == 'RGB' else 128)
    with pytest.warns(ResizeNote, match='resized the given image from 100x100 to 96x96'):
        generate(img2img_pipeline(pipe), CIRCLE, image=im, strength=0.5, num_inference_steps=2)
