"""benchmarks/gpu_check.py without a GPU: its refusal, its table, and every check's code path on tiny CPU shapes."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402
from warm import warm_run  # noqa: E402

sys.path.pop(0)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_refuses_a_machine_without_a_gpu_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = warm_run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env, capture_output=True,
                   text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "GPU" in res.stderr and "bench.py" in res.stderr  # names the problem and where to go instead


def test_table_has_a_row_per_check_and_keeps_cells_apart():
    rows = [gpu_check.Row("train step", "ok", "31.2 ms/iter, MFU 41.0%", 52.4),
            gpu_check.Row("FSDP step", "skip", "exit 1: a|b", 3.0)]
    table = gpu_check.format_table(rows, "gpu_check on a GPU").splitlines()
    assert table[0] == "gpu_check on a GPU" and table[2] == "| check | status | result | s |"
    assert table[4:] == ["| train step | ok | 31.2 ms/iter, MFU 41.0% | 52 |",
                         "| FSDP step | skip | exit 1: a\\|b | 3 |"]


def test_a_failing_check_is_its_row_and_the_others_still_run(monkeypatch, capsys):
    def boom(plan):
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    monkeypatch.setattr(gpu_check, "CHECKS", {"breaks": boom, "works": lambda plan: ("ok", "fine")})
    assert gpu_check.main(["--tiny"]) == 1  # a failure is the exit status too
    out = capsys.readouterr().out
    assert "| breaks | FAIL | RuntimeError: CUDA error: an illegal memory access |" in out
    assert "| works | ok | fine |" in out


def test_every_check_runs_on_tiny_cpu_shapes():
    """The GPU's code paths (bench's train and generate modes, compile, task scoring) on a CPU: every row ok."""
    checks = {name: check for name, check in gpu_check.CHECKS.items() if check is not gpu_check.check_fsdp}
    rows = [gpu_check.run_check(name, check, gpu_check.TINY) for name, check in checks.items()]
    assert [(r.check, r.status) for r in rows] == [(name, "ok") for name in checks], rows
    assert all(any(c.isdigit() for c in r.result) for r in rows)

