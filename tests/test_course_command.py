"""The README's first command, `make course`, run as a student runs it (as root too, the way CI and Docker run it).

Starts `make course` with JUPYTER_ARGS giving a free port, a token and --no-browser, waits until JupyterLab answers,
opens lesson 1 through the server's contents API, starts a kernel through the server's kernel API, executes lesson 1's
code cells in it over the kernel's websocket up to its first picture, and stops the server (always, even on failure).

It must not install anything: it runs only when the venv's install stamp is up to date (`make test` makes it so);
otherwise it is skipped, except under CI, where that is a failure. Start times go to tests/out/course_start.json.
"""
import json, os, re, secrets, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
STAMP = VENV / '.sd_intro-installed'
SKIP_FLAGS = {'gpu', 'slow', 'notest'}
MAX_CELLS = 15          # lesson 1's first picture comes within its first code cells


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _make_args() -> list:
    "`make course`, naming the venv only when the tests do not run in the default one (.venv of this checkout)."
    return [] if VENV.resolve() == (ROOT / '.venv').resolve() else [f'VENV={VENV}']


def _require_stamp():
    "Skip (under CI: fail) unless `make course` would start at once, without installing."
    r = subprocess.run(['make', '-q', *_make_args(), str(STAMP)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 0: return
    why = f"{VENV} has no up-to-date install stamp ({STAMP.name}), so `make course` would install first: run `make install`"
    if os.environ.get('CI'): pytest.fail(why)
    pytest.skip(why)


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r: return json.loads(r.read() or b'null')


def _call(url, method, body=None, timeout=30):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=timeout) as r: return json.loads(r.read() or b'null')


def _tail(path: Path, n=4000) -> str:
    return path.read_text(errors='replace')[-n:] if path.exists() else ''


def _flags(src: str) -> set:
    return {w for line in src.splitlines() if line.startswith('#|') for w in line[2:].split()}


def _execute(ws, code: str, timeout=600) -> list:
    "Run `code` in the kernel behind websocket `ws`; return its outputs (iopub messages); fail on an error."
    import websocket
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({'header': {'msg_id': msg_id, 'msg_type': 'execute_request', 'username': 'test',
                                   'session': uuid.uuid4().hex, 'version': '5.3', 'date': ''},
                        'parent_header': {}, 'metadata': {}, 'channel': 'shell', 'buffers': [],
                        'content': {'code': code, 'silent': False, 'store_history': True, 'user_expressions': {},
                                    'allow_stdin': False, 'stop_on_error': True}}))
    outputs, reply, idle, deadline = [], None, False, time.monotonic() + timeout
    while not (reply and idle):
        if time.monotonic() > deadline: pytest.fail(f"cell ran past {timeout} s:\n{code}")
        ws.settimeout(max(1., deadline - time.monotonic()))
        try: msg = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException: pytest.fail(f"cell ran past {timeout} s:\n{code}")
        if msg.get('parent_header', {}).get('msg_id') != msg_id: continue
        kind = msg['header']['msg_type']
        if kind == 'execute_reply': reply = msg['content']
        elif kind == 'status' and msg['content']['execution_state'] == 'idle': idle = True
        elif kind in ('stream', 'display_data', 'execute_result', 'error'): outputs.append(msg)
    if reply['status'] != 'ok':
        pytest.fail(f"cell failed in the server's kernel: {reply.get('ename')}: {reply.get('evalue')}\n{code}\n"
                    + '\n'.join(reply.get('traceback', []))[-3000:])
    return outputs


def test_make_course_serves_lesson_one(tmp_path):
    _require_stamp()
    import websocket   # websocket-client: a dependency of jupyter_server
    port, token = _free_port(), secrets.token_hex(16)
    jargs = f'--no-browser --port={port} --ServerApp.port_retries=0 --IdentityProvider.token={token}'
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path / 'config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path / 'runtime'),
           'JUPYTER_DATA_DIR': str(tmp_path / 'data'), 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    env.pop('SD_INTRO_MODEL', None)   # the embedded model
    log, base, q = tmp_path / 'course.log', f'http://127.0.0.1:{port}', f'token={token}'
    t0 = time.monotonic()
    with open(log, 'w') as f:
        proc = subprocess.Popen(['make', 'course', *_make_args(), f'JUPYTER_ARGS={jargs}'], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    kernel = None
    try:
        deadline = time.monotonic() + 600   # seconds on a quiet machine; minutes on a loaded one
        while True:
            if proc.poll() is not None: pytest.fail(f"`make course` exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline: pytest.fail(f"JupyterLab did not answer within 600 s:\n{_tail(log)}")
            try:
                _get(f'{base}/api/status?{q}', timeout=2); break
            except OSError: time.sleep(0.5)
        started = time.monotonic() - t0
        out = _tail(log)
        assert 'installed into' not in out, f"`make course` reinstalled although its stamp was fresh:\n{out}"
        assert 'ssh -N -L' in out, f"`make course` did not say how to reach it over SSH:\n{out}"
        # as root (CI, Docker) the server only answers when `make course` passed --allow-root

        # lesson 1, as the browser gets it: the contents API of the server started in nbs/
        listing = _get(f'{base}/api/contents/?{q}')['content']
        lesson = next((c['path'] for c in sorted(listing, key=lambda c: c['path']) if re.match(r'01_.*\.ipynb$', c['path'])), None)
        assert lesson, f"no lesson 1 (01_*.ipynb) in the server's root: {[c['path'] for c in listing]}"
        nb = _get(f'{base}/api/contents/{lesson}?{q}&content=1', timeout=30)['content']
        cells = [c['source'] for c in nb['cells'] if c['cell_type'] == 'code']
        cells = [c for c in cells if not (_flags(c) & SKIP_FLAGS)][:MAX_CELLS]

        kernel = _call(f'{base}/api/kernels?{q}', 'POST', {'name': 'python3'})['id']
        ws = websocket.create_connection(f'ws://127.0.0.1:{port}/api/kernels/{kernel}/channels?{q}', timeout=600)  # the server answers once the kernel is ready: seconds, minutes on a loaded machine
        ran, picture = 0, False
        try:
            for src in cells:
                outs = _execute(ws, src)
                ran += 1
                if any('image/png' in o['content'].get('data', {}) for o in outs): picture = True; break
        finally: ws.close()
        assert picture, f"no picture in lesson 1's first {ran} code cells run through the server's kernel"
        OUT = ROOT / 'tests' / 'out'
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / 'course_start.json').write_text(json.dumps(
            {'server_answered_s': round(started, 1), 'cells_to_first_picture': ran, 'lesson': lesson,
             'root': os.geteuid() == 0, 'total_s': round(time.monotonic() - t0, 1)}, indent=1))
        print(f"make course answered after {started:.1f} s; {lesson}: {ran} cells to its first picture")
    finally:
        for url, method in ([(f'{base}/api/kernels/{kernel}?{q}', 'DELETE')] if kernel else []) + [(f'{base}/api/shutdown?{q}', 'POST')]:
            try: _call(url, method, timeout=10)
            except Exception: pass
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=20)
