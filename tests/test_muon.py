"""--optimizer=muon: Muon for the blocks' 2-D matrices, AdamW for the rest; its schedule, exact resume, refusals and
two processes."""

import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import nanogpt_hf.training as T
from conftest import cpu_processes_env, free_port, run_group
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.checkpoint import TRAINER_STATE, state_dirs
from nanogpt_hf.cli import train_main
from nanogpt_hf.settings import TrainSettings
from test_reliability import HOOKED, env, kill_tree, run_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=1, max_iters=8,
            eval_interval=4, eval_iters=2, log_interval=1, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2,
            dtype="float32", device="cpu", compile=False, sample_at_end=False, dropout=0.0, optimizer="muon")
HIDDEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny(data, out_dir, **kw) -> TrainSettings:
    return TrainSettings(**{**TINY, "dataset": data, "out_dir": str(out_dir), **kw})


def argv(data, out_dir, **kw) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, "dataset": data, "out_dir": out_dir, **kw}.items()]


def train_losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [e["loss"] for e in map(json.loads, fh) if e["type"] == "train"]


def recording(monkeypatch) -> list:
    """train_step wrapped: records (optimizers, lrs) of every step."""
    calls, real = [], T.train_step

    def step(accelerator, model, optimizers, micro_batches, lrs, grad_clip):
        calls.append((optimizers, lrs))
        return real(accelerator, model, optimizers, micro_batches, lrs, grad_clip)

    monkeypatch.setattr(T, "train_step", step)
    return calls


# ---- 1. which optimizer gets which parameter ------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_muon_gets_the_blocks_matrices_and_adamw_the_rest(tied):
    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=True,
                                             tie_word_embeddings=tied))
    names = {id(p): n for n, p in model.named_parameters()}  # tied: the head is the embedding, named once
    s = TrainSettings(optimizer="muon", muon_lr=0.03, muon_momentum=0.9, weight_decay=0.2)
    adamw, muon = T.configure_optimizers(model, s, "cpu")
    assert type(adamw) is torch.optim.AdamW and type(muon) is torch.optim.Muon
    got = {k: [names[id(p)] for g in opt.param_groups for p in g["params"]] for k, opt in (("a", adamw), ("m", muon))}
    assert sorted(got["m"]) == sorted(f"transformer.h.{i}.{w}" for i in range(2) for w in HIDDEN)
    assert sorted(got["a"] + got["m"]) == sorted(names.values())  # every parameter exactly once
    decay = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight"} | (set() if tied else {"lm_head.weight"})
    assert all(p.dim() == 1 for p in adamw.param_groups[1]["params"]) and adamw.param_groups[1]["weight_decay"] == 0
    assert (muon.defaults["lr"], muon.defaults["momentum"], muon.defaults["weight_decay"]) == (0.03, 0.9, 0.2)
    assert adamw.param_groups[0]["weight_decay"] == 0.2 and adamw.defaults["lr"] == s.learning_rate
    default = T.configure_optimizers(model, TrainSettings(), "cpu")  # adamw: one optimizer for everything, as before
    assert len(default) == 1 and sum(len(g["params"]) for g in default[0].param_groups) == len(names)


# ---- 2. exact resume; 3. the schedule --------------------------------------------------------------------------


def test_a_muon_run_resumes_bit_exactly_with_its_momentum(char_data, tmp_path, monkeypatch):
    calls = recording(monkeypatch)
    assert T.train(tiny(char_data, tmp_path / "a", dropout=0.1)) == 0
    s = tiny(char_data, tmp_path / "a", dropout=0.1)
    assert [lrs for _, lrs in calls] == [T.learning_rates(s, i) for i in range(8)]
    with open(tmp_path / "a" / "metrics.jsonl") as fh:  # both LRs on record, as they were when each step ended
        logged = [(e["lr"], e["muon_lr"]) for e in map(json.loads, fh) if e["type"] == "train"]
    assert logged == [tuple(T.learning_rates(s, i)) for i in range(8)]
    assert [type(o.optimizer) for o in calls[0][0]] == [torch.optim.AdamW, torch.optim.Muon]
    assert [g["lr"] for o in calls[-1][0] for g in o.param_groups] == [calls[-1][1][0]] * 2 + [calls[-1][1][1]]
    assert T.train(tiny(char_data, tmp_path / "b", dropout=0.1, max_iters=4, lr_decay_iters=8)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert T.train(tiny(char_data, tmp_path / "b", dropout=0.1, lr_decay_iters=8, init_from="resume"),
                   explicit={"max_iters": 8, "init_from": "resume"}) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    buffers = {}
    for run in ("a", "b"):
        assert [step for step, _ in state_dirs(str(tmp_path / run))] == [4, 8]
        saved = torch.load(tmp_path / run / "state" / "step-8" / "optimizer_1.bin", weights_only=True)["state"]
        buffers[run] = [saved[i]["momentum_buffer"] for i in sorted(saved)]
    assert len(buffers["a"]) == 4 * 2 and all(buf.abs().sum() > 0 for buf in buffers["a"])
    assert all(torch.equal(x, y) for x, y in zip(buffers["a"], buffers["b"], strict=True))


def test_muon_follows_the_schedule_scaled_by_muon_lr_over_learning_rate():
    s = TrainSettings(optimizer="muon", learning_rate=1e-2, min_lr=1e-3, muon_lr=0.05, warmup_iters=4,
                      lr_decay_iters=None, max_iters=20)
    lrs = [T.learning_rates(s, step) for step in range(25)]
    assert lrs[0] == pytest.approx([1e-2 / 5, 0.05 / 5]) and lrs[4] == pytest.approx([1e-2, 0.05])  # warmup, peak
    assert lrs[12] == pytest.approx([5.5e-3, 0.0275])  # half-way down the cosine, which ends at max_iters
    assert lrs[24] == pytest.approx([1e-3, 5e-3])
    assert all(muon == pytest.approx(adamw * 5) for adamw, muon in lrs)
    assert T.learning_rates(TrainSettings(learning_rate=1e-2, warmup_iters=4), 2) == [1e-2 * 3 / 5]  # adamw: one


# ---- 4. refusals: one line, exit 2 ------------------------------------------------------------------------------


class FsdpAccelerator(T.Accelerator):
    distributed_type = DistributedType.FSDP  # what `accelerate config` with FSDP gives on GPUs


class Fp16Accelerator(T.Accelerator):
    mixed_precision = "fp16"  # what dtype=auto gives on a GPU without bf16 (fp16 is refused on CPU)


@pytest.mark.parametrize("accelerator, message", [(FsdpAccelerator, "optimizer=muon does not work under FSDP"),
                                                  (Fp16Accelerator, "optimizer=muon does not work with float16")])
def test_muon_is_refused_under_fsdp_and_fp16(char_data, tmp_path, monkeypatch, capsys, accelerator, message):
    monkeypatch.setattr(T, "Accelerator", accelerator)
    assert train_main(argv(char_data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_a_state_of_one_adamw_resumes_and_refuses_a_switch_to_muon(char_data, tmp_path, capsys):
    out = tmp_path / "old"
    assert train_main(argv(char_data, out, optimizer="adamw", max_iters=2, eval_interval=2)) == 0
    path = out / "state" / "step-2" / TRAINER_STATE
    ts = json.loads(path.read_text())
    for key in ("optimizer", "muon_lr", "muon_momentum"):  # as saved before --optimizer existed
        del ts["settings"][key]
    path.write_text(json.dumps(ts))
    assert "optimizer_1.bin" not in os.listdir(path.parent)  # one AdamW, as before
    capsys.readouterr()
    assert train_main([f"--out_dir={out}", "--init_from=resume", "--optimizer=muon", "--max_iters=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot resume with optimizer='muon'"), err
    assert "trained with optimizer='adamw'" in err and [s for s, _ in state_dirs(str(out))] == [2]
    assert train_main([f"--out_dir={out}", "--init_from=resume", "--optimizer=adamw", "--max_iters=3"]) == 0
    assert [s for s, _ in state_dirs(str(out))] == [2, 3]


# ---- 5. two processes --------------------------------------------------------------------------------------------


def test_muon_on_two_processes_killed_and_resumed_matches_one(char_data, tmp_path):
    """DDP all-reduces the full gradients: each rank orthogonalises the same matrices, as one process does. The two
    processes are SIGKILLed in step 3 and resumed from step 2's state (each rank's Muon momentum)."""
    kw = dict(max_iters=4, eval_interval=2, warmup_iters=1, backend="gloo")  # one process ignores the backend
    def launch(script):
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", script]
    (tmp_path / "hooked_train.py").write_text(HOOKED)

    def killed_and_resumed():
        rc, stdout = run_until(launch(str(tmp_path / "hooked_train.py")) + argv(char_data, tmp_path / "two", **kw),
                               lambda line: line.startswith("PAUSED"), kill_tree, log_path=tmp_path / "stderr.txt",
                               env=cpu_processes_env(env(PYTHONPATH=ROOT, PAUSE_AT="step:3")), timeout=300)
        assert rc == -signal.SIGKILL and "2 process(es)" in stdout, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert [step for step, _ in state_dirs(str(tmp_path / "two"))] == [2]
        res = run_group(launch(os.path.join(ROOT, "train.py")) + [f"--out_dir={tmp_path / 'two'}",
                                                                  "--init_from=resume"],
                        timeout=300, env=cpu_processes_env(PYTHONPATH=ROOT))
        assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]

    with ThreadPoolExecutor(1) as pool:  # the launches beside the one-process reference (in this process)
        launches = pool.submit(killed_and_resumed)
        assert train_main(argv(char_data, tmp_path / "one", **kw)) == 0
        launches.result()
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    # Muon's Newton-Schulz iterations run in bf16 and boost small singular directions ~400x: a last-bit difference in
    # the all-reduced gradient moves single weights by up to a fraction of lr (1e-2), but on average they agree to
    # ~1e-4 (a rank stepping on its own gradients, a wrong lr or a lost momentum would be off by ~lr)
    assert two.keys() == one.keys() and all((two[k] - one[k]).abs().mean() < 5e-4 for k in two)
    losses = [train_losses(tmp_path / run) for run in ("two", "one")]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=5e-4)


def test_a_resume_applies_changed_optimizer_settings(char_data, tmp_path):
    """The state's optimizer keeps its moments, but weight decay, betas and momentum are the resumed run's settings
    (torch's load_state_dict would bring back the saved ones)."""
    s = tiny(char_data, tmp_path, max_iters=2)
    assert T.train(s) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    changed = dict(weight_decay=0.0, beta2=0.9, muon_momentum=0.8, init_from="resume")
    run = T.setup(TrainSettings(**{**vars(s), **changed}), explicit=changed, recipes=[])
    adamw, muon = (opt.param_groups for opt in run.optimizers)
    assert [g["weight_decay"] for g in adamw] == [0.0, 0.0] and all(g["betas"] == (0.9, 0.9) for g in adamw)
    assert muon[0]["momentum"] == 0.8 and muon[0]["weight_decay"] == 0.0
    assert len(run.optimizers[1].state) > 0  # the moments were loaded
