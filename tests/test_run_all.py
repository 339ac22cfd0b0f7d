"""Run All on a laptop: every lesson, executed exactly as committed, must finish without an error.

Each lesson runs top to bottom in a fresh kernel through nbclient (not nbdev's runner: no cell is skipped and no tag
is honoured), with CUDA hidden, the Hugging Face Hub offline and the kernel's working folder in nbs/, as on a laptop
without a GPU or internet. Cells for a real checkpoint must skip themselves there with one printed line, and no cell
may print warning spam. The kernel is a fork of a process that has already imported torch and scipy
(tools/warm_kernel.py: about 8 s of one core saved per lesson); the tests at the end check that it is otherwise the
kernel a student gets. `make render` uses the same execution (tools/render.py) to write the outputs that are
committed; tests/test_notebooks.py leaves the lessons to this test, so each notebook runs once in `make test`.
"""
import os, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import render  # noqa: E402
import warm_kernel  # noqa: E402

SKIP_LINE = 'skipped: needs a CUDA GPU'
# what a student must not have to read through: library warnings that are not about their code, and progress bars
SPAM = re.compile(r"No LoRA keys associated|torchvision|it/s\]|s/it\]|\d+%\|[█▏▎▍▌▋▊▉ ]*\||Loading pipeline components|"
                  r"Map: |Fetching \d+ files|UserWarning|FutureWarning|DeprecationWarning")


def stream_text(cell) -> str:
    return ''.join(''.join(o.get('text', '')) for o in cell.get('outputs', []) if o.get('output_type') == 'stream')


def shown_text(cell) -> str:
    "Printed text and the text of displayed widgets (a progress bar is a widget whose text GitHub shows)."
    return stream_text(cell) + ''.join(''.join(o['data'].get('text/plain', '')) + '\n' for o in cell.get('outputs', [])
                                       if o.get('output_type') == 'display_data' and
                                       'application/vnd.jupyter.widget-view+json' in o.get('data', {}))


def spam_in(nb) -> list[str]:
    "'cell N: line' for every output line of `nb` that is warning or progress-bar spam."
    return [f"cell {i}: {line[:200]}" for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code'
            for line in shown_text(c).splitlines() if SPAM.search(line)]


def kernel_threads():
    return 1 if os.environ.get('PYTEST_XDIST_WORKER') else None   # side by side with other tests: a core each


@pytest.fixture(scope='session')   # (not per module: `make test` deals the lessons out among other files' tests)
def warm():
    "Kernels forked from a process that has imported torch, in the lessons' environment (Linux; elsewhere None: plain kernels)."
    if not warm_kernel.SUPPORTED: yield None; return
    with warm_kernel.WarmKernels(render.kernel_env(threads=kernel_threads())) as w:
        yield w


needs_warm = pytest.mark.skipif(not warm_kernel.SUPPORTED, reason=warm_kernel.UNSUPPORTED)


def test_there_are_lessons():
    assert len(render.lessons()) >= 4, render.lessons()


@pytest.mark.parametrize('nb', render.lessons(), ids=lambda p: p.stem)
def test_lesson_runs_as_committed_without_a_gpu(nb, warm):
    out, secs = render.execute(nb, threads=kernel_threads(), kernel_manager_class=warm and warm.manager_class())   # raises nbclient's CellExecutionError, naming the cell, on any error
    gpu = [c for c in out['cells'] if c['cell_type'] == 'code' and re.search(r'^#\|\s*gpu', ''.join(c['source']), re.M)]
    for c in gpu:
        text = stream_text(c).strip()
        assert text.startswith(SKIP_LINE) and '\n' not in text and not any('data' in o for o in c['outputs']), \
            f"{nb.name}: a `#| gpu` cell ran or said more than one line without a GPU:\n{''.join(c['source'])}\n---\n{text}"
    assert not spam_in(out), f"{nb.name}: warning or progress spam in the outputs:\n" + '\n'.join(spam_in(out))


# ---- the warm kernels are the kernels a student gets, but for torch already in memory ----------------------------------
FIRST_CELL = """import os, sys
print(sorted(m for m in ('torch', 'numpy', 'scipy') if m in sys.modules))
print(sorted(m for m in ('fastcore', 'tqdm.auto', 'matplotlib', 'huggingface_hub', 'transformers', 'diffusers', 'sd_intro')
             if m in sys.modules), sys.path, [a if not a.endswith('.json') else 'CONNECTION' for a in sys.argv], os.getcwd(),
      sorted(os.environ), os.environ['HF_HUB_OFFLINE'], repr(os.environ['CUDA_VISIBLE_DEVICES']))"""
SECOND_CELL = """import torch, tqdm.auto, tqdm.notebook
from fastcore.imports import IN_NOTEBOOK
print(IN_NOTEBOOK, issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm), __name__, torch.get_num_threads(), torch.cuda.is_available())"""


def kernel_says(kernel_manager_class=None) -> tuple[str, str]:
    "What the two cells above print in a kernel started by `kernel_manager_class` (default: a plain one)."
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(FIRST_CELL), nbformat.v4.new_code_cell(SECOND_CELL)])
    out, _ = render.execute(nb, threads=kernel_threads(), kernel_manager_class=kernel_manager_class)
    return tuple(stream_text(c).strip() for c in out['cells'])


@needs_warm
def test_a_warm_kernel_is_a_students_kernel_with_torch_imported(warm):
    warm_says, plain_says = kernel_says(warm.manager_class()), kernel_says()
    (loaded, first), second = warm_says[0].split('\n'), warm_says[1]
    # torch came warm; nothing that decides notebook-or-terminal when imported, nor the Hub's settings, came before the fork;
    # the rest is as in a plain kernel: sys.path, arguments, working folder, environment, and what the lesson's imports see
    assert loaded == "['numpy', 'scipy', 'torch']" and plain_says[0].split('\n')[0] == '[]', (loaded, plain_says)
    assert (first, second) == (plain_says[0].split('\n')[1], plain_says[1]), (warm_says, plain_says)
    assert first.startswith("[] ['") and first.endswith("] 1 ''"), first
    threads = kernel_threads() or int(os.environ.get('OMP_NUM_THREADS', 0)) or None
    notebook, bar, name, n, cuda = second.split()
    assert (notebook, bar, name, cuda) == ('True', 'True', '__main__', 'False'), second
    if threads: assert int(n) == threads, second


def _kernel(warm):
    "A started warm kernel: (manager, client, the pid its cells run in)."
    km = warm.manager_class()(kernel_name='python3')
    km.start_kernel(env=render.kernel_env(threads=kernel_threads()), cwd=str(render.NBS))
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    out = []
    kc.execute_interactive('import os; print(os.getpid())', timeout=60,
                           output_hook=lambda m: out.append(m['content'].get('text', '')) if m['msg_type'] == 'stream' else None)
    return km, kc, int(''.join(out))


def _alive(pid) -> bool:
    try: os.kill(pid, 0); return True
    except ProcessLookupError: return False


@needs_warm
def test_a_warm_kernel_is_interrupted_and_ends_with_its_process(warm):
    import signal, time
    km, kc, pid = _kernel(warm)
    try:
        assert pid != km.provisioner.process.pid   # the cells run in the fork, not in the process jupyter_client started
        msg_id = kc.execute('import time; time.sleep(60)')
        time.sleep(1)   # SIGINT to the process jupyter_client started (a signal-mode interrupt, a Ctrl-C), passed on to the fork
        km.provisioner.process.send_signal(signal.SIGINT)
        reply = kc.get_shell_msg(timeout=20)
        assert reply['parent_header']['msg_id'] == msg_id and reply['content']['ename'] == 'KeyboardInterrupt', reply['content']
        km.provisioner.process.send_signal(signal.SIGKILL)   # no clean-up: the fork notices its process is gone
        end = time.time() + 20
        while _alive(pid) and time.time() < end: time.sleep(0.1)
        assert not _alive(pid), "the kernel's fork outlived the process jupyter_client started"
    finally:
        kc.stop_channels()
        if _alive(pid): os.kill(pid, signal.SIGKILL)
        km.cleanup_resources()
