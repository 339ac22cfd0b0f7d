"""ControlNet: telling the model where, with a picture a student can draw, trained on the shapes world in minutes on a CPU"""

# %% ../nbs/08_controlnet.ipynb #imports
from __future__ import annotations
import argparse, contextlib, dataclasses, hashlib, json, math, os, random, re, shutil, sys, time, warnings
from dataclasses import dataclass, asdict, replace
from pathlib import Path
from typing import Any, Sequence
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import save_file, load_file
import sd_intro
from .core import load_pipeline, generate, image_grid, resolve_model, atomic_dir, atomic_file, pipe_defaults
from .shapes import BASE_SHAPES, COLOURS, SIZE, Scene, random_scene, render, caption, to_pil, object_mask, judge
from .embedded import diffusion_loss
from .finetune import save_checkpoint, load_checkpoint, checkpoints, run_lock, vae_latents, model_fingerprint

# %% ../nbs/08_controlnet.ipynb #controls
CONTROL_KINDS = ('silhouette', 'outline', 'scribble')

def silhouette(scene: Scene, size: int = SIZE) -> Image.Image:
    "The object of `scene` filled white on black: the control a student draws by colouring the shape in."
    return to_pil(render(replace(scene, colour='white', background='black', style='flat'), size))

def outline(scene: Scene, size: int = SIZE) -> Image.Image:
    "The object's outline, white on black, as the shapes world draws an outlined shape."
    return to_pil(render(replace(scene, colour='white', background='black', style='outlined'), size))

def scribble(scene: Scene,         # what to draw
             seed: int = 0,        # which wobbles and pen width
             size: int = SIZE,     # width and height in pixels
             wobble: float = 0.03, # how far the hand strays, as a fraction of the width
             strokes: int = 2      # times the pen goes round
            ) -> Image.Image:
    "A hand-drawn-looking outline of the object, white on black: its edge bent by slow random waves, drawn `strokes` times."
    g, big = torch.Generator().manual_seed(seed), 2 * size
    m = torch.from_numpy(np.asarray(silhouette(scene, big))[..., 0] >= 128).float()[None, None]
    pen = int(torch.randint(1, 4, (1,), generator=g))  # 0.5 to 1.5 pixels at `size`
    edge = (F.max_pool2d(m, 2 * pen + 1, 1, pen) - m).clamp(0, 1)   # a band of `pen` pixels just outside the edge
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, big), torch.linspace(-1, 1, big), indexing='ij')
    grid, out = torch.stack([xs, ys], -1)[None], torch.zeros_like(edge)
    for _ in range(strokes):
        waves = torch.randn(1, 2, 4, 4, generator=g) * 2 * wobble
        flow = F.interpolate(waves, size=(big, big), mode='bicubic', align_corners=True).permute(0, 2, 3, 1)
        out = torch.maximum(out, F.grid_sample(edge, grid + flow, mode='bilinear', padding_mode='zeros', align_corners=True))
    small = F.avg_pool2d(out, 2)[0, 0]
    arr = (small.clamp(0, 1) * 255).round().byte().numpy()
    return Image.fromarray(np.stack([arr] * 3, -1), 'RGB')

def control_image(scene: Scene, kind: str = 'silhouette', seed: int = 0, size: int = SIZE) -> Image.Image:
    "The control picture of `scene` of one of `CONTROL_KINDS`."
    if kind == 'silhouette': return silhouette(scene, size)
    if kind == 'outline': return outline(scene, size)
    if kind == 'scribble': return scribble(scene, seed, size)
    raise ValueError(f"kind={kind!r} is not one of {list(CONTROL_KINDS)}")

# %% ../nbs/08_controlnet.ipynb #mask
def control_mask(control: Image.Image) -> np.ndarray:
    "The region a control asks for, as a boolean H x W mask: its white part with the holes filled (an outline's inside)."
    from scipy import ndimage
    a = np.asarray(control.convert('L')) >= 128
    return ndimage.binary_fill_holes(ndimage.binary_closing(a, iterations=2) | a)

# %% ../nbs/08_controlnet.ipynb #drawing
def from_drawing(drawing,               # a PIL image or path: dark lines on light paper, or light on dark
                 size: int = SIZE       # the control's width and height (the model's picture size)
                ) -> Image.Image:
    "A control picture from a student's drawing: grey, made white-on-black if it is dark-on-light, resized to `size`."
    img = Image.open(drawing) if isinstance(drawing, (str, os.PathLike)) else drawing
    if not isinstance(img, Image.Image): raise TypeError(f"drawing is a {type(img).__name__}; pass a PIL image or a path")
    grey = img.convert('L')
    if np.asarray(grey).mean() > 127: grey = ImageOps.invert(grey)   # paper is the larger part: make it black
    grey = grey.resize((size, size), Image.BOX if grey.width > size else Image.BILINEAR)
    return grey.convert('RGB')

# %% ../nbs/08_controlnet.ipynb #model
CONDITIONING_CHANNELS = (16, 32, 64, 64)   # three stride-2 convolutions: 64 px controls down to the 8x8 latents

def make_controlnet(unet,                  # the UNet to copy (a `UNet2DConditionModel`)
                    conditioning_embedding_out_channels: Sequence[int] = CONDITIONING_CHANNELS, # the control's encoder; len - 1 halvings
                    seed: int = 0          # seeds the control encoder's random first layers
                   ):
    "A ControlNet copied from `unet` (`ControlNetModel.from_unet`): its encoder's weights, zero convolutions on every output."
    from diffusers import ControlNetModel
    scale = 2 ** (len(conditioning_embedding_out_channels) - 1)
    vae_scale = 2 ** 3
    if scale != vae_scale: raise ValueError(
        f"conditioning_embedding_out_channels={tuple(conditioning_embedding_out_channels)} halves the control "
        f"{len(conditioning_embedding_out_channels) - 1} times ({scale}x), but the latents are {vae_scale}x smaller than "
        f"the picture: give 4 channel counts, e.g. {CONDITIONING_CHANNELS}")
    with torch.random.fork_rng(devices=[]):   # the same ControlNet for the same seed; the global generator untouched
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
    heads = unet.config.get('addition_embed_type_num_heads')
    if cn.config.get('addition_embed_type') and heads and cn.config.addition_embed_type_num_heads != heads:
        # from_unet does not copy the text-pooling heads of a UNet with addition_embed_type='text' (as the embedded
        # model's): rebuild with the UNet's count, same weights (the heads only split the same matrices differently)
        fixed = ControlNetModel.from_config({**cn.config, 'addition_embed_type_num_heads': heads})
        fixed.load_state_dict(cn.state_dict())
        cn = fixed
    return cn

# %% ../nbs/08_controlnet.ipynb #controlled
class ControlledUNet(torch.nn.Module):
    "A UNet steered by a ControlNet, called as the UNet is: `(noisy_latents, t, text_states).sample`."
    def __init__(self, unet, controlnet, control: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.control, self.scale = unet, controlnet, control, scale
    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=self.control,
                                    conditioning_scale=self.scale, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **kwargs)

# %% ../nbs/08_controlnet.ipynb #batch
def _seed(*parts) -> int:
    "A 63-bit seed from any parts (the same parts, the same seed, on every machine)."
    return int.from_bytes(hashlib.sha256(':'.join(map(str, parts)).encode()).digest()[:8], 'little') >> 1

def control_batch(step: int,               # which batch (counting from 0)
                  batch_size: int,         # examples per batch
                  seed: int = 0,           # the run's seed
                  kinds: Sequence[str] = CONTROL_KINDS, # control kinds, drawn equally often
                  shapes: Sequence[str] = BASE_SHAPES,  # shapes to draw from
                  rank: int = 0            # this process (of a multi-GPU run)
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    "Pictures (B x 3 x 64 x 64 in [-1, 1]), their controls (B x 3 x 64 x 64 in [0, 1]) and captions of batch `step`: the same for the same seed and step, always."
    rng = random.Random(_seed('controlnet', seed, step, rank))
    pix, ctl, caps = [], [], []
    for _ in range(batch_size):
        scene = random_scene(rng, shapes=tuple(shapes))
        c = control_image(scene, rng.choice(list(kinds)), seed=rng.randrange(2 ** 31))
        pix.append(torch.from_numpy(render(scene).astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
        ctl.append(torch.from_numpy(np.asarray(c, np.float32) / 255).permute(2, 0, 1))
        caps.append(caption(scene, rng))
    return torch.stack(pix), torch.stack(ctl), caps

# %% ../nbs/08_controlnet.ipynb #pipeline
CONTROLNET_MODEL = str(Path(sd_intro.__file__).parent / 'models' / 'shapes-controlnet')
CONTROLNET_NAME = 'shapes-controlnet'   # what records say for the shipped ControlNet: the same on every machine
PIPELINE_CLASSES = {'txt2img': 'StableDiffusionControlNetPipeline', 'img2img': 'StableDiffusionControlNetImg2ImgPipeline',
                    'inpaint': 'StableDiffusionControlNetInpaintPipeline'}

def load_controlnet(path: str | os.PathLike | None = None, # a folder written by `save_pretrained`, or a Hub id (default: the shipped one)
                    **kwargs                               # passed to `ControlNetModel.from_pretrained`
                   ):
    "A `ControlNetModel` from a folder or Hub id (default: the shipped shapes-world one), in safetensors only."
    from diffusers import ControlNetModel
    path = str(Path(path).expanduser()) if path is not None else CONTROLNET_MODEL
    if not Path(path).exists() and (Path(path).is_absolute() or path.startswith('.') or path.count('/') != 1):
        raise FileNotFoundError(f"controlnet={path!r}: no such folder; pass a folder written by save_pretrained (a "
                                f"training run's out/controlnet), a Hub id, or None for the shipped one")
    if Path(path).is_dir() and not (Path(path) / 'config.json').is_file(): raise ValueError(
        f"controlnet={path!r} has no config.json: it is not a ControlNet saved with save_pretrained (a training run "
        f"keeps its result in out/controlnet)")
    cn = ControlNetModel.from_pretrained(path, use_safetensors=True, **kwargs)
    cn.sd_intro_model = CONTROLNET_NAME if Path(path).resolve() == Path(CONTROLNET_MODEL).resolve() else path
    return cn

def controlnet_pipeline(pipe,                  # a loaded pipeline of the base model (its parts are shared)
                        controlnet=None,       # a `ControlNetModel`, a folder or Hub id (default: the shipped one)
                        kind: str = 'txt2img'  # 'txt2img', 'img2img' or 'inpaint'
                       ):
    "`pipe`'s parts with `controlnet` as one of diffusers' ControlNet pipelines (txt2img, img2img or inpainting)."
    import diffusers, inspect
    if kind not in PIPELINE_CLASSES: raise ValueError(f"kind={kind!r} is not one of {list(PIPELINE_CLASSES)}")
    if not hasattr(pipe, 'components'): raise TypeError(f"pipe is a {type(pipe).__name__}; pass a loaded pipeline (load_pipeline())")
    if controlnet is None or isinstance(controlnet, (str, os.PathLike)): controlnet = load_controlnet(controlnet)
    unet = pipe.unet
    if controlnet.config.block_out_channels != unet.config.block_out_channels or \
            controlnet.config.cross_attention_dim != unet.config.cross_attention_dim: raise ValueError(
        f"this ControlNet was made for another UNet (blocks {list(controlnet.config.block_out_channels)}, text width "
        f"{controlnet.config.cross_attention_dim}; the pipeline's: {list(unet.config.block_out_channels)}, "
        f"{unet.config.cross_attention_dim}): use a ControlNet trained for this model")
    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in pipe.components.items() if k in params and k != 'controlnet'}
    kw['requires_safety_checker'] = bool(pipe.config.get('requires_safety_checker', False)) and kw.get('safety_checker') is not None
    p = cls(controlnet=controlnet, **kw)
    p.sd_intro_model = pipe_defaults(pipe)['model']
    p.set_progress_bar_config(**getattr(pipe, '_progress_bar_config', {}))
    return p

# %% ../nbs/08_controlnet.ipynb #config
@dataclass
class ControlNetConfig:
    "Every setting of a ControlNet training run (the command line has one flag per field)."
    steps: int = 2000               # optimiser steps of the whole run
    batch_size: int = 16            # pictures per step and process
    lr: float = 1e-3                # peak learning rate (the small model takes a large one; SD 1.5's ControlNets use 1e-5)
    warmup_steps: int = 100         # steps of linear warm-up
    weight_decay: float = 1e-2      # AdamW's weight decay
    max_grad_norm: float = 1.0      # gradient clipping (0 turns it off)
    snr_gamma: float | None = 5.0   # min-SNR weighting of the loss, as the embedded model was trained (None: plain MSE)
    kinds: tuple = CONTROL_KINDS    # control kinds, drawn equally often
    conditioning_channels: tuple = CONDITIONING_CHANNELS # the control encoder's channels (len - 1 halvings: 8x for the embedded model)
    seed: int = 0                   # decides the pictures, controls, captions, noise and timesteps of every step
    checkpoint_every: int | None = 100 # write a checkpoint, a snapshot of the weights and the validation strip every this many steps
    keep_checkpoints: int = 2       # how many recent checkpoints to keep (snapshots are all kept: they are small)
    validation_images: int = 8      # held-out controls rendered (and their IoU measured) at each checkpoint; 0: none
    validation_steps: int = 20      # sampler steps of the validation images
    resume: bool = False            # continue from the latest checkpoint in `out`
    overwrite: bool = False         # start afresh even though `out` holds an earlier run (only what a run wrote is removed)
    stop_at: int | None = None      # stop (with a checkpoint) after this step, to resume later
    progress: bool = True           # show a tqdm progress bar with the loss

    def __post_init__(self):
        whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        real = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        def need(ok, k, what):
            if not ok: raise ValueError(f"{k}={getattr(self, k)!r}: {what}")
        for k in ('steps', 'batch_size', 'keep_checkpoints', 'validation_steps'):
            need(whole(getattr(self, k)) and getattr(self, k) >= 1, k, "use a whole number of at least 1")
        for k in ('warmup_steps', 'seed', 'validation_images'):
            need(whole(getattr(self, k)) and getattr(self, k) >= 0, k, "use a whole number, 0 or more")
        for k in ('checkpoint_every', 'stop_at'):
            need(getattr(self, k) is None or whole(getattr(self, k)) and getattr(self, k) >= 1, k, "use a whole number of at least 1, or None")
        need(real(self.lr) and self.lr > 0, 'lr', "use a positive number, e.g. 1e-3")
        for k in ('weight_decay', 'max_grad_norm'): need(real(getattr(self, k)) and getattr(self, k) >= 0, k, "use 0 or more")
        need(self.snr_gamma is None or real(self.snr_gamma) and self.snr_gamma > 0, 'snr_gamma', "use a positive number (5 is usual), or None")
        if isinstance(self.kinds, str): self.kinds = (self.kinds,)
        self.kinds = tuple(self.kinds)
        need(self.kinds and all(k in CONTROL_KINDS for k in self.kinds), 'kinds', f"use some of {list(CONTROL_KINDS)}")
        self.conditioning_channels = tuple(int(c) for c in self.conditioning_channels)
        need(len(self.conditioning_channels) == 4 and all(c >= 1 for c in self.conditioning_channels), 'conditioning_channels',
             f"give 4 channel counts (three halvings: 64 px controls to 8x8 latents), e.g. {CONDITIONING_CHANNELS}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps: raise ValueError(f"stop_at={self.stop_at}: between 1 and steps={self.steps}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.integer): setattr(self, f.name, int(v))
            elif isinstance(v, np.floating): setattr(self, f.name, float(v))

    @classmethod
    def make(cls, config=None, **kwargs) -> ControlNetConfig:
        "A config from another (or a dict) with some fields changed; unknown names are an error that lists the known ones."
        base = asdict(config) if isinstance(config, ControlNetConfig) else dict(config or {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(base) - known | set(kwargs) - known)
        if bad: raise TypeError(f"unknown ControlNet training settings {bad}; the settings are {sorted(known)}")
        return cls(**{**base, **kwargs})

# These must be the same to resume a run (the others, like stop_at or checkpoint_every, may change).
RUN_FIELDS = ('steps', 'batch_size', 'lr', 'warmup_steps', 'weight_decay', 'max_grad_norm', 'snr_gamma', 'kinds',
              'conditioning_channels', 'seed', 'validation_images', 'validation_steps')

# %% ../nbs/08_controlnet.ipynb #heldout
def shape_prompt(scene: Scene) -> str:
    "The full prompt of `scene`'s colours and shape: 'a red circle on a blue background'."
    return f"a {scene.colour} {scene.shape} on a {scene.background} background".replace('a orange', 'an orange')

def heldout_controls(n: int = 32,             # how many
                     kind: str = 'silhouette', # control kind
                     seed: int = 0            # which ones (never a training batch: another stream of scenes)
                    ) -> tuple[list[Scene], list[Image.Image], list[str]]:
    "`n` scenes no training run draws, their controls and prompts: the test set of the measurements."
    rng = random.Random(_seed('heldout', seed))
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, [control_image(s, kind, seed=rng.randrange(2 ** 31)) for s in scenes], [shape_prompt(s) for s in scenes]

def control_iou(images,      # generated pictures
                controls,    # the control of each (or one for all)
                prompts      # the prompt of each: its colour and background find the object
               ) -> list[float]:
    "IoU of each picture's object (its pixels nearer the prompt's colour than the background's) with the region its control asks for."
    from sd_intro.shapes import parse_caption
    images = list(images)
    controls = list(controls) if isinstance(controls, (list, tuple)) else [controls] * len(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if not len(images) == len(controls) == len(prompts): raise ValueError(
        f"control_iou: {len(images)} images, {len(controls)} controls and {len(prompts)} prompts; pass one of each per image")
    out = []
    for img, c, p in zip(images, controls, prompts):
        words = parse_caption(p)
        m, want = object_mask(img, words['colour'], words['background']), control_mask(c)
        out.append(float((m & want).sum() / max((m | want).sum(), 1)))
    return out

# %% ../nbs/08_controlnet.ipynb #state
def _digest(state: dict, weights: dict) -> str:
    "A hash of a checkpoint's state (step, losses, history, settings) and weights: an edited or swapped file no longer matches."
    h = hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != 'digest'}, sort_keys=True).encode())
    for k in sorted(weights): h.update(k.encode()); h.update(weights[k].numpy().tobytes())
    return h.hexdigest()[:16]

def resumable_checkpoint(out: str | os.PathLike) -> tuple[Path, tuple] | None:
    "(folder, (state, weights, optimizer state)) of the newest checkpoint of `out` that loads and is as the run wrote it; each newer bad one is named in a warning."
    bad = []
    for ck in checkpoints(out):
        try:
            state, weights, _, opt = load_checkpoint(ck)
            if state.get('digest') != _digest(state, weights): raise ValueError(
                f"checkpoint {ck}: state.json or trainable.safetensors is not as the run wrote it (edited, or from "
                f"another checkpoint)")
            if state['step'] != int(ck.name[5:]): raise ValueError(f"checkpoint {ck}: its state.json says step {state['step']}")
        except ValueError as e: bad.append(str(e)); continue
        if bad: warnings.warn(f"{'; '.join(bad)}. Resuming from the previous good one, {ck.name}, instead (delete the "
                              f"bad folder to silence this)")
        return ck, (state, weights, opt)
    if bad: raise ValueError(f"{'; '.join(bad)}. No checkpoint in {out} can be resumed: pass overwrite=True to start afresh")
    return None

# %% ../nbs/08_controlnet.ipynb #clear
RESULT_FILES = ('config.json', 'diffusion_pytorch_model.safetensors')

def clear_run(out: str | os.PathLike):
    "Remove what a ControlNet run wrote in `out` (checkpoints, snapshots, validation images, history, result) and nothing else."
    out = Path(out)
    res = out / 'controlnet'
    if res.is_dir():
        other = sorted(p.name for p in res.iterdir() if p.name not in RESULT_FILES)
        if other: raise FileExistsError(f"{res} holds files a run does not write ({other[:3]}): move them away, or choose another out folder")
        shutil.rmtree(res)
    for sub, pat in (('checkpoints', r'(\.tmp-)?step-\d+(-\d+)?'), ('snapshots', r'step-\d+\.safetensors'),
                     ('validation', r'step-\d+\.png')):
        for p in (out / sub).glob('*'):
            if re.fullmatch(pat, p.name): shutil.rmtree(p) if p.is_dir() else p.unlink()
        with contextlib.suppress(OSError): (out / sub).rmdir()   # kept if the user put something of their own there
    for f in ('validation.png', 'history.json', 'run.json'): (out / f).unlink(missing_ok=True)

# %% ../nbs/08_controlnet.ipynb #result
@dataclass
class ControlNetResult:
    "What a ControlNet training run made: the ControlNet, its losses, validation IoU by step, and where it was saved."
    controlnet: Any                # the trained ControlNetModel
    losses: list                   # the loss of every step, resumed runs included
    history: dict                  # step -> mean IoU of the validation controls (0 = before training)
    config: ControlNetConfig
    out: Path                      # the run folder
    saved: Path | None = None      # out/controlnet, once the run is complete
    seconds: float = 0.0           # time spent training in this call
    step: int = 0                  # steps done
    main_process: bool = True      # False in the other processes of a multi-GPU run

def _accelerator():
    "An `Accelerator` (accelerate's process-wide state made afresh if a notebook made one with other settings)."
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    try: return Accelerator()
    except ValueError as e:
        if 'already been initialized' not in str(e): raise
        AcceleratorState._reset_state()
        return Accelerator()

# %% ../nbs/08_controlnet.ipynb #train
def train_controlnet(out: str | os.PathLike,   # run folder: checkpoints/, snapshots/, validation/, and the result controlnet/
                     model=None,               # base model: folder, Hub id or loaded pipeline (default: the embedded model)
                     config: ControlNetConfig | dict | None = None, # the settings (any field can also be passed by name)
                     accelerator=None,         # an `accelerate.Accelerator` (default: a new one)
                     **kwargs                  # fields of `ControlNetConfig`
                    ) -> ControlNetResult:
    "Train a ControlNet for `model` on the shapes world's pictures and their controls; resumable, one run at a time per `out` folder."
    cfg = ControlNetConfig.make(config, **kwargs)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir(): raise FileExistsError(f"out={str(out)!r} is a file; pass a folder for the run")
    acc = accelerator or _accelerator()
    with run_lock(out, hold=acc.is_main_process):
        return _train(out, model, cfg, acc)

def _train(out: Path, model, cfg: ControlNetConfig, acc) -> ControlNetResult:
    "`train_controlnet`, once the run folder is held."
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    main, rank, device = acc.is_main_process, acc.process_index, acc.device
    if (out / 'controlnet').is_dir() and not cfg.overwrite: raise FileExistsError(
        f"{out} already holds the result of a finished run (controlnet/): pass overwrite=True to train again and "
        f"replace it, or choose another folder")
    if not cfg.resume and not cfg.overwrite and checkpoints(out): raise FileExistsError(
        f"{out} holds checkpoints of an earlier run: pass resume=True to continue it, overwrite=True to start afresh, "
        f"or another folder")
    found = resumable_checkpoint(out) if cfg.resume else None
    if cfg.resume and found is None: warnings.warn(f"resume=True, but {out} holds no checkpoint to resume: starting a new run")
    pipe = model if hasattr(model, 'components') else load_pipeline(model, device='cpu', dtype=torch.float32)
    if pipe.device != device: pipe = load_pipeline(pipe).to(device)
    model_name = pipe_defaults(pipe)['model']
    try: fingerprint = model_fingerprint(None if model_name == 'embedded' else model_name)
    except Exception: fingerprint = 'unknown'
    run = json.loads(json.dumps(dict({k: getattr(cfg, k) for k in RUN_FIELDS}, model=model_name, fingerprint=fingerprint,
                                     world=acc.num_processes)))
    for part in (pipe.unet, pipe.vae, pipe.text_encoder): part.requires_grad_(False)
    cn = make_controlnet(pipe.unet, cfg.conditioning_channels, seed=_seed('init', cfg.seed) % 2 ** 32).to(device)
    optimizer = torch.optim.AdamW(cn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler('constant_with_warmup', optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    start, losses, history = 0, [], {}
    if found is not None:
        ck, (state, weights, opt_state) = found
        diff = {k: (state['run'].get(k), v) for k, v in run.items() if state['run'].get(k) != v}
        if diff: raise ValueError(f"cannot resume {ck}: it was made with other settings or another model {{name: (then, "
                                  f"now)}}: {diff}; use the same settings, or overwrite=True to start afresh")
        cn.load_state_dict(weights)
        optimizer.load_state_dict(opt_state['optimizer']); lr_sched.load_state_dict(opt_state['lr_scheduler'])
        start, losses, history = state['step'], list(state['losses']), {int(k): v for k, v in state['history'].items()}
    if cfg.overwrite and found is None and main: clear_run(out)
    acc.wait_for_everyone()
    if main and (out / 'checkpoints').exists():
        for t in (out / 'checkpoints').glob('.tmp-step-*'): shutil.rmtree(t, ignore_errors=True)  # left by a kill
    cn_t, optimizer = acc.prepare(cn, optimizer)
    cn_t.train()
    scenes, controls, prompts = heldout_controls(cfg.validation_images, seed=cfg.seed) if cfg.validation_images else ([], [], [])

    def weights_now():
        return {k: v.detach().float().cpu().contiguous() for k, v in acc.unwrap_model(cn_t).state_dict().items()}

    def validate(step):
        "Render the validation controls, store their mean IoU by step and the strip as validation/step-N.png."
        if not (cfg.validation_images and main): return
        net = acc.unwrap_model(cn_t); net.eval()
        imgs = generate(controlnet_pipeline(pipe, net), prompts, seed=list(range(len(prompts))), image=controls,
                        num_inference_steps=cfg.validation_steps).images
        net.train()
        history[step] = float(np.mean(control_iou(imgs, controls, prompts)))
        (out / 'validation').mkdir(parents=True, exist_ok=True)
        with atomic_file(out / 'validation' / f"step-{step:06d}.png") as tmp:
            image_grid(controls + imgs, rows=2).save(tmp, format='PNG')

    def checkpoint(step, keep=True):
        "The checkpoint of `step` (to resume from) and a snapshot of the weights (for IoU against steps)."
        acc.wait_for_everyone()
        if main:
            w = weights_now()
            (out / 'snapshots').mkdir(parents=True, exist_ok=True)
            with atomic_file(out / 'snapshots' / f"step-{step:06d}.safetensors") as tmp: save_file(w, str(tmp))
            if keep:
                state = dict(run=run, losses=losses, history={str(k): v for k, v in history.items()}, step=step)
                state['digest'] = _digest(state, w)
                save_checkpoint(out, step, state, w, None, dict(optimizer=optimizer.state_dict(), lr_scheduler=lr_sched.state_dict()),
                                cfg.keep_checkpoints)
        acc.wait_for_everyone()

    out.mkdir(parents=True, exist_ok=True)
    if main:
        with atomic_file(out / 'run.json') as tmp: tmp.write_text(json.dumps(dict(asdict(cfg), **run), indent=1))
    if start == 0: validate(0); checkpoint(0, keep=False)
    stop = cfg.stop_at or cfg.steps
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and acc.is_local_main_process), desc='ControlNet', unit='step')
    t0 = time.time()
    for step in range(start, stop):
        pixels, control, caps = control_batch(step, cfg.batch_size, cfg.seed, cfg.kinds, rank=rank)
        g = torch.Generator().manual_seed(_seed('noise', cfg.seed, step, rank))
        with torch.no_grad():
            latents = vae_latents(pipe.vae, pixels.to(device), g)
            cond = pipe.encode_prompt(caps, device, 1, False)[0]
        loss = diffusion_loss(ControlledUNet(pipe.unet, cn_t, control.to(device)), noise_sched, latents, cond, g,
                              snr_gamma=cfg.snr_gamma or float('inf'))
        acc.backward(loss)
        if cfg.max_grad_norm: acc.clip_grad_norm_(cn_t.parameters(), cfg.max_grad_norm)
        optimizer.step(); lr_sched.step(); optimizer.zero_grad(set_to_none=True)
        value = acc.gather(loss.detach().reshape(1)).mean().item()
        if not math.isfinite(value): raise FloatingPointError(
            f"the loss became {value} at step {step + 1}: lower the learning rate (lr={cfg.lr}) or add warm-up steps")
        losses.append(value)
        bar.update(1); bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if done < cfg.steps and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stop):
            validate(done); checkpoint(done)
            if not cfg.progress and main:
                print(f"step {done}: loss {np.mean(losses[-cfg.checkpoint_every:]):.4f}, validation IoU "
                      f"{history.get(done, float('nan')):.3f}, {(time.time() - t0) / (done - start):.2f} s/step", flush=True)
    bar.close()
    seconds, saved, net = time.time() - t0, None, acc.unwrap_model(cn_t)
    if stop == cfg.steps:
        validate(cfg.steps); checkpoint(cfg.steps, keep=False)
        if main:
            with atomic_dir(out / 'controlnet') as tmp: net.save_pretrained(tmp, safe_serialization=True)
            with atomic_file(out / 'history.json') as tmp:
                tmp.write_text(json.dumps(dict(losses=losses, validation_iou={str(k): v for k, v in history.items()}), indent=1))
        acc.wait_for_everyone()
        saved = out / 'controlnet'
    net.eval()
    return ControlNetResult(controlnet=net, losses=losses, history=history, config=cfg, out=out, saved=saved,
                            seconds=seconds, step=stop, main_process=main)

# %% ../nbs/08_controlnet.ipynb #main
def _flag_type(f: dataclasses.Field):
    t = str(f.type)
    return int if t.startswith('int') else float if t.startswith('float') else str

def main(argv: Sequence[str] | None = None) -> ControlNetResult:
    "Command line: `python -m sd_intro.controlnet --out FOLDER [--resume] [--<setting> VALUE ...]`."
    p = argparse.ArgumentParser(prog='python -m sd_intro.controlnet', description="Train a ControlNet for the embedded "
                                "model (or --model) on the shapes world's pictures and their controls. Resumable.")
    p.add_argument('--out', required=True, help="run folder: checkpoints/, snapshots/, validation/, controlnet/")
    p.add_argument('--model', help="base model folder (default: the embedded model)")
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's choice)")
    from fastcore.docments import docments
    import importlib
    helps = docments(importlib.import_module('sd_intro.controlnet').ControlNetConfig)
    for f in dataclasses.fields(ControlNetConfig):
        flag, h = '--' + f.name.replace('_', '-'), (helps.get(f.name) or '').replace('%', '%%') + f" (default: {f.default})"
        if isinstance(f.default, bool): p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name == 'kinds': p.add_argument(flag, nargs='+', choices=CONTROL_KINDS, default=None, help=h)
        elif f.name == 'conditioning_channels': p.add_argument(flag, nargs=4, type=int, default=None, help=h)
        else: p.add_argument(flag, type=_flag_type(f), default=None, metavar=f.name.upper(), help=h)
    a = vars(p.parse_args(argv))
    threads = a.pop('threads')
    if threads: torch.set_num_threads(threads)
    out, model = a.pop('out'), a.pop('model')
    res = train_controlnet(out, model=model, **{k: v for k, v in a.items() if v is not None})
    if res.main_process:
        if res.saved: print(f"saved {res.saved} after {res.step} steps ({res.seconds:.0f} s); validation IoU by step: "
                            f"{ {k: round(v, 3) for k, v in sorted(res.history.items())} }")
        else: print(f"stopped after step {res.step}; continue with --resume")
    return res

# %% ../nbs/08_controlnet.ipynb #run
#| eval: false
from fastcore.imports import IN_NOTEBOOK
if __name__ == '__main__' and not IN_NOTEBOOK: main()   # `python -m ...` runs it; running this notebook does not
