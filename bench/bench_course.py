"""How long the whole course takes: every notebook in nbs/, executed one by one through nbdev's runner (as the tests
do, honouring tst_flags), with a table and the total. Budgets on 2 CPU cores: each lesson (nbs/01_* to nbs/09_*)
<= 60 s, the whole course <= 4 minutes.

By default all notebooks run in this one process, as `pytest tests/test_notebooks.py` runs them (imports and the
loaded embedded pipeline are shared after the first). `--fresh` runs each in its own Python process instead, like a
student restarting the kernel, and counts start-up too.

"CPU s" is the CPU time the notebook used (all threads): on a machine shared with other work (a training run, say)
the wall clock measures the neighbours too, and CPU time is the better guide to what the course costs on its own.
With `--threads 1` no thread burns CPU spinning while it waits for another, so "CPU s" is then the work itself, and
an upper bound for the wall time of the same run on two idle cores.

    python bench/bench_course.py [--fresh] [NOTEBOOK ...]
"""
import argparse, os, platform, resource, subprocess, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.pop('SD_INTRO_MODEL', None)
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render  # noqa: E402  (`render.lessons()`: which notebooks are lessons, as the tests and `make render` say)
TARGET_S = 240          # the whole course
LESSON_S = 60           # each lesson


def run_fresh(nb, flags):
    "Run one notebook in its own Python process; (ok, wall seconds including start-up)."
    code = ("import sys; from pathlib import Path; from nbdev.test import test_nb as run_notebook; "
            f"ok, _ = run_notebook(Path({str(nb)!r}), skip_flags={flags!r}); sys.exit(0 if ok else 1)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT / 'nbs', capture_output=True, text=True)
    if r.returncode: sys.stderr.write(r.stderr[-3000:])
    return r.returncode == 0, time.perf_counter() - t0


def cpu_seconds():
    "CPU seconds used so far by this process and its finished children, all threads together."
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('notebooks', nargs='*', help='default: every nbs/*.ipynb not starting with _')
    ap.add_argument('--fresh', action='store_true', help='each notebook in its own process')
    ap.add_argument('--threads', type=int, default=None,
                    help="torch threads (in-process runs only; 1 makes CPU s the work itself, with no thread spinning)")
    ap.add_argument('--json', default=str(ROOT / 'bench' / 'results' / 'course.json'),
                    help='where to write the figures (bench/RESULTS.md is made from them)')
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    nbs = [Path(p).resolve() for p in args.notebooks] or sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    flags = get_config(path=ROOT).tst_flags.split()
    print(f"# the course, notebook by notebook ({'a process each' if args.fresh else 'one process'}; skipping cells "
          f"flagged {flags}); {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
          f"{f', {args.threads} torch thread(s)' if args.threads else ''}")
    print(f'| notebook | ok | wall s | CPU s | lesson budget ({LESSON_S} s) |\n|---|---|---|---|---|')
    total, total_cpu, failed, rows = 0.0, 0.0, [], []
    lessons = {p.resolve() for p in render.lessons()}
    for nb in nbs:
        c0 = cpu_seconds()
        if args.fresh: ok, secs = run_fresh(nb, flags)
        else:
            t0 = time.perf_counter()
            ok, _ = run_notebook(nb, skip_flags=flags)
            secs = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        total, total_cpu = total + secs, total_cpu + cpu
        if not ok: failed.append(nb.name)
        budget = ('met' if secs <= LESSON_S else 'MISSED') if nb in lessons else ''
        rows.append(dict(notebook=nb.name, ok=bool(ok), wall_s=round(secs, 1), cpu_s=round(cpu, 1), **({'lesson_budget': budget} if budget else {})))
        print(f"| {nb.name} | {'yes' if ok else 'FAILED'} | {secs:.1f} | {cpu:.1f} | {budget} |", flush=True)
    over = [r['notebook'] for r in rows if r.get('lesson_budget') == 'MISSED']
    print(f"| **total** | {len(nbs) - len(failed)}/{len(nbs)} | **{total:.1f}** | {total_cpu:.1f} | {len(over)} over |")
    print(f"\ntotal {total:.0f} s = {total / 60:.1f} min wall, {total_cpu / 60:.1f} min CPU (target <= {TARGET_S / 60:.0f} "
          f"min: wall {'met' if total <= TARGET_S else 'MISSED'}, CPU {'met' if total_cpu <= TARGET_S else 'MISSED'})"
          f"; lessons over {LESSON_S} s: {', '.join(over) or 'none'}{'; failed: ' + ', '.join(failed) if failed else ''}")
    from provenance import stamp, write_json
    write_json(args.json, stamp(dict(date=time.strftime('%Y-%m-%d'), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                                threads=args.threads, fresh=args.fresh, skipped_flags=flags, target_s=TARGET_S, lesson_s=LESSON_S, rows=rows,
                                total_wall_s=round(total, 1), total_cpu_s=round(total_cpu, 1))))
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
