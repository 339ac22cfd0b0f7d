"""Flow matching against DDPM on the same model: the straight path, its velocity target, and the embedded model trained that way."""

# %% ../nbs/09_flow.ipynb #imports
from __future__ import annotations
import argparse, copy, hashlib, json, math, os, random, time, warnings
from dataclasses import dataclass, asdict, fields
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file
import sd_intro
from .core import EMBEDDED_MODEL, load_pipeline, generate, generators, atomic_dir, atomic_file, image_grid, Generation
from .shapes import Scene, caption, adherence
from .embedded import cache_latents, encode_text, noisy_scene, EMA, EVAL_PROMPTS, CAPTION_NOISE, N_IMAGES
from .finetune import save_checkpoint, load_checkpoint, checkpoints, run_lock, model_fingerprint

# %% ../nbs/09_flow.ipynb #objectives
def ddpm_noisy(x0: torch.Tensor,             # clean latents
               noise: torch.Tensor,          # standard normal noise, same shape
               t: torch.Tensor,              # integer timesteps, one per row
               alphas_cumprod: torch.Tensor  # the DDPM schedule's signal shares abar_t
              ) -> torch.Tensor:
    "DDPM's forward process: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. The network learns to predict `noise`."
    a = alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

def flow_noisy(x0: torch.Tensor,    # clean latents
               noise: torch.Tensor, # standard normal noise, same shape
               sigma: torch.Tensor  # where on the path, one per row: 0 is the picture, 1 is the noise
              ) -> torch.Tensor:
    "The straight path of flow matching: (1 - sigma) x0 + sigma noise."
    s = sigma.to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return s * noise + (1.0 - s) * x0

def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    "The velocity along the straight path, d x_sigma / d sigma = noise - x0: what a flow model learns to predict."
    return noise - x0

# %% ../nbs/09_flow.ipynb #flow_loss
def flow_timesteps(scheduler,                   # a FlowMatchEulerDiscreteScheduler as built (not after `set_timesteps`)
                   n: int,                      # how many
                   g: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    "`n` training (timesteps, sigmas) drawn uniformly from the scheduler's own training schedule (its `shift` included)."
    if len(scheduler.timesteps) != scheduler.config.num_train_timesteps:
        raise ValueError("flow_timesteps: this scheduler has been `set_timesteps` for sampling; pass a freshly built one "
                         "(FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))")
    i = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
    return scheduler.timesteps[i], scheduler.sigmas[i]

def flow_loss(unet,                    # a UNet2DConditionModel
              scheduler,               # a freshly built FlowMatchEulerDiscreteScheduler (its timesteps and sigmas)
              latents: torch.Tensor,   # clean scaled latents
              cond: torch.Tensor,      # text encoder states
              g: torch.Generator | None = None # a CPU generator: noise and timesteps the same on any device
             ) -> torch.Tensor:
    "Flow-matching loss: the mean squared error of the UNet's velocity on the straight path (the counterpart of `diffusion_loss`)."
    dev = latents.device
    noise = torch.randn(latents.shape, generator=g).to(dev)
    t, sigma = flow_timesteps(scheduler, len(latents), g)
    pred = unet(flow_noisy(latents, noise, sigma), t.to(dev), cond).sample
    return F.mse_loss(pred.float(), flow_target(latents, noise).float())

# %% ../nbs/09_flow.ipynb #scheduler
FLOW_MODEL = str(Path(sd_intro.__file__).parent / 'models' / 'shapes-flow')
FLOW_NAME = 'embedded-flow'   # what settings record for the shipped flow model

def flow_scheduler(shift: float = 1.0, # the scheduler's `shift`: above 1 spends more steps at high noise
                   config: dict | None = None # a FlowMatchEulerDiscreteScheduler config to start from
                  ):
    "diffusers' `FlowMatchEulerDiscreteScheduler`, ready for `StableDiffusionPipeline` (which reads `init_noise_sigma`: 1 here, the path starts at plain noise)."
    from diffusers import FlowMatchEulerDiscreteScheduler
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift={shift!r}: use a positive number (1 leaves the schedule as it is; SD3 uses 3)")
    s = FlowMatchEulerDiscreteScheduler.from_config(dict(config or {}), shift=float(shift))
    s.init_noise_sigma = 1.0
    return s

# %% ../nbs/09_flow.ipynb #flow_pipeline
def flow_pipeline(base,                  # a loaded Stable Diffusion pipeline giving the tokenizer, text encoder and VAE
                  unet,                  # the flow UNet
                  scheduler=None,        # a flow scheduler (default: `flow_scheduler()`)
                  name: str = FLOW_NAME  # what settings record as the model
                 ):
    "A `StableDiffusionPipeline` that draws with a flow UNet and diffusers' flow-matching Euler scheduler."
    from diffusers import StableDiffusionPipeline, FlowMatchEulerDiscreteScheduler
    scheduler = scheduler if scheduler is not None else flow_scheduler()
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"scheduler={type(scheduler).__name__}: a flow UNet needs a FlowMatchEulerDiscreteScheduler "
                        f"(e.g. flow_scheduler(shift=1.0)); DDPM-style schedulers feed it the wrong inputs")
    if not hasattr(scheduler, 'init_noise_sigma'): scheduler.init_noise_sigma = 1.0
    parts = {k: v for k, v in base.components.items() if k in ('vae', 'text_encoder', 'tokenizer', 'safety_checker', 'feature_extractor')}
    pipe = StableDiffusionPipeline(**parts, unet=unet, scheduler=scheduler, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.sd_intro_model = name
    pipe.set_progress_bar_config(disable=True)
    return pipe

# %% ../nbs/09_flow.ipynb #train
@dataclass
class FlowConfig:
    "Every setting of a flow-matching run of the embedded UNet (the command line has one flag per field)."
    steps: int = 3000             # optimiser steps
    batch_size: int = 64          # latents per step (the embedded model's)
    lr: float = 3e-4              # peak learning rate (AdamW), after a linear warm-up, cosine down to a tenth
    warmup_steps: int = 100       # steps of linear warm-up
    init: str = 'ddpm'            # 'ddpm': continue from the shipped DDPM UNet; 'scratch': a fresh UNet of the same shape
    ema_decay: float = 0.999      # EMA of the weights (what is saved)
    n_images: int = N_IMAGES      # base-world pictures whose latents are cached (the embedded model's 40,000)
    data_seed: int = 100          # seed of those pictures (the embedded model's: the same data)
    caption_noise: float = CAPTION_NOISE # chance that a caption's shape/background/style word is wrong (as the embedded model)
    train_shift: float = 1.0      # the training scheduler's `shift` (1: timesteps uniform on the path)
    shift: float = 1.0            # the `shift` saved with the model for sampling
    seed: int = 0                 # decides every step's pictures, captions, noise and timesteps
    checkpoint_every: int = 250   # write a checkpoint (and validation pictures) every this many steps
    keep_checkpoints: int = 2     # how many recent checkpoints to keep
    validation_steps: int = 8     # Euler steps of the validation pictures
    stop_at: int | None = None    # stop (with a checkpoint) after this step, to resume later

    def __post_init__(self):
        def need(ok, k, what):
            if not ok: raise ValueError(f"{k}={getattr(self, k)!r}: {what}")
        whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        real = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        for k in ('steps', 'batch_size', 'n_images', 'checkpoint_every', 'keep_checkpoints', 'validation_steps'):
            need(whole(getattr(self, k)) and getattr(self, k) >= 1, k, "use a whole number of at least 1")
        for k in ('warmup_steps', 'seed', 'data_seed'): need(whole(getattr(self, k)) and getattr(self, k) >= 0, k, "use a whole number, 0 or more")
        need(self.init in ('ddpm', 'scratch'), 'init', "use 'ddpm' (continue from the shipped UNet) or 'scratch'")
        need(real(self.lr) and self.lr > 0, 'lr', "use a positive number, e.g. 3e-4")
        need(real(self.ema_decay) and 0 < self.ema_decay < 1, 'ema_decay', "use a number between 0 and 1, e.g. 0.999")
        need(real(self.caption_noise) and 0 <= self.caption_noise < 1, 'caption_noise', "a share, from 0 up to 1")
        for k in ('train_shift', 'shift'): need(real(getattr(self, k)) and getattr(self, k) > 0, k, "use a positive number (1 is no shift)")
        need(self.stop_at is None or whole(self.stop_at) and 1 <= self.stop_at <= self.steps, 'stop_at',
             f"use a step from 1 to steps={self.steps}, or None")
        for f in fields(self):   # numpy numbers are fine; the run's config.json holds plain ones
            v = getattr(self, f.name)
            if isinstance(v, np.integer): setattr(self, f.name, int(v))
            elif isinstance(v, np.floating): setattr(self, f.name, float(v))

# The settings a resumed run must share with its checkpoints (stop_at, checkpoint_every, keep_checkpoints may change)
FLOW_RUN_FIELDS = ('steps', 'batch_size', 'lr', 'warmup_steps', 'init', 'ema_decay', 'n_images', 'data_seed',
                   'caption_noise', 'train_shift', 'shift', 'seed', 'validation_steps')

def flow_lr(step: int, cfg: FlowConfig) -> float:
    "The learning rate at `step`: linear warm-up, then a cosine down to a tenth of the peak (a function of the step alone)."
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)))

def step_seed(seed: int, step: int, what: str = 'flow') -> int:
    "A 63-bit seed for one step of a run, from the run's seed and the step alone (so a resumed run draws what an unbroken one does)."
    return int.from_bytes(hashlib.sha256(f"{what}:{seed}:{step}".encode()).digest()[:8], 'little') >> 1

VALIDATION_PROMPTS = [EVAL_PROMPTS[i * len(EVAL_PROMPTS) // 16] for i in range(16)]

# %% ../nbs/09_flow.ipynb #digest
def state_digest(state: dict, *tensors: dict) -> str:
    "A hash of a checkpoint's state (JSON-able) and its tensors: an edited or mixed-up checkpoint no longer matches it."
    h = hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != 'digest'}, sort_keys=True).encode())
    def feed(obj):
        if torch.is_tensor(obj): h.update(str((obj.dtype, tuple(obj.shape))).encode()); h.update(obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if obj.numel() else b'')
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str): h.update(repr(k).encode()); feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj: feed(v)
        else: h.update(repr(obj).encode())
    for t in tensors: feed(t)
    return h.hexdigest()[:32]

# %% ../nbs/09_flow.ipynb #data
def flow_latents(out: Path, vae, n_images: int, data_seed: int, log=print):
    "The cached latent means, standard deviations and scenes of the run in `out` (made once, written atomically, no pickles)."
    f, meta = out / 'latents.safetensors', out / 'latents.json'
    if f.exists() and meta.exists():
        try:
            t, m = load_file(str(f)), json.loads(meta.read_text())
            if m.get('n_images') == n_images and m.get('data_seed') == data_seed and len(t['means']) == n_images:
                return t['means'], t['stds'], [Scene(**d) for d in m['scenes']]
            raise ValueError(f"made for n_images={m.get('n_images')}, data_seed={m.get('data_seed')}")
        except Exception as e:
            raise ValueError(f"{f} (or {meta.name}) is damaged or belongs to other settings ({e}); delete both files "
                             f"and they are made again (about a minute per 10,000 pictures)") from e
    log(f"encoding {n_images} pictures (data_seed={data_seed}) into latents")
    means, stds, scenes = cache_latents(vae, n_images, seed=data_seed)
    with atomic_file(meta) as tmp: tmp.write_text(json.dumps(dict(n_images=n_images, data_seed=data_seed, scenes=[asdict(s) for s in scenes])))
    with atomic_file(f) as tmp: save_file(dict(means=means.contiguous(), stds=stds.contiguous()), str(tmp))
    return means, stds, scenes

def _flow_batch(means, stds, scenes, sf, step, cfg):
    "Latents and captions of batch `step`: decided by the run's seed and the step alone."
    g = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    rng = random.Random(step_seed(cfg.seed, step, 'captions'))
    idx = torch.randint(0, len(means), (cfg.batch_size,), generator=g)
    lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * sf
    caps = [caption(noisy_scene(scenes[i], rng, cfg.caption_noise), rng) for i in idx.tolist()]
    return lat, caps, g

# %% ../nbs/09_flow.ipynb #checkpoint
def _load_flow_checkpoint(ck: Path, run: dict):
    "State, UNet, EMA and optimizer state of checkpoint `ck`, refused by name if damaged, edited or of another run."
    state, weights, ema, opt = load_checkpoint(ck)   # names a cut-off file
    fix = (f"delete the folder {ck} to resume from the checkpoint before it, or start a new run in another --out folder")
    if state.get('digest') != state_digest(state, weights, ema or {}, opt):
        raise ValueError(f"checkpoint {ck}: its state.json does not match its weights (edited, or files from "
                         f"different checkpoints): {fix}")
    if state.get('step') != int(ck.name[5:]) or len(state.get('losses', ())) != state['step']:
        raise ValueError(f"checkpoint {ck}: its step ({state.get('step')}) or losses disagree with its name: {fix}")
    diff = {k: (state['config'].get(k), run.get(k)) for k in FLOW_RUN_FIELDS + ('base',) if state['config'].get(k) != run.get(k)}
    if diff: raise ValueError(f"cannot resume from {ck}: it was made with other settings {{name: (then, now)}}: {diff}; "
                              f"pass the same settings, or choose another --out folder for a new run")
    return state, weights, ema, opt

def _resumable(out: Path, run: dict):
    "The newest checkpoint of `out` that loads (warning about each newer one that does not), or None."
    bad = []
    for ck in checkpoints(out):
        try: got = _load_flow_checkpoint(ck, run)
        except ValueError as e:
            if 'other settings' in str(e): raise
            bad.append(str(e)); continue
        if bad: warnings.warn(' '.join(bad) + f" Resuming from {ck.name} instead.")
        return ck, got
    if bad: raise ValueError(' '.join(bad) + f" No checkpoint in {out} can be resumed: start a new run in another --out folder")
    return None

# %% ../nbs/09_flow.ipynb #save
def save_flow_model(unet,                 # the trained flow UNet
                    dest: str | os.PathLike, # the folder (replaced whole, atomically)
                    shift: float = 1.0,   # the scheduler's `shift` for sampling
                    info: dict | None = None # what to record in flow.json (settings, losses, ...)
                   ) -> Path:
    "Save a flow model as diffusers loads it: `unet/` and `scheduler/` (FlowMatchEulerDiscreteScheduler); the text encoder, tokenizer and VAE are the embedded model's."
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        unet.save_pretrained(tmp / 'unet', safe_serialization=True)
        flow_scheduler(shift).save_pretrained(tmp / 'scheduler')
        (tmp / 'flow.json').write_text(json.dumps(dict(kind='sd_intro.flow', base=EMBEDDED_NAME_FOR_FLOW, **(info or {})), indent=1))
    return dest

EMBEDDED_NAME_FOR_FLOW = 'embedded'   # the text encoder, tokenizer and VAE it draws with

@dataclass
class FlowRun:
    "What a flow-matching run made."
    pipe: object            # the flow pipeline (EMA weights)
    losses: list            # the loss of every step, resumed parts included
    evals: dict             # step -> judged adherence of the validation pictures
    out: Path               # the run folder
    step: int               # steps done
    seconds: float = 0.0    # training time in this call
    saved: Path | None = None # out/model once the run is complete

def _check_out(out: Path):
    "Refuse a run folder that holds something other than a flow run (nothing of the user's is ever written over)."
    if out.exists() and not out.is_dir(): raise FileExistsError(f"out={str(out)!r} is a file; pass a folder for the run")
    if not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith('.sd_intro.lock')): return
    try: ours = json.loads((out / 'config.json').read_text()).get('kind') == 'sd_intro.flow'
    except (OSError, ValueError, AttributeError): ours = False
    if not ours: raise FileExistsError(f"out={str(out)!r} holds files that are not a flow-matching run's; nothing there is "
                                       f"touched. Choose a new or empty folder")

def train_flow(out: str | os.PathLike,       # run folder: config.json, latents, checkpoints/, validation/, model/
               config: FlowConfig | dict | None = None, # the settings (any field can also be passed by name)
               device: str = 'cpu',
               log=print,                    # where progress lines go (None: nowhere)
               **kwargs                      # fields of `FlowConfig`
              ) -> FlowRun:
    "Train the embedded UNet with the flow-matching objective; resumable from any kill, bit for bit; one run at a time per folder."
    cfg = FlowConfig(**{**(asdict(config) if isinstance(config, FlowConfig) else dict(config or {})), **kwargs})
    out = Path(out).expanduser()
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this torch sees no CUDA GPU: use device='cpu'")
    _check_out(out)
    with run_lock(out): return _train_flow(out, cfg, device, log or (lambda s: None))

def _train_flow(out: Path, cfg: FlowConfig, device: str, log) -> FlowRun:
    from diffusers import UNet2DConditionModel, FlowMatchEulerDiscreteScheduler
    run = dict(asdict(cfg), kind='sd_intro.flow', base=model_fingerprint(EMBEDDED_MODEL))
    found = _resumable(out, run)
    base = load_pipeline(EMBEDDED_MODEL, device='cpu')
    tok, te, vae = base.tokenizer, base.text_encoder.to(device), base.vae
    if cfg.init == 'ddpm': unet = base.unet
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(cfg.seed, -1, 'init'))
            unet = UNet2DConditionModel.from_config(base.unet.config)
    unet = unet.to(device).train().requires_grad_(True)
    with atomic_file(out / 'config.json') as tmp: tmp.write_text(json.dumps(run, indent=1))
    means, stds, scenes = flow_latents(out, vae, cfg.n_images, cfg.data_seed, log)
    sf = vae.config.scaling_factor
    train_sched = FlowMatchEulerDiscreteScheduler(shift=cfg.train_shift)
    opt = torch.optim.AdamW(unet.parameters(), cfg.lr, weight_decay=0.01)
    ema = EMA(unet, cfg.ema_decay)
    start, losses, evals = 0, [], {}
    if found:
        ck, (state, weights, ema_w, opt_state) = found
        unet.load_state_dict(weights); ema.model.load_state_dict(ema_w); opt.load_state_dict(opt_state['optimizer'])
        start, losses, evals = state['step'], list(state['losses']), dict(state['evals'])
        log(f"resumed from {ck} (step {start})")

    def validate(step):
        pipe = flow_pipeline(base, ema.model, flow_scheduler(cfg.shift))
        imgs = generate(pipe, VALIDATION_PROMPTS, seed=0, num_inference_steps=cfg.validation_steps, guidance_scale=7.5).images
        (out / 'validation').mkdir(exist_ok=True)
        with atomic_file(out / 'validation' / f"step-{step:06d}.png") as tmp: image_grid(imgs, rows=2).save(tmp, format='PNG')
        evals[str(step)] = {k: round(float(v), 4) for k, v in adherence(imgs, VALIDATION_PROMPTS).items()}
        log(f"step {step}: validation adherence {evals[str(step)]}")

    def checkpoint(step):
        trained = {k: v.detach().float().cpu().contiguous() for k, v in unet.state_dict().items()}
        ema_w = {k: v.detach().float().cpu().contiguous() for k, v in ema.model.state_dict().items()}
        opt_state = dict(optimizer=opt.state_dict())
        state = dict(config=run, losses=losses, evals=evals, step=step)
        state['digest'] = state_digest(state, trained, ema_w, opt_state)
        save_checkpoint(out, step, state, trained, ema_w, opt_state, cfg.keep_checkpoints)

    if start == 0 and '0' not in evals: validate(0)
    stop, t0 = cfg.stop_at or cfg.steps, time.time()
    for step in range(start, stop):
        for pg in opt.param_groups: pg['lr'] = flow_lr(step, cfg)
        lat, caps, g = _flow_batch(means, stds, scenes, sf, step, cfg)
        with torch.no_grad(): cond, _ = encode_text(tok, te, caps)
        loss = flow_loss(unet, train_sched, lat.to(device), cond, g)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step + 1}: lower the learning rate (lr={cfg.lr})")
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
        ema.update(unet, step)
        losses.append(round(loss.item(), 6))
        done = step + 1
        if done % 50 == 0 or done == stop: log(f"step {done}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} "
                                                f"lr {flow_lr(step, cfg):.2e} {time.time() - t0:.0f}s")
        if done % cfg.checkpoint_every == 0 or done == stop:
            validate(done); checkpoint(done)
    seconds = time.time() - t0
    ema.model.eval()
    pipe = flow_pipeline(base, ema.model, flow_scheduler(cfg.shift))
    saved = None
    if stop == cfg.steps:
        info = dict(config=asdict(cfg), steps=cfg.steps, final_loss=float(np.mean(losses[-100:])), evals=evals,
                    trained_from=f"{'the embedded DDPM UNet' if cfg.init == 'ddpm' else 'scratch'} ({run['base']})")
        saved = save_flow_model(ema.model, out / 'model', cfg.shift, info)
        log(f"saved {saved}")
    return FlowRun(pipe=pipe, losses=losses, evals=evals, out=out, step=stop, seconds=seconds, saved=saved)

# %% ../nbs/09_flow.ipynb #main
def main(argv: Sequence[str] | None = None) -> FlowRun:
    "Command line: `python -m sd_intro.flow --out FOLDER [--steps N] [--init ddpm|scratch] [--<setting> VALUE ...]`; run it again to resume."
    p = argparse.ArgumentParser(prog='python -m sd_intro.flow', description="Train the embedded model's UNet with the "
                                "flow-matching objective (resumable: run the same command again after a stop or a crash).")
    p.add_argument('--out', required=True, help="run folder: config.json, latents, checkpoints/, validation/, model/")
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help="torch CPU threads (1 leaves the other cores free)")
    for f in fields(FlowConfig):
        t = str(f.type)
        kind = int if t.startswith('int') else float if t.startswith('float') else str
        p.add_argument('--' + f.name.replace('_', '-'), type=kind, default=None, metavar=f.name.upper(), help=f"(default: {f.default})")
    a = vars(p.parse_args(argv))
    out, device, threads = a.pop('out'), a.pop('device'), a.pop('threads')
    if threads: torch.set_num_threads(threads)
    res = train_flow(out, device=device, log=lambda s: print(time.strftime('%H:%M:%S'), s, flush=True),
                     **{k: v for k, v in a.items() if v is not None})
    print(f"saved {res.saved}" if res.saved else f"stopped after step {res.step}; run the same command to resume")
    return res

# %% ../nbs/09_flow.ipynb #dunder
from fastcore.imports import IN_NOTEBOOK
if __name__ == '__main__' and not IN_NOTEBOOK: main()
