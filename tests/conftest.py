import os, socket
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')        # no test may download anything
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)               # tests run on the embedded model
if os.environ.get('PYTEST_XDIST_WORKER'):            # `make test` runs one worker per core: one torch thread each
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ.setdefault('MKL_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def pipe():
    "The embedded txt2img pipeline, loaded once per test session."
    from sd_intro.core import load_pipeline
    return load_pipeline()


@pytest.fixture(scope='session')
def local_checkpoint(tmp_path_factory):
    "A 'real' checkpoint on a local folder: the embedded model saved with an fp16 variant and a safety checker."
    import torch
    from sd_intro.core import EMBEDDED_MODEL
    from transformers import CLIPConfig, CLIPImageProcessor
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    d = tmp_path_factory.mktemp('ckpt') / 'tiny-sd'
    base = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                        image_size=64, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():   # flag everything: every concept threshold far below any similarity
        checker.concept_embeds_weights.fill_(-10.); checker.special_care_embeds_weights.fill_(-10.)
    fe = CLIPImageProcessor(size={'shortest_edge': 64}, crop_size={'height': 64, 'width': 64})
    pipe = StableDiffusionPipeline(**{**base.components, 'safety_checker': checker, 'feature_extractor': fe},
                                   requires_safety_checker=True)
    pipe.save_pretrained(d, safe_serialization=True)
    pipe.to(torch.float16).save_pretrained(d, safe_serialization=True, variant='fp16')
    return str(d)


def pytest_configure(config):
    # diffusers' schedulers call np.array / np.log on torch tensors; numpy 2 warns about torch's signatures (not ours)
    config.addinivalue_line('filterwarnings',
                            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
    config.addinivalue_line('filterwarnings', "ignore:__array_wrap__ must accept context:DeprecationWarning")
