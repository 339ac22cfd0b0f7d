__version__ = "0.1.0"
"sd_intro: a Stable Diffusion introduction course and its helpers. The public names load lazily (torch is heavy)."

_PUBLIC = {'load_pipeline': 'core', 'EMBEDDED_MODEL': 'core', 'image_grid': 'core', 'generate': 'core',
           'save_image': 'core', 'read_settings': 'core', 'replay': 'core', 'Generation': 'core',
           'guidance_sweep': 'guidance', 'load_image': 'img2img', 'judge': 'shapes', 'playground': 'widgets'}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f'{__name__}.{_PUBLIC[name]}'), name)
    raise AttributeError(f"module 'sd_intro' has no attribute {name!r}")


def __dir__(): return sorted(list(globals()) + __all__)
