"""Crash safety and exact resume (SIGKILL, SIGINT/SIGTERM, non-finite loss, failed saves), and bad inputs.

Every run here is the same tiny float32 model on a tiny character dataset, with dropout (so the RNG state matters)
and an evaluation + save every 4 steps. The reference is one straight run; every interrupted and resumed run must
end with bitwise-equal weights and optimizer state, and with the same metrics.jsonl (timings aside).

The random moments of the kill tests come from a seed printed on failure; RELIABILITY_SEED=N replays one and
RELIABILITY_KILLS=N kills the single-process run at N random moments instead of 1 (after its two fixed ones).
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanogpt_hf.checkpoint import latest_state, read_trainer_state, state_dirs
from nanogpt_hf.cli import bench_main, hf_main, prepare_main, sample_main, train_main
from nanogpt_hf.data import PrepareSettings, prepare
from conftest import cpu_processes_env, free_port
from warm import warm_popen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
MAX_ITERS = 16
TIMING = ("ms_per_iter", "tokens_per_s", "mfu")
STATE_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "config.json", "trainer_state.json"}


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton state."""
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def char_data(root):
    """A character-level dataset of 30,000 characters of the shipped Shakespeare (27,000 train / 3,000 val)."""
    import lzma

    with lzma.open(os.path.join(ROOT, "nanogpt_hf", "assets", "shakespeare.jsonl.xz"), "rt") as fh:
        text = json.loads(fh.readline())["text"][:30_000]
    (root / "play.txt").write_text(text)
    return prepare(PrepareSettings(source=str(root / "play.txt"), tokenizer="char", out=str(root / "char")))


def run_args(data, out, max_iters=MAX_ITERS, *extra):
    return [f"--dataset={data}", f"--out_dir={out}", f"--max_iters={max_iters}", "--lr_decay_iters=16",
            "--eval_interval=4", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-2",
            "--min_lr=1e-3", "--warmup_iters=2", "--dtype=float32", "--device=cpu", "--compile=false",
            "--sample_at_end=false", "--dropout=0.1", "--keep_states=2", "--always_save_checkpoint=true", *extra]


def train_in_process(*argv) -> int:
    try:
        return train_main(list(map(str, argv)))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def straight(root, char_data):
    """The reference: MAX_ITERS steps straight through, in this process."""
    out = root / "straight"
    assert train_in_process(*run_args(char_data, out)) == 0
    return out


def events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def tensors_equal(a, b) -> bool:
    import numpy as np

    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(reference, other, step=MAX_ITERS):
    """Bitwise-equal final weights (model folder and state), optimizer state, and the same logged losses."""
    for rel in ("model.safetensors", f"state/step-{step}/model.safetensors"):
        a, b = load_file(reference / rel), load_file(other / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs"
    a, b = (torch.load(d / f"state/step-{step}/optimizer.bin", weights_only=True) for d in (reference, other))
    assert tensors_equal(a, b), "optimizer state differs"
    ev_a, ev_b = events(reference), events(other)
    assert [e["iter"] for e in ev_b] == [e["iter"] for e in ev_a]  # every step logged once, nothing twice
    assert ev_a == ev_b


def snapshot(folder, skip=()) -> dict:
    """{relative path: sha256} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if not rel.startswith(tuple(skip)):
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def leftovers(out_dir):
    names = os.listdir(out_dir) + (os.listdir(os.path.join(out_dir, "state")) if os.path.isdir(
        os.path.join(out_dir, "state")) else [])
    return [n for n in names if n.startswith((".tmp", ".trash", ".write-test")) or ".tmp-" in n]


def assert_resumable_and_loadable(out_dir):
    """What a kill must leave: every visible state complete, and the model folder loads (once one was saved)."""
    states = state_dirs(str(out_dir))
    for _, path in states:
        assert STATE_FILES <= set(os.listdir(path)), f"incomplete state {path}: {os.listdir(path)}"
        json.loads(open(os.path.join(path, "trainer_state.json")).read())
    if not states:  # killed before the first checkpoint: the run is started again
        return None
    import nanogpt_hf  # noqa: F401  (registers the model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    AutoTokenizer.from_pretrained(out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return states[-1][0]


HOOKED = """
import os, sys, time
import nanogpt_hf.common as C
import nanogpt_hf.training as T
from nanogpt_hf.cli import train_main

PAUSE_AT = os.environ.get("PAUSE_AT", "")  # step:N (weights not yet stepped) or state:N (half written)
current = 0


def pause(where):
    print(f"PAUSED {where}", flush=True)  # the moment to kill at: nothing moves until then
    time.sleep(600)


def micro_batches(stream, s, step, *args):
    global current
    current = step + 1  # the step these batches make
    return real_batches(stream, s, step, *args)


def train_step(accelerator, model, optimizers, *args):
    if PAUSE_AT == f"step:{current}":  # after the forward and backward passes, before the optimizer step
        optimizers[0].step = lambda: pause(f"in step {current}")
    return real_step(accelerator, model, optimizers, *args)


def save_state(self, output_dir, **kwargs):
    real_save_state(self, output_dir, **kwargs)
    if PAUSE_AT.startswith("state:") and f"step-{PAUSE_AT[6:]}" in os.path.basename(output_dir):
        pause(f"in the save of state step-{PAUSE_AT[6:]}: weights, optimizer and RNG written, the rest not")


def fsync_tree(path):
    time.sleep(0.15)  # widen the window between writing a temporary copy and making it visible
    return real_fsync(path)


def remove(path):
    time.sleep(0.05)
    return real_remove(path)


real_batches, real_step, real_fsync, real_remove = T.micro_batches, T.train_step, C.fsync_tree, C.remove
T.micro_batches, T.train_step, C.fsync_tree, C.remove = micro_batches, train_step, fsync_tree, remove
real_save_state, T.Accelerator.save_state = T.Accelerator.save_state, save_state
sys.exit(train_main())
"""


def env(**extra):
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def run_until(cmd, trigger, act, log_path, timeout=240, **popen):
    """Start cmd, read its stdout lines until trigger(line) is true, then call act(proc). Returns (rc, stdout)."""
    with open(log_path, "w") as err:
        proc = warm_popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=popen.pop("env", env()),
                          **popen)
        watchdog = threading.Timer(timeout, kill_tree, (proc,))  # workers left behind would hold stdout open
        watchdog.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if trigger(line):
                    act(proc)
                    break
            lines += proc.stdout.read().splitlines(keepends=True)
            rc = proc.wait()
        finally:
            watchdog.cancel()
    return rc, "".join(lines)


def is_line(prefix, above):
    """A trigger: a log line '<prefix> N:' with N > above."""
    def trigger(line):
        line = line.strip()
        if not line.startswith(prefix + " "):
            return False
        n = line[len(prefix) + 1:].split(":", 1)[0]
        return n.isdigit() and int(n) > above
    return trigger


def sleep_then(seconds, fn):
    def act(proc):
        time.sleep(seconds)
        fn(proc)
    return act


def seeded():
    # not the random module's own state: set_seed in every in-process run has seeded it
    seed = int(os.environ.get("RELIABILITY_SEED", random.SystemRandom().randrange(1_000_000)))
    return seed, random.Random(seed)


# ---- 1. SIGKILL at fixed and random moments, one process ----------------------------------------------------------


def landed(line) -> bool:
    return line.startswith("PAUSED")


@pytest.mark.slow
def test_sigkill_at_fixed_and_random_moments_then_resume_is_bitwise_exact(char_data, straight, tmp_path):
    """`python train.py` killed with SIGKILL, each kill before the run ends: in a step (gradients computed, weights
    not stepped), in a save (half of the state written), then at a random moment (anywhere, or during a save slowed
    down to make the window wide); resumed after each, then to the end: the same weights, optimizer and losses as
    straight."""
    seed, rng = seeded()
    out = tmp_path / "killed"
    script = tmp_path / "hooked_train.py"
    script.write_text(HOOKED)
    fixed = [("step:6", 4), ("state:8", 4)]  # (where, the newest state it leaves)
    history = []
    for i in range(len(fixed) + int(os.environ.get("RELIABILITY_KILLS", 1))):
        at = latest_state(str(out)) and read_trainer_state(latest_state(str(out)))["step"] or 0
        resume = ["--init_from=resume"] if latest_state(str(out)) else []  # killed before a state: start again
        pause = f"step:{MAX_ITERS}"  # random kills: a pause before the last step keeps the run from ending first
        if i < len(fixed):
            (pause, expected), how = fixed[i], (landed, lambda p: p.kill())
            what = f"paused {pause}"
        elif rng.random() < 0.5 or at >= MAX_ITERS - 4:  # anywhere: after a random logged step, plus a random delay
            target = rng.randint(at, MAX_ITERS - 3)
            how = (is_line("iter", target), sleep_then(rng.uniform(0, 0.15), lambda p: p.kill()))
            what = f"after iter {target + 1}"
        else:  # during the evaluation/save that follows a 'step N:' line
            delay = rng.uniform(0, 0.7)
            how = (is_line("step", at), sleep_then(delay, lambda p: p.kill()))
            what = f"{delay:.2f}s into the save after the first eval past step {at}"
        rc, stdout = run_until([sys.executable, str(script), *run_args(char_data, out), *resume], *how,
                               log_path=tmp_path / f"stderr{i}.txt", cwd=tmp_path, env=env(PAUSE_AT=pause))
        history.append((what, rc))
        context = f"seed {seed}, kills {history}; stderr: {(tmp_path / f'stderr{i}.txt').read_text()[-2000:]}"
        assert rc == -signal.SIGKILL, context  # the kill landed: the run had not ended
        history[-1] = (what, rc, assert_resumable_and_loadable(out))
        if i < len(fixed):
            assert history[-1][2] == expected and ("state" not in pause or leftovers(out)), context
    assert train_in_process(*run_args(char_data, out), *(["--init_from=resume"] if latest_state(str(out)) else [])) == 0
    assert_same_run(straight, out)
    assert not leftovers(out), leftovers(out)
    assert len(state_dirs(str(out))) == 2  # keep_states


def test_new_run_over_a_run_with_states_is_refused_and_changes_nothing(char_data, straight, tmp_path, capsys):
    """Relaunching a recipe without --init_from=resume must not discard an earlier run's states: refused with one
    line naming both ways on, out_dir untouched, and the interrupted run still resumes exactly."""
    out = tmp_path / "interrupted"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "state" / f"step-{MAX_ITERS}")  # what a kill between the step-12 and step-16 saves leaves
    before = snapshot(out)
    capsys.readouterr()
    assert train_in_process(*run_args(char_data, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "holds the resumable states of an earlier run: continue it with --init_from=resume" in err
    assert snapshot(out) == before
    assert train_in_process(*run_args(char_data, out), "--init_from=resume") == 0
    assert_same_run(straight, out)


# ---- 2. two processes ---------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below pid (torch's launcher starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc):
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_two_processes_sigkill_and_sigterm_resume_exactly(char_data, tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py, three launches: a straight run;
    a run whose launcher and workers are all killed with SIGKILL at a random moment; its resume, stopped by a
    SIGTERM to the launcher at a random step. The state of that stop equals the straight run's state of the same
    step bitwise (weights and optimizer), and the logged losses up to it are equal. (Evaluating and saving at every
    step here makes a state of every step of the straight run to compare with; evaluation draws no randomness.)"""
    seed, rng = seeded()
    def launch():  # a free port each time, not accelerate's 29500: other launches may be running on this machine
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), TRAIN_PY]
    e = cpu_processes_env(env())
    args = [a for a in run_args(char_data, "unused")
            if not a.startswith(("--out_dir", "--gradient_acc", "--eval_interval"))]
    args += ["--gradient_accumulation_steps=2", "--eval_interval=1"]  # one micro-batch per process
    straight, run = tmp_path / "straight", tmp_path / "run"

    with ThreadPoolExecutor(1) as pool:  # the straight run and the killed one are independent: at the same time
        straight_run = pool.submit(run_until, launch() + [*args, f"--out_dir={straight}", "--keep_states=0"],
                                   lambda line: False, None, log_path=tmp_path / "stderr0.txt", env=e, timeout=300)
        target = rng.randint(1, MAX_ITERS // 2)
        rc, stdout = run_until(launch() + [*args, f"--out_dir={run}"], is_line("iter", target),
                               sleep_then(rng.uniform(0, 0.3), kill_tree), log_path=tmp_path / "stderr1.txt", env=e,
                               timeout=300)
        straight_rc, _ = straight_run.result()
    assert straight_rc == 0, (tmp_path / "stderr0.txt").read_text()[-3000:]
    assert len(state_dirs(str(straight))) == MAX_ITERS
    assert rc == -signal.SIGKILL, f"seed {seed}: {(tmp_path / 'stderr1.txt').read_text()[-3000:]}"
    time.sleep(0.5)
    killed_at = assert_resumable_and_loadable(run)
    assert killed_at and {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(latest_state(str(run))))

    target = rng.randint(killed_at + 1, MAX_ITERS - 3)
    rc, stdout = run_until(launch() + [f"--out_dir={run}", "--init_from=resume"], is_line("iter", target),
                           lambda p: p.send_signal(signal.SIGTERM), log_path=tmp_path / "stderr2.txt", env=e,
                           timeout=300)
    err = (tmp_path / "stderr2.txt").read_text()
    assert rc != 0 and "Traceback" not in stdout, f"seed {seed}: {err[-3000:]}"
    step = read_trainer_state(latest_state(str(run)))["step"]
    assert target < step <= MAX_ITERS, f"seed {seed}: {stdout[-2000:]}"  # the signal may take a step or two
    assert f"stopped by SIGTERM after step {step}" in stdout, stdout[-2000:]
    assert "--init_from=resume (under accelerate launch, 2 processes)" in stdout
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
        a, b = (torch.load(d / f"state/step-{step}" / name, weights_only=False) if name.endswith((".bin", ".pkl"))
                else load_file(d / f"state/step-{step}" / name) for d in (straight, run))
        assert tensors_equal(a, b), f"seed {seed}: {name} of step {step} differs"
    ev_a = [e for e in events(straight) if e["iter"] <= step and not (e["type"] == "eval" and e["iter"] == step)]
    assert ev_a == events(run)
    assert not leftovers(run)


# ---- 3. SIGINT / SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_says_how_to_resume(char_data, straight, tmp_path):
    seed, rng = seeded()
    out = tmp_path / "interrupted"
    target = rng.randint(1, MAX_ITERS - 3)
    rc, stdout = run_until([sys.executable, TRAIN_PY, *run_args(char_data, out)], is_line("iter", target),
                           lambda p: p.send_signal(signal.SIGINT), log_path=tmp_path / "stderr.txt", cwd=tmp_path)
    assert rc == 130, f"seed {seed}: {(tmp_path / 'stderr.txt').read_text()[-3000:]}"
    step = read_trainer_state(latest_state(str(out)))["step"]
    assert step > target  # the step running when the signal came was finished
    assert f"stopped by SIGINT after step {step}" in stdout
    assert f"--out_dir={out} --init_from=resume" in stdout
    assert train_in_process(*run_args(char_data, out), "--init_from=resume") == 0
    assert_same_run(straight, out)


def test_sigterm_in_process_during_a_step(char_data, straight, tmp_path, monkeypatch, capsys):
    import nanogpt_hf.training as T

    real, calls = T.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 5 of 16: the signal arrives while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", step)
    out = tmp_path / "term"
    assert train_in_process(*run_args(char_data, out)) == 143
    assert "stopped by SIGTERM after step 5" in capsys.readouterr().out
    assert [s for s, _ in state_dirs(str(out))] == [4, 5]
    monkeypatch.setattr(T, "train_step", real)
    assert train_in_process(*run_args(char_data, out), "--init_from=resume") == 0
    assert_same_run(straight, out)


# ---- 4. non-finite loss -------------------------------------------------------------------------------------------


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(char_data, straight, tmp_path, capsys):
    """Resuming with learning_rate=1e6 diverges: a one-line error naming the step; the checkpoint is untouched, and
    resuming with the old learning rate ends exactly like the straight run."""
    out = tmp_path / "nan"
    assert train_in_process(*run_args(char_data, out, 8)) == 0
    skip = ("metrics.jsonl", "train_config.yaml")  # the run's log and its latest settings (learning_rate=1e6)
    before = snapshot(out, skip=skip)
    capsys.readouterr()
    assert train_in_process(*run_args(char_data, out, MAX_ITERS), "--init_from=resume", "--learning_rate=1e6",
                            "--decay_lr=false") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the loss became non-finite (nan) at step ") and "Traceback" not in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert 8 < step < 12, err  # caught at its log line, before the evaluation at 12 could save it
    assert "state/step-8" in err and "--init_from=resume" in err
    assert snapshot(out, skip=skip) == before
    assert train_in_process(*run_args(char_data, out), "--init_from=resume") == 0
    assert_same_run(straight, out)


@pytest.mark.parametrize("damage", ["trainer_state.json", "model.safetensors"])
def test_a_damaged_newest_state_is_named_with_the_state_to_fall_back_on(straight, tmp_path, capsys, damage):
    out = tmp_path / "damaged"
    shutil.copytree(straight, out)
    path = out / "state" / f"step-{MAX_ITERS}" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a truncated write, or a bad disk
    before = snapshot(out)
    capsys.readouterr()
    assert train_in_process(f"--out_dir={out}", "--init_from=resume") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"state/step-{MAX_ITERS} cannot be loaded" in lines[0] and f"resume from {out}/state/step-12" in lines[0]
    assert snapshot(out) == before


# ---- 5. failed saves ----------------------------------------------------------------------------------------------


def _fail_on_call(n, exc):
    calls = []

    def wrap(real):
        def fn(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                if args and isinstance(args[-1], str) and os.path.isdir(args[-1]):  # leave half a file behind
                    with open(os.path.join(args[-1], "partial.bin"), "wb") as fh:
                        fh.write(b"\0" * 100)
                raise exc
            return real(*args, **kwargs)
        return fn
    return wrap


@pytest.mark.parametrize("where, exc, reason", [
    ("state", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    ("state", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 79296 vs 79184"),
     "unexpected pos"),
    ("model", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    ("model", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device"),
])
def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(char_data, straight, tmp_path, monkeypatch,
                                                                    capsys, where, exc, reason):
    """The second save fails (disk full / no permission, as OSError or as what torch and safetensors raise): exit
    2 with one line, the step-4 checkpoint untouched, no temporary left; a resume then ends like the straight run."""
    from accelerate import Accelerator

    from nanogpt_hf import NanoGPTForCausalLM

    out = tmp_path / "full"
    before = {}

    if where == "state":
        real = Accelerator.save_state
        monkeypatch.setattr(Accelerator, "save_state", _fail_on_call(2, exc)(real))
    else:
        real = NanoGPTForCausalLM.save_pretrained
        monkeypatch.setattr(NanoGPTForCausalLM, "save_pretrained", _fail_on_call(2, exc)(real))
    import nanogpt_hf.training as T

    real_step, calls = T.train_step, []

    def step(*args, **kwargs):  # the first step after the save at 4: remember the checkpoint's bytes
        calls.append(1)
        if len(calls) == 5:
            before.update(snapshot(out, skip=("metrics.jsonl", "loss.png")))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", step)
    if where == "state":  # the model folder of step 8 was written before the state failed: the state is the checkpoint
        before_keys = lambda snap: {k: v for k, v in snap.items() if k.startswith("state")}  # noqa: E731
    else:
        before_keys = lambda snap: snap  # noqa: E731
    capsys.readouterr()
    assert train_in_process(*run_args(char_data, out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    what = "training state" if where == "state" else "model"
    assert f"could not save the {what}" in lines[0] and reason in lines[0]
    assert "previous checkpoint is intact" in lines[0] and "free some disk space" in lines[0]
    assert before_keys(snapshot(out, skip=("metrics.jsonl", "loss.png"))) == before_keys(before)
    assert [s for s, _ in state_dirs(str(out))] == [4]
    assert not leftovers(out)
    monkeypatch.undo()
    assert train_in_process(*run_args(char_data, out), "--init_from=resume") == 0
    assert_same_run(straight, out)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root and mount; skipped elsewhere): real ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder):
    """Use up every free byte of folder's file system."""
    with open(os.path.join(folder, "filler"), "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    try:  # the last bytes, one at a time; creating the file itself may fail when the directory needs a new block
        with open(os.path.join(folder, "filler2"), "wb") as fh:
            while True:
                fh.write(b"\0")
                fh.flush()
    except OSError:
        pass


@pytest.mark.parametrize("full_after", ["state", "model"])
def test_real_disk_full(char_data, small_disk, tmp_path, monkeypatch, capsys, full_after):
    """On a real, full file system: whichever write fails first (the model, the state, the metrics), one line,
    exit 2, the last checkpoint intact."""
    import nanogpt_hf.training as T

    out = small_disk / "run"
    owner = T if full_after == "state" else T.Checkpointer
    name = "save_state" if full_after == "state" else "save_model"
    real = getattr(owner, name)
    snap = {}

    def then_fill(*args, **kwargs):
        result = real(*args, **kwargs)
        if not snap:
            snap.update(snapshot(out, skip=("metrics.jsonl", "loss.png")))
            fill(small_disk)
        return result

    monkeypatch.setattr(owner, name, then_fill)
    capsys.readouterr()
    assert train_in_process(*run_args(char_data, out, 8)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0], lines[0]
    for name in ("filler", "filler2"):
        if os.path.exists(small_disk / name):
            os.remove(small_disk / name)
    after = snapshot(out, skip=("metrics.jsonl", "loss.png"))
    assert {k: v for k, v in after.items() if k in snap} == snap  # nothing that existed changed
    assert not leftovers(out)
    assert_resumable_and_loadable(out)


# ---- 6. resume with changed settings ------------------------------------------------------------------------------


def test_resume_refuses_architecture_changes_and_announces_optimisation_changes(char_data, tmp_path, capsys):
    out = tmp_path / "changes"
    assert train_in_process(*run_args(char_data, out, 4)) == 0
    before = snapshot(out)
    for change, saved in [("--n_layer=3", "n_layer=2"), ("--n_embd=64", "n_embd=32"), ("--block_size=16", "32"),
                          ("--bias=true", "bias=False")]:
        capsys.readouterr()
        assert train_in_process("--out_dir=" + str(out), "--init_from=resume", change) == 2, change
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot resume with ") and saved in err, err
        assert "start a new out_dir" in err
        assert snapshot(out) == before
    import shutil

    moved = tmp_path / "moved"  # a run folder that was moved (or named by another path) resumes where it is
    shutil.copytree(out, moved)
    assert train_in_process("--out_dir=" + str(moved), "--init_from=resume", "--max_iters=5") == 0
    assert [s for s, _ in state_dirs(str(moved))] == [4, 5] and snapshot(out) == before
    capsys.readouterr()
    assert train_in_process("--out_dir=" + str(out), "--init_from=resume", "--learning_rate=5e-3", "--max_iters=6",
                            "--eval_interval=3") == 0
    text = capsys.readouterr().out
    head = text[:text.index("training")] if "training" in text else text
    for line in ("resuming with learning_rate changed: 0.01 -> 0.005", "resuming with max_iters changed: 4 -> 6",
                 "resuming with eval_interval changed: 4 -> 3"):
        assert line in head, text[:2000]
    trainer = read_trainer_state(latest_state(str(out)))
    assert trainer["step"] == 6 and trainer["settings"]["learning_rate"] == 5e-3


# ---- 7. bad inputs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_world(root, char_data, straight):
    """Files the bad inputs point at: a char dataset, a GPT-2 BPE dataset, a good checkpoint, one with a
    truncated model.safetensors, a truncated ckpt.pt, recipes with mistakes, a file where a folder should be."""
    w = root / "bad"
    w.mkdir()
    prepare(PrepareSettings(source=str(root / "play.txt"), tokenizer="gpt2", out=str(w / "bpe")))
    import shutil

    for name in ("good", "truncated"):
        os.makedirs(w / name)
        for f in os.listdir(straight):
            if os.path.isfile(straight / f) and f != "metrics.jsonl":
                shutil.copy(straight / f, w / name / f)
    data = (w / "truncated" / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (w / "ckpt.pt").write_bytes(open(straight / "state" / f"step-{MAX_ITERS}" / "optimizer.bin", "rb").read()[:500])
    (w / "empty.txt").write_text("")
    (w / "one.txt").write_text("a")
    (w / "two.txt").write_text("ab")
    prepare(PrepareSettings(source=str(w / "two.txt"), tokenizer="char", out=str(w / "two_tokens")))
    (w / "typo.yaml").write_text("learnin_rate: 1.0e-3\n")
    (w / "wrongtype.yaml").write_text("batch_size: [1, 2]\n")
    (w / "broken.yaml").write_text("batch_size: 12\n  block_size: : 64\n")
    (w / "a_file").write_text("not a folder")
    (w / "meta_garbage").mkdir()
    (w / "meta_garbage" / "meta.json").write_text("{not json")
    (w / "occupied").mkdir()
    (w / "occupied" / "precious.txt").write_text("keep me")
    (w / "no_state").mkdir()
    return w


def bad_inputs(w, char):
    good, trunc, bpe = w / "good", w / "truncated", w / "bpe"
    t = ["--device=cpu", "--compile=false", "--sample_at_end=false", "--max_iters=2", "--eval_iters=1",
         "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", f"--out_dir={w}/new_run"]
    return {
        # prepare
        "prepare: missing source": (prepare_main, [f"{w}/missing.txt", f"--out={w}/p"], "does not exist"),
        "prepare: empty corpus": (prepare_main, [f"{w}/empty.txt", f"--out={w}/p"], "empty"),
        "prepare: one-character corpus": (prepare_main, [f"{w}/one.txt", "--tokenizer=char", f"--out={w}/p"],
                                          "too small"),
        "prepare: bad tokenizer": (prepare_main, ["--tokenizer=./no_such_tokenizer", f"--out={w}/p"], "tokenizer"),
        "prepare: val_fraction out of range": (prepare_main, ["--val_fraction=2", f"--out={w}/p"], "val_fraction"),
        "prepare: wrong type": (prepare_main, ["--num_proc=many", f"--out={w}/p"], "expects an integer"),
        "prepare: over a folder that is no dataset": (prepare_main, [f"{w}/two.txt", f"--out={w}/occupied"],
                                                      "not a prepared dataset"),
        # train: settings and recipes
        "train: unknown setting": (train_main, ["--lr=1"], "did you mean 'learning_rate'"),
        "train: wrong type": (train_main, ["--max_iters=ten"], "expects an integer"),
        "train: recipe with an unknown key": (train_main, [f"{w}/typo.yaml"], "unknown setting 'learnin_rate'"),
        "train: recipe with a wrong type": (train_main, [f"{w}/wrongtype.yaml"], "setting 'batch_size' expects"),
        "train: recipe not YAML": (train_main, [f"{w}/broken.yaml"], "broken.yaml\", line 2"),
        "train: recipe missing": (train_main, [f"{w}/nope.yaml"], "does not exist"),
        "train: n_embd not divisible by n_head": (train_main, [f"--dataset={char}", *t, "--n_embd=30",
                                                               "--n_head=4"], "divisible by n_head"),
        "train: n_layer 0": (train_main, [f"--dataset={char}", *t, "--n_layer=0"], "n_layer"),
        "train: dropout 1.5": (train_main, [f"--dataset={char}", *t, "--dropout=1.5"], "dropout"),
        "train: batch_size 0": (train_main, [f"--dataset={char}", *t, "--batch_size=0"], "batch_size"),
        "train: eval_interval 0": (train_main, [f"--dataset={char}", *t, "--eval_interval=0"], "eval_interval"),
        "train: unknown device": (train_main, [f"--dataset={char}", *t, "--device=tpu"], "device"),
        # train: data, checkpoints and out_dir
        "train: missing dataset": (train_main, [f"--dataset={w}/nothing", *t], "does not exist; prepare it first"),
        "train: corrupt meta.json": (train_main, [f"--dataset={w}/meta_garbage", *t], "is damaged"),
        "train: block_size larger than the val split": (train_main, [f"--dataset={char}", *t, "--block_size=5000"],
                                                        "fewer than block_size"),
        "train: a two-token corpus": (train_main, [f"--dataset={w}/two_tokens", *t], "fewer than block_size"),
        "train: GPT-2 dataset, char checkpoint": (train_main, [f"--dataset={bpe}", *t, f"--init_from={good}",
                                                               "--block_size=16"], "uses the char tokenizer"),
        "train: truncated model.safetensors": (train_main, [f"--dataset={char}", *t, f"--init_from={trunc}"],
                                               f"loading '{trunc}'"),
        "train: block_size above the checkpoint's": (train_main, [f"--dataset={char}", *t, f"--init_from={good}",
                                                                  "--block_size=64"], "larger than the checkpoint"),
        "train: resume without a state": (train_main, [f"--dataset={char}", *t, f"--out_dir={w}/no_state",
                                                       "--init_from=resume"], "no resumable state"),
        "train: out_dir below a file": (train_main, [f"--dataset={char}", *t, f"--out_dir={w}/a_file/run"],
                                        "Not a directory"),
        "train: out_dir is a file": (train_main, [f"--dataset={char}", *t, f"--out_dir={w}/a_file"],
                                     "File exists"),
        # sample
        "sample: temperature 0": (sample_main, [f"--init_from={good}", "--temperature=0"], "temperature"),
        "sample: FILE: prompt missing": (sample_main, [f"--init_from={good}", f"--start=FILE:{w}/nope.txt"],
                                         "No such file or directory"),
        "sample: truncated model.safetensors": (sample_main, [f"--init_from={trunc}", "--max_new_tokens=2"],
                                                f"loading '{trunc}'"),
        "sample: missing checkpoint": (sample_main, [f"--init_from={w}/nothing"], "does not exist"),
        "sample: nothing trained yet": (sample_main, ["--out_dir=out-not-trained"], "train a model first"),
        "sample: top_p 1.5": (sample_main, [f"--init_from={good}", "--top_p=1.5"], "top_p"),
        "sample: num_samples 0": (sample_main, [f"--init_from={good}", "--num_samples=0"], "num_samples"),
        "sample: character outside the vocabulary": (sample_main, [f"--init_from={good}", "--start=\u20ac",
                                                                   "--max_new_tokens=2"], "\u20ac"),
        "sample: stop_at_eot without an end-of-text token": (sample_main, [f"--init_from={good}", "--stop_at_eot",
                                                                           "--max_new_tokens=2"], "end-of-text"),
        # bench
        "bench: unknown mode": (bench_main, ["--mode=fly"], "mode"),
        "bench: n_embd not divisible by n_head": (bench_main, ["--n_embd=30", "--n_head=4", "--device=cpu"],
                                                  "divisible"),
        "bench: iters 0": (bench_main, ["--iters=0", "--device=cpu"], "iters"),
        "bench: missing data": (bench_main, [f"--data={w}/nothing", "--device=cpu"], "does not exist"),
        "bench: generate from a truncated checkpoint": (bench_main, ["--mode=generate", f"--init_from={trunc}",
                                                                     "--device=cpu"], ""),
        # convert
        "convert: missing ckpt.pt": (hf_main, ["convert-nanogpt", f"{w}/nope.pt", f"{w}/c"], "No such file"),
        "convert: truncated ckpt.pt": (hf_main, ["convert-nanogpt", f"{w}/ckpt.pt", f"{w}/c"], "not a PyTorch checkpoint"),
        "convert: export a truncated checkpoint": (hf_main, ["export-gpt2", str(trunc), f"{w}/c"], f"loading '{trunc}'"),
        "convert: unknown command": (hf_main, ["frobnicate"], "frobnicate"),
    }


def test_bad_inputs_are_one_line_exit_2_and_change_nothing(bad_world, char_data, capsys):
    cases = bad_inputs(bad_world, char_data)
    assert len(cases) >= 25
    before = snapshot(bad_world)
    failures = []
    for name, (entry, argv, message) in cases.items():
        capsys.readouterr()
        try:
            rc = entry([str(a) for a in argv])
        except BaseException as exc:  # noqa: BLE001 - report every case, not only the first
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
            continue
        finally:
            reset_accelerate()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]  # progress bars (datasets, loading) may precede
        errors = [line for line in lines if line.startswith("error: ")]
        if rc != 2 or len(errors) != 1 or lines[-1] != errors[0] or "Traceback" in err:
            failures.append(f"{name}: exit {rc}, stderr {err[-800:]!r}")
        elif message not in errors[0]:
            failures.append(f"{name}: message {errors[0]!r} lacks {message!r}")
        after = snapshot(bad_world)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            failures.append(f"{name}: files changed {changed[:4]}")
            before = after
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_bad_inputs_as_real_commands(bad_world, char_data, tmp_path):
    """The same as the console user sees it: python train.py / sample.py / prepare.py / bench.py in subprocesses."""
    w = bad_world
    commands = {
        "train.py n_embd % n_head": ["train.py", f"--dataset={char_data}", "--n_embd=30", "--n_head=4",
                                     f"--out_dir={w}/sub_run", "--device=cpu"],
        "sample.py truncated": ["sample.py", f"--init_from={w}/truncated", "--max_new_tokens=2", "--device=cpu"],
        "prepare.py empty": ["prepare.py", f"{w}/empty.txt", f"--out={w}/sub_p"],
        "bench.py impossible": ["bench.py", "--n_embd=30", "--n_head=4", "--device=cpu"],
    }
    before = snapshot(w)
    procs = {name: warm_popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert proc.returncode == 2, (name, err[-2000:])
        assert errors == lines[-1:] and "Traceback" not in err, (name, err[-2000:])
    assert snapshot(w) == before
    assert not os.path.exists(w / "sub_p")
