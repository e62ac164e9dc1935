"""Several machines, simulated on this one: two `accelerate launch --num_machines 2 --machine_rank R` commands (the
README's per-node command, then its SLURM `srun` form), one CPU process each. Together they train exactly as one
process does, a SIGKILL of both machines resumes exactly, one process writes each file, and an out_dir that the
machines do not share is refused at start."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_processes_env, free_port
from nanogpt_hf.checkpoint import state_dirs
from test_reliability import TRAIN_PY, env, events, kill_tree, leftovers, tensors_equal, train_in_process

MAX_ITERS = 12
# one micro-batch of 4 rows per process; no dropout: one process draws the same masks as two only without it
ARGS = [f"--max_iters={MAX_ITERS}", f"--lr_decay_iters={MAX_ITERS}", "--eval_interval=4", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2",
        "--log_interval=1", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2", "--dtype=float32",
        "--device=cpu", "--compile=false", "--sample_at_end=false", "--dropout=0.0", "--keep_states=2"]
# the README's commands: on every machine, its rank; on a SLURM cluster, one srun task per node runs the second
NODE = ("accelerate launch --multi_gpu --num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 "
        "--main_process_port 29500 --num_processes 2 train.py")
SRUN_TASK = ("accelerate launch --multi_gpu --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID "
             "--main_process_ip $MAIN_HOST --main_process_port 29500 "
             "--num_processes $((SLURM_NNODES * GPUS_PER_NODE)) train.py")


def machine_env(**extra) -> dict:
    """A machine's environment: one CPU process (cpu_processes_env), the `accelerate` of this interpreter."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return cpu_processes_env(env(PATH=path, **extra))


def start(command: str, port: int, args: list[str], log, **extra) -> subprocess.Popen:
    """One machine's command in a shell, as typed there (train.py by its path, the port a free one)."""
    line = command.replace("29500", str(port)).replace("train.py", shlex.quote(TRAIN_PY))
    return subprocess.Popen(["bash", "-c", line + " " + shlex.join(args)], stdout=log, stderr=subprocess.STDOUT,
                            env=machine_env(**extra), start_new_session=True)


def read(log) -> str:
    log.seek(0)
    return log.read()


def wait_all(procs, timeout=240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:  # a machine left waiting for the other
            if p.poll() is None:
                kill_tree(p)


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory):
    """The reference: one process, one thread (as each machine's process), in this process."""
    out = tmp_path_factory.mktemp("one") / "out"
    threads = torch.get_num_threads()
    try:
        assert train_in_process(f"--dataset={char_data}", f"--out_dir={out}", *ARGS, "--threads=1") == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_two_machines_train_as_one_process_and_resume_exactly_after_both_are_killed(char_data, one_process, tmp_path):
    out = tmp_path / "out"
    args = [f"--dataset={char_data}", *ARGS, f"--out_dir={out}"]
    logs = [open(tmp_path / f"machine{r}.log", "w+") for r in (0, 1)]
    port = free_port()
    # both machines SIGKILLed (a power cut) once the first state is on disk, 8 steps before the end
    machines = [start(NODE.format(rank=r), port, args, logs[r]) for r in (0, 1)]
    deadline = time.monotonic() + 240
    while not state_dirs(str(out)) and time.monotonic() < deadline and all(p.poll() is None for p in machines):
        time.sleep(0.02)
    for p in machines:
        kill_tree(p)
    codes = wait_all(machines)
    text = [read(log) for log in logs]
    assert codes == [-signal.SIGKILL] * 2, text[0][-3000:] + text[1][-3000:]
    killed_at = state_dirs(str(out))[-1][0]
    assert killed_at < MAX_ITERS and f"step {MAX_ITERS}:" not in text[0]  # the kill landed mid-run

    # both resumed, each by its SLURM task's command
    port = free_port()
    for log in logs:
        log.seek(0)
        log.truncate()
    slurm = dict(SLURM_NNODES="2", GPUS_PER_NODE="1", MAIN_HOST="127.0.0.1")  # what the job script sets
    machines = [start(SRUN_TASK, port, args + ["--init_from=resume"], logs[r], SLURM_NODEID=str(r), **slurm)
                for r in (0, 1)]
    codes = wait_all(machines)
    text = [read(log) for log in logs]
    assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
    assert f"resumed from {out / 'state' / f'step-{killed_at}'} at step {killed_at}" in text[0]

    # the same losses at every step, bitwise, as one process; each event once (one writer)
    assert events(out) == events(one_process)
    assert [step for step, _ in state_dirs(str(out))] == [MAX_ITERS - 4, MAX_ITERS]
    for rel in ("model.safetensors", f"state/step-{MAX_ITERS}/model.safetensors"):
        a, b = load_file(out / rel), load_file(one_process / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    state = out / "state" / f"step-{MAX_ITERS}"
    a, b = (torch.load(d / "optimizer.bin", weights_only=True) for d in (state, one_process / state.relative_to(out)))
    assert tensors_equal(a, b), "optimizer state differs"
    assert sorted(n for n in os.listdir(state) if n.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # each process's own RNG, in the one state
    assert not leftovers(out) and not [n for n in os.listdir(out) if n.startswith(".")]
    assert not [line for line in text[1].splitlines() if line.startswith(("iter ", "step ", "saved ", "done"))]


@pytest.mark.slow
def test_an_out_dir_the_machines_do_not_share_is_refused_at_start(char_data, tmp_path):
    """Each machine its own disk (here: its own out_dir). Without the check, the run ended with rank 1's RNG files
    stranded in temporary folders on its disk and states that could not resume there: refused at start instead."""
    logs = [open(tmp_path / f"machine{r}.log", "w+") for r in (0, 1)]
    port = free_port()
    args = [f"--dataset={char_data}", *ARGS]
    machines = [start(NODE.format(rank=r), port, args + [f"--out_dir={tmp_path / f'disk{r}'}"], logs[r])
                for r in (0, 1)]
    codes = wait_all(machines)
    for r, log in enumerate(logs):
        errors = [line for line in read(log).splitlines() if line.startswith("error:")]
        assert errors == [f"error: out_dir {tmp_path / f'disk{r}'} is not one folder for every process: process(es) "
                          "[1] cannot see what the main process writes there; on several machines, put out_dir on "
                          "storage they all share (states hold every process's part, and a resume reads them)"], errors
        assert codes[r] != 0
    assert os.listdir(tmp_path / "disk0") == [] and not (tmp_path / "disk1").exists()  # nothing written
