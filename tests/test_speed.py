"Speed module: the shipped SD 1.5 configs, FLOP counting, fair timing, MFU, the fast path, and the GPU bench's smoke mode."
import copy, json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from sd_intro.core import generate
from sd_intro.speed import (SD15_CONFIGS, sd15_config, full_size_pipeline, count_flops, pipeline_flops, unet_calls,
                            interleaved_times, median_ratio, markdown_table, peak_tflops, mfu, make_fast)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'a red circle on a blue background'


def pixels(pipe, steps=6):
    return np.asarray(generate(pipe, PROMPT, seed=[3, 4], num_inference_steps=steps).grid(), dtype=int)


@pytest.fixture(scope='module')
def big():
    return full_size_pipeline('meta')


@pytest.fixture(scope='module')
def plain_pixels(pipe):
    return pixels(pipe)


def test_configs_ship_in_the_package():
    assert SD15_CONFIGS.is_dir() and SD15_CONFIGS.parent.parent.name == 'sd_intro'
    for part, name in [('unet', 'config.json'), ('vae', 'config.json'), ('text_encoder', 'config.json'),
                       ('scheduler', 'scheduler_config.json')]:
        assert (SD15_CONFIGS / part / name).is_file()
    te = sd15_config('text_encoder')
    assert (te['hidden_size'], te['num_hidden_layers'], te['num_attention_heads'], te['intermediate_size'],
            te['vocab_size'], te['max_position_embeddings']) == (768, 12, 12, 3072, 49408, 77)
    assert sd15_config('unet')['cross_attention_dim'] == 768
    with pytest.raises(ValueError, match="part='clip' is not one of"): sd15_config('clip')


def test_full_size_pipeline_has_the_real_shapes(big):
    from diffusers import StableDiffusionPipeline
    assert isinstance(big, StableDiffusionPipeline)
    counts = {k: sum(p.numel() for p in getattr(big, k).parameters()) for k in ('unet', 'vae', 'text_encoder')}
    assert counts == dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480)
    assert big.unet.device.type == 'meta' and big.vae_scale_factor == 8
    ids = big.tokenizer(['a red circle', ''], padding='max_length', max_length=big.tokenizer.model_max_length).input_ids
    assert len(ids[0]) == 77 and max(max(i) for i in ids) < big.text_encoder.config.vocab_size


def test_full_size_pipeline_bad_inputs():
    with pytest.raises(ValueError, match='dtype=float16 on device'): full_size_pipeline('cpu', 'float16')
    with pytest.raises(ValueError, match="dtype='int4' is not one of"): full_size_pipeline('meta', 'int4')
    assert full_size_pipeline('meta', torch.float16).unet.dtype == torch.float16  # any dtype on meta: nothing runs


def test_full_size_pipeline_leaves_the_global_rng_alone():
    torch.manual_seed(123); a = torch.rand(3)
    torch.manual_seed(123); full_size_pipeline('meta'); b = torch.rand(3)
    assert torch.equal(a, b)


def test_flops_of_sd15_match_the_published_figures(big):
    f = pipeline_flops(big, 512, 512, batch=1, steps=50)
    assert abs(f['unet_step'] / 1e12 - 1.61) < 0.01      # one UNet step with guidance: batch 2, 64x64 latents, 77 tokens
    assert abs(f['vae_decode'] / 1e12 - 2.51) < 0.01     # VAE decode at 512 px
    assert f['unet_calls'] == unet_calls(big, 50) == 51  # PNDM makes one call more than it has steps
    assert f['total'] == f['text_encoder'] + f['unet_step'] * 51 + f['vae_decode']
    f8 = pipeline_flops(big, 512, 512, batch=8, steps=50, guidance=False)
    assert abs(f8['unet_step'] / (f['unet_step'] * 4) - 1) < 0.01   # 8 images without guidance = 4x a guided one


def test_flops_of_a_loaded_pipeline_use_a_weightless_copy(pipe):
    f = pipeline_flops(pipe, steps=30)
    assert (f['height'], f['width'], f['unet_calls']) == (64, 64, 30) and f['total'] > 0
    assert pipe.unet.device.type == 'cpu'      # the pipeline itself is untouched
    with pytest.raises(ValueError, match='multiples of 8'): pipeline_flops(pipe, 60, 64)
    with pytest.raises(ValueError, match='must be at least 1'): pipeline_flops(pipe, steps=0)


def test_count_flops_counts_matmuls():
    lin = torch.nn.Linear(32, 10)
    assert count_flops(lin, torch.randn(5, 32)) == 2 * 5 * 32 * 10


def test_interleaved_times_alternate_and_validate():
    seen = []
    ts = interleaved_times({'a': lambda: seen.append('a'), 'b': lambda: seen.append('b')}, repeats=2, warmup=0)
    assert seen == ['a', 'b', 'b', 'a'] and all(len(v) == 2 for v in ts.values())
    assert median_ratio({'x': [3.0], 'y': [1.5]}, 'x', 'y') == 2.0
    with pytest.raises(ValueError, match='fns is empty'): interleaved_times({})
    with pytest.raises(ValueError, match='need repeats >= 1'): interleaved_times({'a': int}, repeats=0)


def test_markdown_table():
    assert markdown_table([]) == ''
    assert markdown_table([dict(x=1.23456, y='a')]).splitlines()[-1] == '| 1.23 | a |'


def test_peak_and_mfu():
    assert peak_tflops('NVIDIA H100 80GB HBM3') == 989.4
    assert peak_tflops('NVIDIA H100 NVL') == 835.0
    assert peak_tflops('NVIDIA A100-SXM4-80GB') == 312.0
    assert peak_tflops('NVIDIA L40S') == 362.0 and peak_tflops('NVIDIA L4') == 121.0
    assert peak_tflops('Imaginary GPU') is None
    assert mfu(100e12, 1.0, 200.0) == 0.5 and mfu(1e12, 1.0, None) is None
    with pytest.raises(ValueError, match='must be positive'): mfu(1e12, 1.0, 0)


def test_make_fast_keeps_pixels_on_cpu(pipe, plain_pixels):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    fast = copy.deepcopy(pipe)
    fast.unet.set_attn_processor(AttnProcessor())
    assert make_fast(fast) is fast
    info = fast.sd_intro_fast
    assert info['sdpa'].endswith('classic processors replaced') and info['channels_last'] and info['dtype'] == 'float32'
    assert info['compile'].startswith('skipped: not on CUDA')
    assert all(type(p) is AttnProcessor2_0 for p in fast.unet.attn_processors.values())
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(pixels(fast) - plain_pixels).max() <= 2
    assert make_fast(fast, channels_last=False) is fast and fast.sd_intro_fast is info   # applied once only
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the original is untouched


def test_make_fast_fused_qkv_keeps_pixels(pipe, plain_pixels):
    fast = make_fast(copy.deepcopy(pipe), fuse_qkv=True, channels_last=False)
    assert fast.sd_intro_fast['fuse_qkv']
    assert np.abs(pixels(fast) - plain_pixels).max() <= 2


def test_make_fast_compile_traces_whole_graphs(pipe, plain_pixels):
    "The eager backend runs dynamo's capture (fullgraph: no graph breaks) without inductor's slow code generation."
    fast = make_fast(copy.deepcopy(pipe), compile='always', backend='eager')
    assert fast.sd_intro_fast['compile'].startswith('unet + vae decoder (eager')
    assert np.abs(pixels(fast) - plain_pixels).max() <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on a CPU inductor generates code for minutes (2 cores) "
                    "and gains little; dynamo's graph capture is checked everywhere by test_make_fast_compile_traces_whole_graphs")
def test_make_fast_inductor_on_cuda():
    "The fast path as a GPU runs it (float16, inductor with CUDA graphs) draws the pictures of the same pipeline uncompiled."
    from sd_intro.core import load_pipeline
    gpu = load_pipeline(device='cuda')
    eager = pixels(make_fast(copy.deepcopy(gpu), compile=False))
    fast = make_fast(copy.deepcopy(gpu))
    assert fast.sd_intro_fast['dtype'] == 'float16' and fast.sd_intro_fast['compile'] == 'unet + vae decoder (inductor, mode=reduce-overhead)'
    assert np.abs(pixels(fast) - eager).max() <= 2   # bench/bench_gpu.py measured at most 1 on SD 1.5 (H200)


def test_make_fast_bad_inputs(pipe):
    with pytest.raises(TypeError, match='expected a Stable Diffusion pipeline'): make_fast('not a pipe')
    with pytest.raises(ValueError, match="compile='cuda': use True"): make_fast(pipe, compile='cuda')
    with pytest.raises(ValueError, match="mode='turbo' is not a torch.compile mode"): make_fast(pipe, mode='turbo')


def test_bench_gpu_smoke(tmp_path, monkeypatch, capsys):
    "bench/bench_gpu.py --smoke, its main run in this process (as test_playground_gpu_script_smoke runs its script's)."
    import runpy
    out = tmp_path / 'gpu.json'
    monkeypatch.syspath_prepend(str(ROOT / 'bench'))   # (its `provenance` helper, as `python bench/bench_gpu.py` finds it)
    code = runpy.run_path(str(ROOT / 'bench' / 'bench_gpu.py'))['main'](['--smoke', '--peak-tflops', '1', '--json', str(out)])
    r = capsys.readouterr()
    assert code == 0, r.out[-2000:] + r.err[-4000:]
    res = json.loads(out.read_text())
    assert [(row['config'], row['batch']) for row in res['rows']] == [('plain', 1), ('plain', 2), ('fast', 1), ('fast', 2)]
    assert all(row['median_s'] > 0 and row['mfu'] > 0 for row in res['rows'])
    assert all(row['max_dpx'] <= 2 for row in res['rows'] if row['config'] == 'fast')
    assert res['env']['torch'] == torch.__version__ and res['fast']['compile'].startswith('skipped')
    assert '| config | batch |' in r.out


def test_playground_gpu_script_smoke():
    "bench/playground_gpu.py (the playground at full size on a GPU) runs its checks; here on the CPU's embedded model."
    import runpy, sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'bench' / 'playground_gpu.py'
    assert runpy.run_path(str(script))['main'](['--smoke']) == 0
