import os, signal, socket, sys
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


@pytest.fixture(scope='module')
def one_thread():
    "Torch on one thread for a module whose results are compared bit for bit with runs made on one thread."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def command_line(capsys):
    """The checks of a module's command line, a fastcore `call_parse` function `main`: `.check(main, module, config)` and
    `.run(main, argv)` (parse `argv` as the command line does, then call it); `.start(main, argv, log)` runs it so in a forked
    process (`.ended(pid)`, `.wait(pid, kill=True)`: a kill -9 mid-run)."""
    import dataclasses, inspect, re, subprocess, sys
    from pathlib import Path
    from types import SimpleNamespace
    from fastcore.docments import docments
    from fastcore.script import Param, anno_parser
    flat = lambda s: ' '.join(s.split())
    def text_of(v): return v.anno.help if isinstance(v.anno, Param) else v.docment

    def check(main, module, config=None):
        """`--help` (here, and from `python -m module`) lists every option with its docments text and its default; every
        field of the settings dataclass `config` is an option with the field's default and comment; an unknown option,
        an option spelt with dashes (the argparse commands before call_parse) and a value outside an option's choices
        are refused by name."""
        f, prog = main.__wrapped__, f'python -m {module}'
        help = flat(anno_parser(f, prog=prog).format_help())
        opts = docments(f, full=True, returns=False, eval_str=True)
        for k, v in opts.items():
            assert text_of(v), f"--{k} has no text"
            flag = f"--no-{k}" if v.default is True else f"--{k}"
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}([\s\]]|$)", help), f"{flag} is not in --help"
            want = text_of(v) + ('' if v.default is None else f" (default: {v.default})")
            assert flat(want) in help, f"--help does not say {want!r}"
        if config is not None:
            said = docments(config)
            for fld in dataclasses.fields(config):
                assert fld.name in opts, f"{config.__name__}.{fld.name} is no option of {prog}"
                assert opts[fld.name].default == fld.default, (fld.name, opts[fld.name].default, fld.default)
                if said.get(fld.name): assert flat(text_of(opts[fld.name])) == flat(said[fld.name]), fld.name
        p = anno_parser(f, prog=prog)
        dashed = next(k for k, v in opts.items() if '_' in k and v.default is not True)
        bad = [(['--no_such_option', '1'], 'unrecognized arguments: --no_such_option 1'),
               ([f"--{dashed.replace('_', '-')}", '2'], f"unrecognized arguments: --{dashed.replace('_', '-')} 2")]
        bad += [([f'--{k}', 'nonsense'], f"argument --{k}: invalid choice: 'nonsense'")
                for k, v in opts.items() if isinstance(v.anno, Param) and v.anno.choices]
        capsys.readouterr()
        for argv, msg in bad:
            with pytest.raises(SystemExit) as e: p.parse_args(['--out', 'x', *argv])
            err = capsys.readouterr().err
            assert e.value.code == 2 and msg in err and err.startswith(f'usage: {prog}'), err
        paths = [str(Path(__file__).resolve().parents[1])] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS='1')
        r = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0 and flat(r.stdout) == help, r.stdout[-3000:] + r.stderr[-3000:]

    def parsed(main, argv):
        args = vars(anno_parser(main.__wrapped__).parse_args([str(a) for a in argv]))
        args.pop('pdb', None); args.pop('xtra', None)
        return args

    def run(main, argv):
        "Run the command line in this process (its `--threads` does not outlast it)."
        import torch
        n = torch.get_num_threads()
        try: return main(**parsed(main, argv))
        finally: torch.set_num_threads(n)

    def start(main, argv, log):
        """Start the command line in a fork of this process, its output going to the file `log`: a process of its own
        (its own locks; a SIGKILL ends it with no clean-up), without a new interpreter loading the libraries again.
        Returns its process id; `ended(pid)` says whether it has ended, `wait(pid)` its exit status."""
        args = parsed(main, argv)
        pid = os.fork()
        if pid: return pid
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, 'w', buffering=1, closefd=False)
            main(**args); code = 0
        except SystemExit as e: code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback; traceback.print_exc()
        finally: os._exit(code)   # never back into pytest

    exits = {}
    def ended(pid) -> bool:
        if pid in exits: return True
        done, status = os.waitpid(pid, os.WNOHANG)
        if done: exits[pid] = status
        return bool(done)

    def wait(pid, kill=False) -> int:
        "The exit status of the process `pid` (negative: ended by that signal), after a SIGKILL with `kill`."
        if kill and not ended(pid): os.kill(pid, signal.SIGKILL)
        if pid not in exits: exits[pid] = os.waitpid(pid, 0)[1]
        return os.waitstatus_to_exitcode(exits[pid])
    return SimpleNamespace(check=check, run=run, start=start, ended=ended, wait=wait)


def pytest_configure(config):
    # diffusers' schedulers call np.array / np.log on torch tensors; numpy 2 warns about torch's signatures (not ours)
    config.addinivalue_line('filterwarnings',
                            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
    config.addinivalue_line('filterwarnings', "ignore:__array_wrap__ must accept context:DeprecationWarning")


# ---- the order `make test` runs the tests in -------------------------------------------------------------------------
# About how many seconds of one core each slow test file takes (`pytest tests -n 2 --junitxml=...` on a 2-core machine),
# and for the files whose tests share nothing (each lesson, each notebook) each of its tests, by its parameter (None: any
# other). Under pytest-xdist a worker takes a contiguous run of the collected tests, so these are dealt out to the
# workers, longest first, each worker's run ending with the short tests (in file order, so that module fixtures stay
# shared): no long test is left running alone at the end. A file not listed counts as short; a wrong figure only
# changes the order, never what runs.
FILE_SECONDS = {'test_trainers_resume.py': 43, 'test_finetune.py': 23, 'test_docs_build.py': 21, 'test_docs_html.py': 19,
                'test_playground_e2e.py': 18, 'test_flow.py': 17, 'test_shapes.py': 16, 'test_controlnet.py': 15,
                'test_distill.py': 13, 'test_course_command.py': 11, 'test_wheel.py': 11, 'test_speed.py': 9, 'test_core.py': 7,
                'test_img2img.py': 5}
EACH_TEST_SECONDS = {   # the lessons in warm kernels (tests/test_run_all.py); the first on each worker also starts its server
    'test_run_all.py': {'05_finetuning': 60, '06_inside': 55, '07_few_steps': 42, '09_flow': 28, '01_pipelines': 27,
                        '02_guidance': 24, '08_controlnet': 20, '03_img2img': 11, '04_inpainting': 11, None: 30},
    'test_notebooks.py': {'00a_lib_shapes': 8, '00g_lib_embedded': 5, '00f_lib_training': 4, '00e_lib_core': 3,
                          '11_tool_speed': 3, None: 1}}


def _seconds(file, test=None) -> float:
    if test is None: return FILE_SECONDS.get(file, 0)
    each, param = EACH_TEST_SECONDS[file], getattr(getattr(test, 'callspec', None), 'id', None)
    return 0 if param is None else each.get(param, each[None])   # (a test without parameters there: a check of the list)


def pytest_collection_modifyitems(config, items):
    workers = getattr(config, 'workerinput', {}).get('workercount', 1)
    if workers < 2 or len(items) < 2 * workers: return
    units = {}   # (file, test or None): its tests, in collection order
    for it in items:
        name = it.path.name
        units.setdefault((name, it if name in EACH_TEST_SECONDS else None), []).append(it)
    longest = sorted((k for k in units if _seconds(*k)), key=lambda k: _seconds(*k), reverse=True)
    shares, load = [[] for _ in range(workers)], [0] * workers
    for k in longest:   # each to the worker with the least so far
        w = min(range(workers), key=lambda w: (load[w], w))
        shares[w] += units[k]; load[w] += _seconds(*k)
    # xdist hands worker w the w-th contiguous run of len(items) // workers tests (the last one the rest): a share is
    # its long tests, then short files up to exactly that length (one file may be cut between two shares)
    short = [it for k in units if not _seconds(*k) for it in units[k]]
    size = len(items) // workers
    for w in range(workers - 1):
        n = max(0, size - len(shares[w]))
        shares[w] += short[:n]; del short[:n]
    shares[-1] += short
    items[:] = [it for share in shares for it in share]


@pytest.fixture
def lock_holder():
    """`.hold(folder)`: another process (a fork of this one, at once) takes the training run lock of `folder` and keeps
    it; returns its process id. `.kill(pid)` ends it with SIGKILL, so its lock ends only as the operating system's does
    (every holder left is killed after the test)."""
    from types import SimpleNamespace
    pids = []
    def hold(folder):
        from sd_intro.training import run_lock
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                with run_lock(folder):
                    os.write(w, b'held'); os.close(w)
                    signal.pause()
            finally: os._exit(1)
        os.close(w)
        with os.fdopen(r, 'rb') as f: said = f.read(4)
        pids.append(pid)
        assert said == b'held', f"the holder did not take the lock of {folder}"
        return pid
    def kill(pid):
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); pids.remove(pid)
    yield SimpleNamespace(hold=hold, kill=kill)
    for pid in list(pids): kill(pid)


@pytest.fixture
def cpu_indexed():
    "Marks a CPU tensor (a schedule) so that an index on another device fails as it does on CUDA; with the UNet and batch on "
    "the 'meta' device this stands in for a GPU run on a machine without one."
    import torch

    class CPUIndexed(torch.Tensor):
        def __getitem__(self, i):
            if torch.is_tensor(i) and i.device.type != 'cpu' and i.device != self.device:   # (torch's rule on CUDA)
                raise RuntimeError('indices should be either on cpu or on the same device as the indexed tensor (cpu)')
            return torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), i)
    return lambda t: t.as_subclass(CPUIndexed)


@pytest.fixture
def on_meta(pipe):
    "The embedded UNet and a batch (latents, text states) on the 'meta' device: shapes without data, a GPU's stand-in."
    import copy, torch
    from types import SimpleNamespace
    return SimpleNamespace(unet=copy.deepcopy(pipe.unet).to('meta'), latents=torch.zeros(2, 4, 8, 8, device='meta'),
                           cond=torch.zeros(2, 7, pipe.unet.config.cross_attention_dim, device='meta'))
