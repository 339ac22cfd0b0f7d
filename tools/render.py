"""Execute the course's notebooks as a student's Run All does, and (with `--write`) keep their outputs.

One execution engine for two jobs:
- `tests/test_run_all.py` runs every lesson exactly as committed (no cell skipped, no tag honoured) in a fresh kernel
  with CUDA hidden, as on a laptop without a GPU or internet;
- `make render` (`python tools/render.py --write`) runs every notebook the same way and writes the outputs into the
  committed notebooks (then `nbdev_clean` strips metadata only), records a hash of each notebook's code in
  `nbs/_rendered.json` (so a test can tell when outputs are stale) and copies each lesson's headline picture to
  `nbs/images/` for the README.

Usage: python tools/render.py [--write] [--jobs N] [NOTEBOOK ...]   (default: every notebook in nbs/)

`--jobs N` runs N notebooks at a time, each kernel with cpu_count // N torch threads (`make render` uses 2: the
kernels' start-up and imports, single-threaded, overlap). A notebook's outputs are the same either way.
"""
from __future__ import annotations
import base64, hashlib, json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
IMAGES = NBS / 'images'
MANIFEST = NBS / '_rendered.json'
MAX_BYTES = 2_000_000
# The picture that heads each lesson in the README: the first PNG output of the first code cell containing this text.
# The first entry also opens the README.
HEADLINES = {'02_guidance': 'sweep.grid(', '01_pipelines': 'prog.strip(', '03_img2img': 'sweep = strength_sweep(',
             '04_inpainting': "edits = [('object'", '06_inside': "swapped = swap_word(",
             '05_finetuning': 'shipped = load_lora(', '07_few_steps': 'rows.update({f"LCM', '08_controlnet': 'with_cn = generate(cpipe',
             '09_flow': 'rows[f"flow, '}


def notebooks() -> list[Path]:
    "Every notebook of the course, in file order (names starting with '_' are scratch files)."
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))


def lessons() -> list[Path]:
    "The lessons: notebooks 01 to 09 (00a-00g are the library, 10 and up the tools, index is the home page)."
    return [p for p in notebooks() if re.match(r'0[1-9]_', p.name)]


def kernel_env(quiet: bool = False, threads: int | None = None) -> dict:
    "A laptop without a GPU or internet: CUDA hidden, Hub offline, the embedded model, this checkout importable."
    env = {k: v for k, v in os.environ.items() if k not in ('SD_INTRO_MODEL', 'SD_INTRO_RUN_GPU_CELLS')}
    env.update(CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1',
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]),
               PYDEVD_DISABLE_FILE_VALIDATION='1')
    if quiet: env['TQDM_DISABLE'] = '1'   # a static page gains nothing from a finished progress bar
    if threads: env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # kernels side by side share the cores
    return env


def execute(path, timeout: int = 900, quiet: bool = False, threads: int | None = None, kernel_manager_class=None):
    """Run `path` (a notebook file, or a notebook itself: run in nbs/) top to bottom in a fresh kernel (cwd its folder,
    `kernel_env(quiet)`): the executed notebook and the seconds taken. `kernel_manager_class`: how the kernel starts
    (default: jupyter_client's, a new process; the tests pass `warm_kernel.WarmKernels.manager_class()`, a fork of a
    process that has imported torch)."""
    import nbformat
    from nbclient import NotebookClient
    nb, folder = (path, NBS) if isinstance(path, dict) else (nbformat.read(path, as_version=4), Path(path).parent)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(folder)}},
                            **({'kernel_manager_class': kernel_manager_class} if kernel_manager_class else {}))
    t0 = time.time()
    client.execute(env=kernel_env(quiet, threads))
    return nb, time.time() - t0


def code_hash(nb) -> str:
    "A hash of the notebook's code cells' sources, in order: it changes when any code cell changes, is added or goes."
    src = json.dumps([''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code'])
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def images_in(nb) -> int:
    "The number of PNG pictures among the notebook's outputs."
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))


def headline_png(nb, needle: str) -> bytes | None:
    "The first PNG output of the first code cell whose source contains `needle`."
    for c in nb['cells']:
        if c['cell_type'] == 'code' and needle in ''.join(c['source']):
            for o in c.get('outputs', []):
                if 'image/png' in o.get('data', {}): return base64.b64decode(o['data']['image/png'])
            return None
    return None


def write(path: Path, nb) -> dict:
    "Write executed `nb` over `path`, cleaned of metadata by nbdev_clean; its manifest entry."
    import nbformat
    for c in nb.cells:   # PIL images show as both PNG and JPEG: keep the PNG only (half the notebook's size)
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'image/png' in d and 'image/jpeg' in d: del d['image/jpeg']
    nbformat.write(nb, path)
    subprocess.run([Path(sys.executable).parent / 'nbdev_clean', '--fname', str(path)], cwd=ROOT, check=True)
    nb = json.loads(path.read_text())
    size = path.stat().st_size
    if size > MAX_BYTES: print(f"WARNING: {path.name} is {size / 1e6:.1f} MB, over the 2 MB limit: show fewer or smaller pictures")
    stem = path.stem
    if stem in HEADLINES:
        png = headline_png(nb, HEADLINES[stem])
        if png is None: print(f"WARNING: {path.name}: no picture in the cell containing {HEADLINES[stem]!r} (HEADLINES in {__file__})")
        else: IMAGES.mkdir(exist_ok=True); (IMAGES / f"{stem}.png").write_bytes(png)
    return dict(code=code_hash(nb), images=images_in(nb), bytes=size)


def _run(p: Path, quiet: bool, threads: int | None):
    "`execute`, with the error as a value (for a worker process)."
    try: return execute(p, quiet=quiet, threads=threads)
    except Exception as e: return RuntimeError(str(e)[-3000:]), None   # (nbclient's errors do not pickle)


def main(argv=None):
    import argparse
    from concurrent.futures import ProcessPoolExecutor
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--write', action='store_true', help='write the outputs into the notebooks')
    ap.add_argument('--jobs', type=int, default=1, help='notebooks run at a time (default 1)')
    ap.add_argument('notebooks', nargs='*')
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.jobs < 1: ap.error(f"--jobs {a.jobs}: use 1 or more")
    do_write = a.write
    paths = [ROOT / n if not Path(n).is_absolute() else Path(n) for n in a.notebooks] or notebooks()
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    total, failed = time.time(), []
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None
    with ProcessPoolExecutor(a.jobs) as pool:   # results come back in order; each is written as soon as it is there
        runs = [pool.submit(_run, p, do_write, threads) for p in paths]
        for p, run in zip(paths, runs):
            nb, secs = run.result()
            if isinstance(nb, Exception):
                failed.append(p.name); print(f"{p.name}: FAILED\n{str(nb)[-3000:]}", flush=True); continue
            line = f"{p.name}: ran in {secs:.0f} s"
            if do_write:
                manifest[p.name] = entry = write(p, nb)
                line += f", {entry['images']} pictures, {entry['bytes'] / 1e6:.2f} MB"
            print(line, flush=True)
    if do_write:
        manifest = {k: manifest[k] for k in sorted(manifest) if (NBS / k).exists()}
        MANIFEST.write_text(json.dumps(manifest, indent=1) + '\n')
    print(f"{len(paths) - len(failed)} of {len(paths)} notebooks ran in {time.time() - total:.0f} s")
    if failed: sys.exit(f"failed: {', '.join(failed)}")


if __name__ == '__main__': main()
