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
# Each pytest-xdist worker its own copy of checkpoints' model code (transformers copies it per folder name, unlocked)
if "PYTEST_XDIST_WORKER" in os.environ and "HF_MODULES_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf_modules_{os.environ['PYTEST_XDIST_WORKER']}_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

from warm import warm_popen  # noqa: E402  (after the settings above: its forkserver starts with them)


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
