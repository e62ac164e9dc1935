import os
import sys

import pytest

# Tests never reach the Hub or a wandb server: fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, here and in every subprocess: the tiny test models run several times faster on one thread than on
# two that contend for a small machine's cores (a test of the thread setting itself sets the count it needs).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported by a plugin before this file: the variable came too late for this process
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def free_port() -> int:
    """A free local TCP port for `accelerate launch --main_process_port`: launches running at the same time would
    otherwise collide on the default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_processes_env(base: dict | None = None, **extra) -> dict:
    """The environment of a multi-process CPU launch (REFERENCE's ACCELERATE_USE_CPU=1 recipe), GPUs hidden: on a
    machine with fewer GPUs than processes accelerate's barrier addresses a missing GPU (train.py refuses that)."""
    return dict(base or os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)


def run_group(cmd: list[str], timeout: float, **kwargs):
    """subprocess.run in a session of its own: on timeout (a hung collective), the launcher's worker processes are
    killed with it instead of outliving the test."""
    with InBackground(cmd, timeout, **kwargs) as run:
        pass
    return run.result


class InBackground:
    """run_group's command, running while the test works on inside the with-block (on the core the command leaves);
    `.result`, its CompletedProcess, after the block. A block that fails kills the command's session."""

    def __init__(self, cmd: list[str], timeout: float, **kwargs):
        self.cmd, self.timeout, self.kwargs = cmd, timeout, kwargs

    def __enter__(self):
        import subprocess

        self.proc = warm_popen(self.cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **self.kwargs)
        return self

    def __exit__(self, exc_type, exc, tb):
        import signal
        import subprocess

        try:
            if exc_type is None:
                out, err = self.proc.communicate(timeout=self.timeout)
                self.result = subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err)
        finally:
            if self.proc.poll() is None:  # the block failed, or the command ran past its timeout
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.communicate()


# ---- `python ...` commands forked from a warm interpreter ----------------------------------------------------------
# A command of the suite spends ~5 s importing torch, transformers and accelerate before its first line of work, and
# the suite runs ~60 of them. Forked from multiprocessing's forkserver, which imported those once, a command starts
# in well under a second. The child is still a process of its own: its own session, cwd, environment, arguments,
# pipes, signals and exit status (as subprocess.Popen reports them). Our package, datasets and the rest it imports
# itself, so their import-time settings (a log file's progress bars) still apply. A command that must start from
# nothing (a test of the interpreter's start, such as sys.path) keeps subprocess.
WARM_PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation", "accelerate",
                "safetensors.torch"]


class _Fd:
    """A file descriptor that travels to the forked child: multiprocessing's fd passing, turned back into the child's
    fd number by methodcaller (the child needs nothing of this file to unpickle it)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        import operator
        from multiprocessing import reduction

        return operator.methodcaller("detach"), (reduction.DupFd(self.fd),)


def _warm_main(cmd: list[str], cwd: str | None, env: dict, fds: list) -> None:
    """In the forked child: become `python *cmd` (a script, -m module or -c code) with these fds as 0, 1 and 2."""
    import atexit
    import runpy
    import traceback

    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    sys.stdin = open(0, closefd=False)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # lines, as -u would
    if cwd:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    args = [a for a in cmd[1:] if a not in ("-u", "-I")]
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        atexit._run_exitfuncs()


class WarmPopen:
    """subprocess.Popen's interface (the part the tests use) for a command forked by _warm_main."""

    _context = None

    def __init__(self, cmd, stdin=None, stdout=None, stderr=None, text=False, universal_newlines=False, cwd=None,
                 env=None, start_new_session=True):
        import inspect
        import multiprocessing
        import subprocess

        if WarmPopen._context is None:
            WarmPopen._context = multiprocessing.get_context("forkserver")
            WarmPopen._context.set_forkserver_preload(WARM_PRELOAD)
        self.args, self.returncode, text = cmd, None, text or universal_newlines
        ours, theirs = {}, []  # our ends of the pipes; the child's fds 0, 1, 2
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                ours[i], child = (w, r) if i == 0 else (r, w)
            elif spec == subprocess.STDOUT:
                child = theirs[1]
            elif spec == subprocess.DEVNULL:
                child = os.open(os.devnull, os.O_RDWR)
            else:
                child = spec.fileno() if hasattr(spec, "fileno") else (i if spec is None else spec)
            theirs.append(child)
        # the child runs _warm_main from its source: the forkserver cannot import this file (not on its sys.path)
        code = f"import os, sys\n{inspect.getsource(_warm_main)}\n_warm_main(cmd, cwd, env, fds)\n"
        self._proc = WarmPopen._context.Process(target=exec, args=(code, {
            "__name__": "__warm__", "cmd": list(cmd), "cwd": cwd and str(cwd),
            "env": dict(os.environ if env is None else env), "fds": [_Fd(fd) for fd in theirs]}))
        self._proc.start()
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec in (subprocess.PIPE, subprocess.DEVNULL):
                os.close(theirs[i])
        self.pid, self._jobs = self._proc.pid, None
        mode = {0: "w", 1: "r", 2: "r"}
        self.stdin, self.stdout, self.stderr = (
            (open(ours[i], mode[i] + ("" if text else "b"), buffering=1 if text and i == 0 else -1) if i in ours
             else None) for i in range(3))

    def poll(self):
        if self.returncode is None and not self._proc.is_alive():
            self._proc.join()
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout=None):
        import subprocess

        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self):
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        """Feed stdin, read stdout and stderr to their ends (threads, so that no pipe fills), wait for the exit. After
        a timeout, a second call goes on with the same threads (as Popen's does)."""
        import subprocess
        import threading

        if self._jobs is None:
            self._out = {}
            self._jobs = [threading.Thread(target=_read_all, args=(f, self._out, i), daemon=True)
                          for i, f in ((1, self.stdout), (2, self.stderr)) if f]
            if self.stdin:
                self._jobs.append(threading.Thread(target=_write_all, args=(self.stdin, input), daemon=True))
            for job in self._jobs:
                job.start()
        for job in self._jobs:
            job.join(timeout)
            if job.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        return self._out.get(1), self._out.get(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.stdin, self.stdout, self.stderr):
            if f:
                f.close()
        self.wait()


def _read_all(f, out: dict, key: int) -> None:
    out[key] = f.read()
    f.close()


def _write_all(f, data) -> None:
    try:
        if data:
            f.write(data)
    finally:
        f.close()


def warm_popen(cmd, **kwargs):
    """subprocess.Popen, forked warm when the command is `sys.executable ...` (see WarmPopen)."""
    import subprocess

    return (WarmPopen if cmd[0] == sys.executable else subprocess.Popen)(cmd, **kwargs)


def warm_run(cmd, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run, forked warm when the command is `sys.executable ...`."""
    import subprocess

    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with warm_popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton state: reset it after
    the test (a module uses it with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A small character-level dataset prepared from the first 120 KB of the shipped Shakespeare."""
    import json as _json
    import lzma

    from nanogpt_hf.data import PrepareSettings, prepare

    root = tmp_path_factory.mktemp("data")
    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanogpt_hf", "assets",
                          "shakespeare.jsonl.xz")
    with lzma.open(corpus, "rt") as fh:
        text = _json.loads(fh.readline())["text"][:120_000]
    (root / "play.txt").write_text(text)
    return prepare(PrepareSettings(source=str(root / "play.txt"), tokenizer="char", out=str(root / "char")))
