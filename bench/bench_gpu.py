"""Stable Diffusion 1.5 on one GPU: 512 px, 50 steps, batch-1 latency and batch-8 throughput, plain vs fast, with
model FLOP utilisation (MFU) from the FLOPs counted by `sd_intro.speed.pipeline_flops` and the GPU's dense fp16/bf16
peak. Records the GPU model and the versions with the figures; prints a Markdown table for bench/RESULTS.md and writes
JSON (default bench/out/gpu.json).

    python bench/bench_gpu.py                     # full-size architecture, random weights: no download (needs CUDA)
    python bench/bench_gpu.py --model CompVis/stable-diffusion-v1-4   # a real checkpoint (from the local HF cache)
    python bench/bench_gpu.py --compile-mode max-autotune             # longer compile, maybe faster
    python bench/bench_gpu.py --smoke             # CPU, embedded model, 64 px, 2 steps: checks that the script runs

"plain" is the pipeline as `load_pipeline` gives it on CUDA (fp16, diffusers' default attention); "fast" is the same
pipeline after `sd_intro.speed.make_fast` (channels-last, torch.compile of the UNet and VAE decoder). Both make the
same images from the same seeds; the table shows how far apart their pixels are.
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys, time, traceback
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'a photograph of an astronaut riding a horse'


def versions(device):
    "The machine and library versions to record with the figures."
    import diffusers, transformers
    v = dict(date=datetime.datetime.now().isoformat(timespec='seconds'), python=platform.python_version(),
             torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
             cpu=platform.processor() or platform.machine(), cpu_cores=os.cpu_count())
    if device.startswith('cuda'):
        p = torch.cuda.get_device_properties(device)
        v.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try: v['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                          capture_output=True, text=True, timeout=20).stdout.strip().split('\n')[0]
        except Exception: v['driver'] = None
    else: v['gpu'] = None
    return v


def load(args):
    from sd_intro.core import load_pipeline
    from sd_intro.speed import full_size_pipeline
    if args.model == 'sd15-random': return full_size_pipeline(args.device, args.dtype)
    pipe = load_pipeline(None if args.model == 'embedded' else args.model, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe, label, batches, args, flops, peak, sync, reference=None):
    "Rows of timings for each batch size; the images of the first call of each (to compare plain with fast)."
    from sd_intro.core import generate
    from sd_intro.speed import interleaved_times, mfu
    rows, images = [], {}
    for b in batches:
        run = lambda: generate(pipe, PROMPT, seed=0, n=b, num_inference_steps=args.steps, height=args.size, width=args.size)
        if sync: torch.cuda.reset_peak_memory_stats()
        sync and sync(); t0 = time.perf_counter()
        out = run()                                  # first call: compilation and CUDA-graph recording happen here
        sync and sync(); first = time.perf_counter() - t0
        images[b] = np.stack([np.asarray(im, dtype=np.int16) for im in out.images])
        ts = interleaved_times({label: run}, repeats=args.repeats, warmup=args.warmup, sync=sync)[label]
        med = statistics.median(ts)
        row = dict(config=label, batch=b, first_call_s=first, median_s=med, min_s=min(ts), s_per_image=med / b,
                   images_per_s=b / med, tflop_per_s=flops[b] / med / 1e12, mfu=mfu(flops[b], med, peak))
        if sync: row['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2**30
        if reference is not None:
            d = np.abs(images[b] - reference[b])
            row.update(max_dpx=int(d.max()), mean_dpx=float(d.mean()))
        rows.append(row)
        print(f"  {label} batch {b}: median {med:.3f} s over {len(ts)} ({first:.1f} s first call)", flush=True)
    return rows, images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true', help='CPU, embedded model, 64 px, 2 steps, batches 1 2, 1 repeat')
    ap.add_argument('--model', default=None, help="'sd15-random' (default), 'embedded', a Hub id or a local folder")
    ap.add_argument('--device', default=None)
    ap.add_argument('--dtype', default=None, help='default: float16 on CUDA, float32 elsewhere')
    ap.add_argument('--size', type=int, default=512)
    ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--warmup', type=int, default=1, help='untimed calls after the first one')
    ap.add_argument('--compile-mode', default='reduce-overhead', help="torch.compile mode for the fast path")
    ap.add_argument('--no-compile', action='store_true', help='fast path without torch.compile')
    ap.add_argument('--configs', nargs='+', default=['plain', 'fast'], choices=['plain', 'fast'])
    ap.add_argument('--peak-tflops', type=float, default=None, help='override the GPU peak (dense fp16/bf16 TFLOP/s)')
    ap.add_argument('--json', default=str(ROOT / 'bench' / 'out' / 'gpu.json'))
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = args.device or 'cpu'
        args.model = args.model or 'embedded'
        args.size, args.steps, args.batches, args.repeats, args.warmup = 64, 2, [1, 2], 1, 0
    args.model = args.model or 'sd15-random'
    args.device = args.device or ('cuda' if torch.cuda.is_available() else None)
    if args.device is None: ap.error('no CUDA GPU here: run with --smoke to check the script on a CPU')
    if args.smoke: os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from sd_intro.speed import make_fast, markdown_table, peak_tflops, pipeline_flops

    cuda = args.device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else None
    env = versions(args.device)
    peak = args.peak_tflops or (peak_tflops(env['gpu']) if env['gpu'] else None)
    print(f"# {args.model} on {env['gpu'] or 'CPU'} ({args.device}): {args.size} px, {args.steps} steps, "
          f"batches {args.batches}, {args.repeats} repeats; peak {peak} TFLOP/s")
    print('# ' + ', '.join(f"{k} {v}" for k, v in env.items() if k != 'date'), flush=True)
    t0 = time.perf_counter()
    pipe = load(args)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s: {type(pipe).__name__}, {pipe.unet.dtype}", flush=True)
    flops = {b: pipeline_flops(pipe, args.size, args.size, batch=b, steps=args.steps)['total'] for b in args.batches}
    rows, plain_images, fast_info, error = [], None, None, None
    if 'plain' in args.configs:
        r, plain_images = measure(pipe, 'plain', args.batches, args, flops, peak, sync)
        rows += r
    if 'fast' in args.configs:
        try:
            make_fast(pipe, compile=not args.no_compile, mode=args.compile_mode)
            fast_info = pipe.sd_intro_fast
            print(f"  fast path: {fast_info}", flush=True)
            r, _ = measure(pipe, 'fast', args.batches, args, flops, peak, sync, reference=plain_images)
            rows += r
        except Exception as e:  # keep the plain figures whatever happens to the fast path
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    plain = {r['batch']: r['median_s'] for r in rows if r['config'] == 'plain'}
    for r in rows:
        if r['config'] != 'plain' and r['batch'] in plain: r['speedup'] = plain[r['batch']] / r['median_s']
    print(f"\nFLOPs per call: " + ', '.join(f"batch {b}: {f / 1e12:.1f} TFLOP" for b, f in flops.items()))
    print(markdown_table(rows, floats='.3g'))
    if error: print(f"\nfast path FAILED: {error}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import stamp
    fingerprint = dict(model=args.model) if args.model == 'sd15-random' else stamp({}, model=None if args.model == 'embedded' else args.model)
    out.write_text(json.dumps(dict(**fingerprint, env=env, args=vars(args), peak_tflops=peak, flops=flops, fast=fast_info,
                                   error=error, rows=rows), indent=1, default=str))
    print(f"\nwritten {out}")
    return 1 if error else 0


if __name__ == '__main__': sys.exit(main())
