"""Jupyter kernels that start with torch already imported: forks of a server that imported it once.

`make test` runs every lesson top to bottom in a fresh kernel, side by side on one core each, and a kernel's first
seconds go to importing torch (with `torch._dynamo`, which diffusers imports) and the parts of scipy that transformers
imports: about 8 s of one core, nine times. A fork server pays that once per test worker; each kernel is a fork of it,
started by the same ipykernel with the same arguments, environment and working folder, so every cell runs as committed
and prints what it prints in a plain kernel.

Only modules that do not look at their surroundings when imported are imported before the fork: torch, numpy, scipy
and ipykernel's own modules. Whatever decides between a notebook and a terminal at import time (fastcore's `IN_NOTEBOOK`,
`tqdm.auto`, matplotlib's backend) and whatever reads the Hub's settings (huggingface_hub, transformers, diffusers, the
course) is first imported by the lesson, inside the kernel, as in a student's.

    with WarmKernels(env) as warm:            # env: the kernels' environment (the server imports torch under it)
        NotebookClient(nb, kernel_manager_class=warm.manager_class()).execute(env=env)

How a kernel is started: where jupyter_client would run `python -m ipykernel_launcher ARGS`, it runs
`python warm_kernel.py kernel SOCKET python -m ipykernel_launcher ARGS`; that process asks the server for a fork, which
runs the launcher module as `-m` would (same arguments, environment and working folder), and lives exactly as long as
the fork does (it passes on SIGINT and SIGTERM; when it is killed, the fork ends too: each watches the socket between
them).
"""
from __future__ import annotations
import json, os, signal, socket, subprocess, sys, tempfile, threading
from pathlib import Path

# Linux only: macOS forbids forking a process that has loaded its system frameworks (torch does), Windows cannot fork
SUPPORTED = sys.platform.startswith('linux')
UNSUPPORTED = f"warm kernels fork a process, which is safe on Linux only (this is {sys.platform}): the lessons run in plain kernels"
WARM = ('numpy', 'torch', 'torch._dynamo', 'scipy.optimize', 'scipy.stats', 'scipy.spatial.transform',   # once, before any fork
        'ipykernel.kernelapp')


def _read_line(conn) -> bytes:
    buf = b''
    while not buf.endswith(b'\n'):
        part = conn.recv(65536)
        if not part: break
        buf += part
    return buf


def _kernel_child(conn, request: dict):
    "In the fork: become the kernel process jupyter_client asked for, as `python -m MODULE ARGS` would (never returns)."
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # the server ignores its children's ends; a kernel waits for its own
        os.setsid()
        os.environ.clear(); os.environ.update(request['env'])
        os.chdir(request['cwd'])
        sys.path[0] = request['cwd']                    # `-m` puts the working folder first (the launcher takes it out)
        def exit_with_client():                          # the kernel process jupyter_client knows ended (or was killed)
            while conn.recv(64): pass
            os._exit(1)
        threading.Thread(target=exit_with_client, daemon=True).start()
        import runpy
        sys.argv = [request['module'], *request['argv']]  # runpy puts the module's file first, as `-m` does
        runpy.run_module(request['module'], run_name='__main__', alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:
        import traceback; traceback.print_exc()
    finally:
        os._exit(code)


def serve(path: str):
    "Import `WARM`, then fork a kernel for each request on the Unix socket `path`; end with the process that started us."
    import importlib
    for m in WARM: importlib.import_module(m)
    if threading.active_count() > 1: raise SystemExit(f"warm_kernel: {threading.active_count()} threads after the imports; "
                                                      "a fork of a threaded process is not safe")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # the kernels are reaped as they end
    parent = os.getppid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path); srv.listen(8); srv.settimeout(1.0)
    print('ready', flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY); os.dup2(devnull, 1); os.close(devnull)   # no one reads the pipe from here on
    while os.getppid() == parent:
        try: conn, _ = srv.accept()
        except socket.timeout: continue
        conn.settimeout(None)
        request = json.loads(_read_line(conn))
        pid = os.fork()
        if pid == 0:
            srv.close()
            _kernel_child(conn, request)
        conn.sendall(f'{pid}\n'.encode()); conn.close()


def kernel(path: str, cmd: list[str]):
    """The kernel process jupyter_client starts for its command `cmd` (`python -m ipykernel_launcher ARGS`): a fork of the
    server runs it, and this process lives as long as the fork does. Any other command runs as it is."""
    if len(cmd) < 3 or cmd[1] != '-m' or os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
        os.execv(cmd[0], cmd)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = {'module': cmd[2], 'argv': cmd[3:], 'env': dict(os.environ), 'cwd': os.getcwd()}
    conn.sendall((json.dumps(request) + '\n').encode())
    pid = int(_read_line(conn))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: os.kill(pid, s))
    while conn.recv(64): pass                            # the fork holds the other end until it ends
    sys.exit(0)


class WarmKernels:
    "A fork server for kernels in the environment `env` (`with WarmKernels(env) as w`: nbclient's kernel_manager_class=w.manager_class())."
    def __init__(self, env: dict):
        self.env, self.proc = dict(env), None

    def __enter__(self):
        if not SUPPORTED: raise RuntimeError(UNSUPPORTED)
        self.dir = tempfile.mkdtemp(prefix='warm-kernel-')
        self.path = os.path.join(self.dir, 'socket')
        self.proc = subprocess.Popen([sys.executable, __file__, 'serve', self.path], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()   # after the imports
        if line.strip() != 'ready':
            self.close()
            raise RuntimeError(f"the warm kernel server did not start (exit status {self.proc.poll()})")
        return self

    def manager_class(self):
        "A jupyter_client KernelManager class whose kernels are forks of this server (nbclient's `kernel_manager_class`)."
        from jupyter_client.manager import KernelManager
        path = self.path
        class WarmKernelManager(KernelManager):
            def format_kernel_cmd(self, extra_arguments=None):   # jupyter_client's own command, run by a fork
                return [sys.executable, __file__, 'kernel', path, *super().format_kernel_cmd(extra_arguments)]
        return WarmKernelManager

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        if self.proc and self.proc.stdout: self.proc.stdout.close()
        for p in (getattr(self, 'path', None), getattr(self, 'dir', None)):
            if p and os.path.exists(p): (os.unlink if p == self.path else os.rmdir)(p)

    def __exit__(self, *exc): self.close()


if __name__ == '__main__':
    if sys.argv[1:2] == ['serve']: serve(sys.argv[2])
    elif sys.argv[1:2] == ['kernel']: kernel(sys.argv[2], sys.argv[3:])
    else: raise SystemExit(f"usage: python {Path(__file__).name} serve SOCKET | kernel SOCKET PYTHON -m MODULE ARGS...")
