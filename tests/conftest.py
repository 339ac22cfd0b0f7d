import os, socket
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')        # no test may download anything
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)               # tests run on the embedded model


@pytest.fixture(scope='session')
def pipe():
    "The embedded txt2img pipeline, loaded once per test session."
    from sd_intro.core import load_pipeline
    return load_pipeline()
