"""The package as users get it: the wheel, installed without the checkout, makes and judges a picture.

Builds the wheel from a copy of the release files (setup.py, settings.ini, MANIFEST.in, README.md, LICENSE, sd_intro/),
checks that the build gives no setuptools warning about ignored packages and that LICENSE is in the wheel, installs it
with `pip --python VENV install --no-deps` into a fresh venv made without a pip of its own (its dependencies come from
the venv running the tests, through a .pth line, so nothing is downloaded; the checkout is not on the path), and from
another folder loads the embedded model, generates one picture and judges it, then answers each console script's --help.
"""
import json, os, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASE_FILES = ['setup.py', 'settings.ini', 'MANIFEST.in', 'README.md', 'LICENSE']

SCRIPT = r"""
import json, sys
from pathlib import Path
import sd_intro
from sd_intro import load_pipeline, generate, judge, EMBEDDED_MODEL
from sd_intro.shapes import JUDGE_PATH
prompt = 'a red circle on a blue background'
pipe = load_pipeline()
res = generate(pipe, prompt, seed=1, num_inference_steps=10)
seen = judge(res[0])
seen = seen[0] if isinstance(seen, list) else seen
# then each console script named on the command line, as its file runs (`NAME --help`), in this same process
import contextlib, io, runpy
helps = {}
for script in sys.argv[1:]:
    sys.argv, printed = [script, '--help'], io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try: runpy.run_path(script, run_name='__main__'); code = 0
        except SystemExit as e: code = e.code
    helps[Path(script).name] = [code, printed.getvalue()]
print(json.dumps({'sd_intro': sd_intro.__file__, 'model': str(EMBEDDED_MODEL), 'judge': str(JUDGE_PATH),
                  'size': list(res[0].size), 'judged': {k: v[0] for k, v in seen.items()}, 'helps': helps}))
"""


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-5000:]}"
    return r.stdout + r.stderr


def test_wheel_installs_and_generates(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for f in RELEASE_FILES: shutil.copy2(ROOT / f, src / f)
    shutil.copytree(ROOT / 'sd_intro', src / 'sd_intro', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    out = _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-w', str(tmp_path / 'dist'), str(src)])
    assert 'would be ignored' not in out.lower(), f"setuptools ignores a package folder:\n{out[-5000:]}"
    wheel, = (tmp_path / 'dist').glob('sd_intro-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith('licenses/LICENSE') for n in names), f"no LICENSE in {wheel.name}"
    assert any(n.startswith('sd_intro/models/') for n in names) and any(n.startswith('sd_intro/assets/') for n in names)
    # the package carries its models (base, LoRAs, ControlNet, flow model): at most 40 MB as a wheel, a quick pip install
    assert wheel.stat().st_size <= 40e6, f"{wheel.name} is {wheel.stat().st_size / 1e6:.1f} MB: over the 40 MB budget"

    venv = tmp_path / 'venv'
    _run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)])   # (pip comes from here:)
    py = venv / 'bin' / 'python'
    site = Path(_run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip().splitlines()[-1])
    # the test venv's dependencies (torch, diffusers, ...), after the new venv's own site-packages; its .pth files,
    # such as an editable install of the checkout, are not read from there
    deps = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}
    (site / '_sd_intro_test_deps.pth').write_text(''.join(f'{d}\n' for d in sorted(deps)))
    _run([sys.executable, '-m', 'pip', '--python', str(py), 'install', '--no-deps', '--no-index', '-q', str(wheel)])

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'SD_INTRO_MODEL')}
    env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    # settings.ini's console_scripts: the new commands answer --help from the installed package (in the same process)
    import configparser
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    scripts = dict(s.split('=') for s in cfg['DEFAULT']['console_scripts'].split())
    new = {f'sd-intro-{m}': f'sd_intro.{m}:main' for m in ('finetune', 'distill', 'embedded', 'controlnet', 'flow')}
    res = json.loads(_run([str(py), '-c', SCRIPT, *(str(venv / 'bin' / n) for n in new)], cwd=elsewhere, env=env).strip().splitlines()[-1])
    for k in ('sd_intro', 'model', 'judge'):
        assert Path(res[k]).resolve().is_relative_to(site.resolve()), f"{k} came from {res[k]}, not the installed wheel"
    assert res['size'] == [64, 64] or min(res['size']) >= 64, res
    assert {'colour', 'shape', 'background'} <= set(res['judged']), res
    print(f"wheel {wheel.name}: {len(names)} files, {wheel.stat().st_size / 1e6:.1f} MB; judged {res['judged']}")

    # settings.ini's console_scripts are installed, run the venv's Python, and each command line answers --help
    assert new.items() <= scripts.items() and {'sd_intro_train_embedded', 'sd_intro_train_controlnet', 'sd_intro_train_flow'} <= set(scripts)
    assert all((venv / 'bin' / name).is_file() for name in scripts), sorted(p.name for p in (venv / 'bin').iterdir())
    for name in new:
        assert (venv / 'bin' / name).read_text().startswith(f'#!{py}\n') and os.access(venv / 'bin' / name, os.X_OK), name
        code, out = res['helps'][name]
        assert code in (0, None) and out.startswith(f'usage: {name} ') and ' --out ' in out, out[:2000]
