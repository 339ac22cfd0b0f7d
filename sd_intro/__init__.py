__version__ = "0.1.0"
"sd_intro: a Stable Diffusion introduction course and its helpers. The public names load lazily (torch is heavy)."

_PUBLIC = {'load_pipeline': 'loading', 'EMBEDDED_MODEL': 'loading', 'image_grid': 'images', 'generate': 'core',
           'save_image': 'records', 'read_settings': 'records', 'replay': 'core', 'Generation': 'records',
           'guidance_sweep': 'guidance', 'load_image': 'images', 'judge': 'shapes', 'playground': 'widgets'}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f'{__name__}.{_PUBLIC[name]}'), name)
    raise AttributeError(f"module 'sd_intro' has no attribute {name!r}")


def __dir__(): return sorted(list(globals()) + __all__)
