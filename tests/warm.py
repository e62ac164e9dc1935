"""`python ...` commands of the tests, forked from a warm interpreter instead of started from nothing.

A command spends ~5 s importing torch, transformers and accelerate before its first line of work, and the suite runs
~45 of them. multiprocessing's forkserver imports those once (per pytest worker); each command is a fork of it, so it
starts in well under a second. The child is still a process of its own, with its own session, cwd, environment,
arguments, pipes, signals and exit status, as subprocess.Popen reports them. It imports our package, datasets and the
rest itself, so their import-time settings (a log file's progress bars) still apply. Where the interpreter's own
start matters (a flag other than -u, or a setting read while torch or the Hub library is imported), a command starts
from nothing, through subprocess.
"""

import atexit
import os
import subprocess
import sys
import threading
import time

PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation", "accelerate",
           "safetensors.torch"]
# settings read as the interpreter (PYTHON*, but for the two the child applies itself), torch or the Hub library
# start: a command that changes one starts from nothing (libraries set others at run time, HF_XET_* for one)
STARTUP = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_MODULES_CACHE",
           "TRANSFORMERS_OFFLINE")
CHILD_APPLIES = ("PYTHONUNBUFFERED", "PYTHONPATH")
SERVER_ENV = dict(os.environ)  # the environment the forkserver starts with (as conftest left it)


class _Fd:
    """A file descriptor for the child: sent by multiprocessing's fd passing, unpickled there into its fd number by
    methodcaller (nothing of this module is imported in the child)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        import operator
        from multiprocessing import reduction

        return operator.methodcaller("detach"), (reduction.DupFd(self.fd),)


def _child(cmd: list[str], cwd: str | None, env: dict, fds: list[int]) -> None:
    """In the forked child: become `python [-u] SCRIPT|-c CODE|-m MODULE ARGS` with these fds as 0, 1 and 2."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    args = cmd[1:]
    unbuffered = args[0] == "-u" or bool(env.get("PYTHONUNBUFFERED"))
    args = args[1:] if args[0] == "-u" else args
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if unbuffered else -1, closefd=False)  # a pipe: blocks, unless -u
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if cwd:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit:
        raise
    except KeyboardInterrupt:  # as the interpreter: ended by the signal
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1)
    finally:  # the interpreter's exit: its threads joined, then atexit; multiprocessing then flushes and _exits
        threading._shutdown()
        atexit._run_exitfuncs()


def _starts_warm(cmd: list[str], env: dict) -> bool:
    """A command the forkserver's child can be: the interpreter with at most -u, and the start-up settings it has."""
    args = cmd[1:2] if cmd[1:2] != ["-u"] else cmd[2:3]
    return (cmd[0] == sys.executable and bool(args) and (args[0] in ("-c", "-m") or not args[0].startswith("-"))
            and _startup(env) == _startup(SERVER_ENV))


def _startup(env: dict) -> dict:
    return {k: v for k, v in env.items() if k in STARTUP or k.startswith("PYTHON") and k not in CHILD_APPLIES}


class WarmPopen:
    """subprocess.Popen's interface (what the tests use of it) for a command forked from the warm interpreter."""

    _context, _started = None, []

    @classmethod
    def context(cls):
        if cls._context is None:
            import multiprocessing
            from multiprocessing import forkserver

            cls._context = multiprocessing.get_context("forkserver")
            cls._context.set_forkserver_preload(PRELOAD)
            environ = dict(os.environ)
            os.environ.clear()
            os.environ.update(SERVER_ENV)  # not a test's monkeypatched variables
            try:
                forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(environ)
            atexit.register(cls.kill_leftovers)  # before multiprocessing's own exit handler joins them
        return cls._context

    @classmethod
    def kill_leftovers(cls):  # commands a failed test left running
        for proc in cls._started:
            try:
                os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):  # ended
                pass

    def __init__(self, cmd, stdin=None, stdout=None, stderr=None, text=False, universal_newlines=False, cwd=None,
                 env=None, start_new_session=True):
        import inspect

        self.args, self.returncode, self._jobs, text = cmd, None, None, text or universal_newlines
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
        # the child compiles _child from its source: unpickling a function of this file would import it (and pytest)
        code = f"import os, sys\n{inspect.getsource(_child)}\n_child(cmd, cwd, env, fds)\n"
        self._proc = self.context().Process(target=exec, args=(code, {
            "__name__": "__warm__", "cmd": list(cmd), "cwd": cwd and str(cwd),
            "env": dict(os.environ if env is None else env), "fds": [_Fd(fd) for fd in theirs]}))
        self._proc.start()
        WarmPopen._started.append(self._proc)
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec in (subprocess.PIPE, subprocess.DEVNULL):
                os.close(theirs[i])
        self.pid = self._proc.pid
        modes = ("w", "r", "r")
        self.stdin, self.stdout, self.stderr = (
            open(ours[i], modes[i] + ("" if text else "b"), buffering=1 if text and i == 0 else -1) if i in ours
            else None for i in range(3))

    def poll(self):
        if self.returncode is None and not self._proc.is_alive():
            self._proc.join()
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended since
                pass

    def terminate(self):
        self.send_signal(15)

    def kill(self):
        self.send_signal(9)

    def communicate(self, input=None, timeout=None):
        """Feed stdin, read stdout and stderr to their ends (threads: no pipe fills up), wait for the exit; all
        within `timeout`. After a timeout, a second call goes on with the same threads, as Popen's does."""
        if self._jobs is None:
            self._out = {}
            self._jobs = [threading.Thread(target=_read_all, args=(f, self._out, i), daemon=True)
                          for i, f in ((1, self.stdout), (2, self.stderr)) if f]
            if self.stdin:
                self._jobs.append(threading.Thread(target=_write_all, args=(self.stdin, input), daemon=True))
            for job in self._jobs:
                job.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self._jobs:
            job.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if job.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._out.get(1), self._out.get(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._jobs is None or not any(job.is_alive() for job in self._jobs):  # else readers still hold them
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
    except BrokenPipeError:  # the command ended without reading it all
        pass
    finally:
        try:
            f.close()
        except BrokenPipeError:
            pass


def warm_popen(cmd, **kwargs):
    """subprocess.Popen, forked from the warm interpreter where the command allows it (_starts_warm)."""
    env = kwargs.get("env")
    return (WarmPopen if _starts_warm(cmd, os.environ if env is None else env) else subprocess.Popen)(cmd, **kwargs)


def warm_run(cmd, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run, forked from the warm interpreter where the command allows it. On a timeout the command's
    session is killed, as subprocess.run kills its process."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    kwargs.setdefault("start_new_session", True)
    with warm_popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res
