"""train.py: settings, the accelerate loop against a plain PyTorch loop, checkpoints, resume, trackers, 2 processes."""

import dataclasses
import glob
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import InBackground, cpu_processes_env, free_port, run_group
from warm import warm_run
from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.cli import train_main
from nanogpt_hf.data import PrepareSettings, open_dataset, prepare, sample_batch
from nanogpt_hf.common import UserError
from nanogpt_hf.hardware import cpu_has_bf16, resolve_mixed_precision, training_attention
from nanogpt_hf.settings import TrainSettings, parse_command
from nanogpt_hf import NanoGPTConfig
import nanogpt_hf.training as T
from nanogpt_hf.training import configure_optimizer, get_lr, train, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps a process-wide singleton state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny(data, out_dir, **kw):
    """A run small enough for a test: 2 layers, 32 wide, block 32, float32 on CPU."""
    base = dict(dataset=data, out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                gradient_accumulation_steps=1, max_iters=6, eval_interval=3, eval_iters=2, log_interval=1,
                learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=6, dtype="float32", device="cpu",
                compile=False, sample_at_end=False, dropout=0.0)
    base.update(kw)
    return TrainSettings(**base)


def scratch_model(s, vocab_size):
    """The model train.py builds from scratch for settings s."""
    return NanoGPTForCausalLM(NanoGPTConfig(block_size=s.block_size, vocab_size=vocab_size, n_layer=s.n_layer,
                                            n_head=s.n_head, n_embd=s.n_embd, dropout=s.dropout, bias=s.bias))


def metrics(out_dir, kind):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [e for e in map(json.loads, fh) if e["type"] == kind]


# ---- settings ---------------------------------------------------------------------------------------------------


def test_settings_have_nanogpt_names_and_defaults():
    s = TrainSettings()
    assert (s.batch_size, s.block_size, s.gradient_accumulation_steps, s.learning_rate, s.max_iters) == (
        12, 1024, 40, 6e-4, 600000)
    assert (s.weight_decay, s.beta1, s.beta2, s.grad_clip, s.warmup_iters, s.min_lr) == (0.1, 0.9, 0.95, 1.0, 2000, 6e-5)
    assert (s.eval_interval, s.eval_iters, s.log_interval, s.always_save_checkpoint, s.bias) == (2000, 200, 1, True, False)


@pytest.mark.parametrize("argv, message", [
    (["--lr=1"], "unknown setting 'lr' (did you mean 'learning_rate'?)"),
    (["--max_iters=ten"], "setting 'max_iters' expects an integer, got 'ten'"),
    (["--decay_lr=maybe"], "setting 'decay_lr' expects true or false"),
    (["--hub_strategy=sometimes"], "setting 'hub_strategy' must be one of end, best, every_save"),
    (["--backend=foo"], "setting 'backend' must be one of auto, nccl, gloo; got 'foo'"),
    (["missing.yaml"], "recipe 'missing.yaml' does not exist"),
    (["--beta2=1.5"], "setting 'beta2' must be in [0, 1), got 1.5"),
    (["--learning_rate=-1e-3"], "setting 'learning_rate' must be in [0, inf), got -0.001"),
    (["--learning_rate=nan"], "setting 'learning_rate' must be in [0, inf), got nan"),
    (["--keep_states=-1"], "setting 'keep_states' must be in [0, inf), got -1"),
])
def test_bad_settings_are_one_clear_line(argv, message, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_int_for_float_setting_and_both_flag_styles():
    s, explicit = parse_command(TrainSettings, ["--learning_rate=1", "--max_iters", "7", "--compile"], "t", "")
    assert s.learning_rate == 1.0 and isinstance(s.learning_rate, float) and s.max_iters == 7 and s.compile is True
    assert explicit == {"learning_rate": 1.0, "max_iters": 7, "compile": True}


def test_a_home_path_after_the_equals_sign_is_expanded(monkeypatch, tmp_path):
    # the shell leaves --out_dir=~/runs as typed: it made a folder named '~' in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    s, _ = parse_command(TrainSettings, ["--out_dir=~/runs/a", "--dataset=~/data/x", "--wandb_run_name=~x"], "t", "")
    assert (s.out_dir, s.dataset, s.wandb_run_name) == (str(tmp_path / "runs/a"), str(tmp_path / "data/x"), "~x")
    from nanogpt_hf.sampling import SampleSettings, read_prompt

    s, _ = parse_command(SampleSettings, ["--start=~/ is home", "--init_from=~/ck"], "t", "")
    assert (s.start, s.init_from) == ("~/ is home", str(tmp_path / "ck"))  # a prompt is text, not a path

    (tmp_path / "p.txt").write_text("To be")
    assert read_prompt("FILE:~/p.txt") == "To be"


def test_help_lists_every_setting_with_the_default_it_will_use(capsys):
    # no recipe: the demo's values (default.yaml) are the defaults; with a recipe, that recipe's values
    owt = os.path.join(ROOT, "recipes", "openwebtext_gpt2.yaml")
    for argv, lr, out_dir in ((["--help"], "0.001", "out/shakespeare_char"),
                              ([owt, "-h"], "0.0006", "out/openwebtext_gpt2")):
        with pytest.raises(SystemExit) as exit_:
            train_main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(TrainSettings):
            assert f"--{f.name}=" in out
        assert f"--learning_rate={lr}\n" in out and f"--out_dir='{out_dir}'" in out and "tokens per step" in out


def test_without_a_recipe_the_demo_values_are_defaults_not_explicit_settings():
    from nanogpt_hf.training import DEFAULT_RECIPE

    s, explicit = parse_command(TrainSettings, ["--max_iters=5"], "t", "", recipes=True, default_recipe=DEFAULT_RECIPE)
    assert (s.block_size, s.n_layer, s.max_iters) == (64, 4, 5) and explicit == {"max_iters": 5}
    recipe = os.path.join(ROOT, "recipes", "openwebtext_gpt2.yaml")
    s, _ = parse_command(TrainSettings, [recipe], "t", "", recipes=True, default_recipe=DEFAULT_RECIPE)
    assert s.block_size == 1024 and s.n_layer == 12


@pytest.mark.parametrize("line, shown", [("out_dir:", "None"), ("init_from: off", "False")])
def test_yaml_null_or_boolean_for_a_string_setting_is_refused(tmp_path, line, shown, capsys):
    (tmp_path / "r.yaml").write_text(line + "\n")
    assert train_main([str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"expects a string, got {shown}; in a YAML recipe, quote the value" in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))))
def test_every_shipped_recipe_is_valid(recipe):
    s, explicit = parse_command(TrainSettings, [recipe], "t", "", recipes=True)
    assert explicit, "a recipe sets something"
    assert s.out_dir.startswith("out/")


def test_perplexity_is_exp_of_the_token_weighted_mean_loss(monkeypatch):
    from nanogpt_hf.metrics import perplexity

    monkeypatch.setitem(sys.modules, "evaluate", None)  # plain math: no metric library (~0.3 s a call) per evaluation
    assert perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(3.5))
    assert perplexity([800.0], [1]) == math.inf  # a diverging run: a number, not an OverflowError
    assert perplexity([709.0], [1]) == pytest.approx(math.exp(709.0))  # exp's whole range, up to ~709.78
    assert math.isnan(perplexity([math.nan], [1]))


def test_loss_png_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """train() in a notebook: drawing loss.png must not switch the session's backend (inline plots would stop)."""
    import matplotlib
    from PIL import Image

    from nanogpt_hf.metrics import MetricsLog, plot_losses

    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    for event in ({"type": "train", "iter": 1, "loss": 4.0}, {"type": "eval", "iter": 1, "train_loss": 3.9,
                                                               "val_loss": 4.1}):
        log.write(event)
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend but Agg
    try:
        plot_losses(log.path, str(tmp_path / "loss.png"))
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert Image.open(tmp_path / "loss.png").size == (700, 400)


def test_lr_schedule_is_nanogpts():
    args = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(0, **args) == pytest.approx(1e-3 * 1 / 11)
    assert get_lr(9, **args) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, **args) == pytest.approx(1e-3)
    assert get_lr(55, **args) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert get_lr(100, **args) == pytest.approx(1e-4) and get_lr(500, **args) == 1e-4
    assert get_lr(5, decay_lr=False, **args) == 1e-3


# ---- the step and the loop ----------------------------------------------------------------------------------------


def test_gradient_accumulation_4x3_equals_1x12(char_data):
    from accelerate import Accelerator

    stream = open_dataset(char_data).stream("train")
    x, y = sample_batch(stream, seed=0, step=0, index=0, batch_size=12, block_size=32)
    results = []
    for chunks in (1, 4):
        torch.manual_seed(0)
        model = scratch_model(tiny(char_data, "unused"), open_dataset(char_data).vocab_size)
        # SGD: the update is the (clipped) gradient itself; Adam's first step is ~lr * sign(grad), which turns
        # float rounding in near-zero gradients into lr-sized differences
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        acc = Accelerator(cpu=True, mixed_precision="no")
        model, opt = acc.prepare(model, opt)
        micro = list(zip(x.chunk(chunks), y.chunk(chunks)))
        loss, norm = train_step(acc, model, [opt], micro, lrs=[1.0], grad_clip=1.0)
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()], norm.item()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][2] == pytest.approx(results[1][2], rel=1e-5)  # the same gradient, the same norm
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_loop_equals_a_plain_pytorch_loop(char_data, tmp_path):
    """Same initial weights and batches: our accelerate loop and a hand-written AdamW loop end equal (1e-5)."""
    s = tiny(char_data, tmp_path / "out", gradient_accumulation_steps=2, max_iters=5, eval_interval=5, grad_clip=0.5)
    assert train(s) == 0
    ours = load_file(tmp_path / "out" / "model.safetensors")

    torch.manual_seed(s.seed)
    model = scratch_model(s, open_dataset(char_data).vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.learning_rate, betas=(s.beta1, s.beta2))
    stream = open_dataset(char_data).stream("train")
    for it in range(s.max_iters):
        for g in opt.param_groups:
            g["lr"] = get_lr(it, s.learning_rate, s.min_lr, s.warmup_iters, s.lr_decay_iters)
        for j in range(2):
            x, y = sample_batch(stream, seed=s.seed, step=it, index=j, batch_size=s.batch_size, block_size=s.block_size)
            logits = model(input_ids=x).logits
            (torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad()
    for name, p in model.state_dict().items():
        if name != "lm_head.weight":  # tied: saved once, as transformer.wte.weight
            assert torch.allclose(ours[name], p, atol=1e-5), name


@pytest.mark.slow
def test_short_run_learns_saves_and_loads_in_a_fresh_process(char_data, tmp_path):
    out = tmp_path / "out"
    s = tiny(char_data, out, n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=12, max_iters=120,
             eval_interval=60, eval_iters=10, learning_rate=3e-3, lr_decay_iters=120, warmup_iters=10,
             always_save_checkpoint=False)
    assert train(s) == 0
    evals = metrics(out, "eval")
    assert [e["iter"] for e in evals] == [0, 60, 120]
    assert evals[0]["val_loss"] == pytest.approx(math.log(open_dataset(char_data).vocab_size), rel=0.05)  # loss at init ~ ln(vocab)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]), rel=1e-6)
    assert len(metrics(out, "train")) == 120
    for name in ("loss.png", "train_config.yaml", "README.md", "tokenizer.json", "config.json", "model.safetensors"):
        assert (out / name).exists(), name
    code = f"""
import nanogpt_hf  # registers the model type; without it, trust_remote_code=True loads the copied model code
from transformers import pipeline
pipe = pipeline("text-generation", model={str(out)!r})
text = pipe("ROMEO:", max_new_tokens=40, do_sample=True)[0]["generated_text"]
assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40, text
print("OK")
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert "not supported" not in res.stderr


def test_precision_and_attention_follow_the_device():
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "no")
    assert resolve_mixed_precision("float32", "cpu") == "no" and resolve_mixed_precision("bfloat16", "cpu") == "bf16"
    with pytest.raises(UserError, match="float16 is not supported on CPU"):
        resolve_mixed_precision("float16", "cpu")
    assert training_attention("cpu", "bf16") == "eager"  # torch's CPU flash-attention backward is slow in bf16
    assert training_attention("cpu", "no") == training_attention("cuda", "bf16") == "sdpa"


def test_gpus_without_bf16_tensor_cores_train_in_fp16(monkeypatch):
    # torch counts a V100 or T4 as bf16-capable unless emulation is left out: slow emulated bf16 instead of fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_mixed_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100, ...
    assert resolve_mixed_precision("auto", "cuda") == "bf16"


def test_prepared_model_keeps_logits_in_the_autocast_dtype():
    # accelerate's forward wrapper copied the (B, T, vocab) logits to float32 at every forward (+3.5% on an H200 step,
    # 2.5 GB per GPT-2 micro-batch); the loss is float32 inside the model either way
    from accelerate import Accelerator

    from nanogpt_hf.training import prepare_model

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    model = scratch_model(tiny("unused", "unused"), 65).train()
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    model, _ = prepare_model(acc, model, [configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")])
    x = torch.randint(65, (2, 8))
    with acc.autocast():
        out = model(input_ids=x, shift_labels=x, use_cache=False)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert isinstance(model(input_ids=x, return_dict=False), tuple)  # the model's own forward, decorators included
    AcceleratorState._reset_state(reset_partial_state=True)


def test_an_accelerate_config_with_dynamo_does_not_compile_behind_the_compile_setting(char_data, tmp_path,
                                                                                      monkeypatch):
    # `accelerate config` with dynamo on exports ACCELERATE_DYNAMO_BACKEND: prepare() compiled the model, so
    # --compile=false compiled anyway and --compile=true (a GPU's default) crashed compiling it twice
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    counters.clear()
    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2)) == 0
    assert counters["frames"]["total"] == 0  # dynamo never ran


def test_a_compiled_model_saves_its_own_keys(char_data, tmp_path):
    # compile is on by default on a GPU: the saved folder held torch.compile's '_orig_mod.' keys and loaded as a
    # freshly initialised model (from_pretrained only warns)
    from accelerate import Accelerator

    from nanogpt_hf.checkpoint import Checkpointer

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    model = acc.prepare(scratch_model(tiny(char_data, "unused"), open_dataset(char_data).vocab_size))
    Checkpointer(acc, str(tmp_path), 1).save_model(torch.compile(model), open_dataset(char_data).tokenizer(), {})
    saved = NanoGPTForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    AcceleratorState._reset_state(reset_partial_state=True)


def test_compile_is_on_by_default_only_where_triton_can_build_kernels(monkeypatch):
    import torch.utils._triton

    from nanogpt_hf.hardware import compile_by_default

    for works in (True, False):  # no Triton (native Windows) or a GPU below compute capability 7.0
        monkeypatch.setattr(torch.utils._triton, "has_triton", lambda works=works: works)
        assert compile_by_default("cuda") is works
    assert compile_by_default("cpu") is False


def test_more_cpu_processes_than_gpus_is_a_clear_error(monkeypatch):
    # seen on a 1-GPU machine: two CPU processes trained, then rank 1 crashed in accelerate's barrier at the first
    # checkpoint ('invalid device ordinal': the barrier names the GPU of the local rank)
    from nanogpt_hf.hardware import resolve_device_type

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="2 CPU processes on a machine with 1 GPU.*CUDA_VISIBLE_DEVICES= accelerate"):
        resolve_device_type("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU machine: the tested set-up
    assert resolve_device_type("cpu") == "cpu"


def test_device_cuda_n_trains_on_that_gpu(monkeypatch, tmp_path):
    # nanoGPT's --device=cuda:1 trained on GPU 0: accelerate's one process takes the current device, never set
    from nanogpt_hf.training import make_accelerator

    class Chosen(Exception):
        pass

    def set_device(device):  # stops before accelerate looks for the (absent) GPU
        raise Chosen(device)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Chosen, match="cuda:1"):
        make_accelerator(tiny("data", tmp_path, device="cuda:1"))
    with pytest.raises(UserError, match=r"device=cuda:2 but 2 CUDA GPU\(s\) are visible; use --device=cpu"):
        make_accelerator(tiny("data", tmp_path, device="cuda:2"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="names one GPU for several processes; .* launch --gpu_ids"):
        make_accelerator(tiny("data", tmp_path, device="cuda:1"))


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_gpu_peak_by_name(monkeypatch, name, peak):
    from nanogpt_hf.hardware import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda", "bf16") == peak and peak_flops("cuda", "no") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_cpu_training_steps_do_not_page_fault():
    # glibc's defaults unmap freed activations, so each laptop-recipe step faulted ~2,900 pages back in (a quarter of
    # the step); train.py keeps freed memory in the process (hardware.keep_freed_memory). A fresh process, as in use.
    code = """
import resource, torch
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.hardware import keep_freed_memory
from nanogpt_hf.training import configure_optimizer
assert keep_freed_memory()
model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65))
opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
x = torch.randint(0, 65, (12, 64))
def step():
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
rounds = []  # the quietest of three rounds: a busy machine's own faults are not the allocator's
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(min(rounds))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # fresh: no forked heap
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < 100  # page faults per step


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_run_tracks_fp32_and_saves_a_portable_checkpoint(char_data, tmp_path):
    # dtype=auto on a bf16 CPU: bf16 autocast with eager attention (the fastest there); the same run in fp32 must
    # reach the same losses, and the checkpoint must not pin the training-time attention
    runs = {}
    for dtype in ("auto", "float32"):
        s = tiny(char_data, tmp_path / dtype, n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=12,
                 max_iters=60, eval_interval=30, eval_iters=5, learning_rate=3e-3, lr_decay_iters=60, dtype=dtype)
        assert train(s) == 0
        runs[dtype] = metrics(tmp_path / dtype, "eval")[-1]["val_loss"]
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run has another mixed precision
    assert runs["auto"] == pytest.approx(runs["float32"], abs=0.02)
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert not any("attn" in k for k in saved)
    assert NanoGPTForCausalLM.from_pretrained(tmp_path / "auto").config._attn_implementation == "sdpa"


def test_best_val_loss_only_improves_and_model_is_the_best(char_data, tmp_path):
    # a learning rate warming up to 1.0 (a divergence after the first evaluation): the saved model stays the best
    out = tmp_path / "out"
    s = tiny(char_data, out, max_iters=8, eval_interval=2, always_save_checkpoint=False, keep_states=0,
             learning_rate=1.0, warmup_iters=40, lr_decay_iters=1000)
    assert train(s) == 0
    from nanogpt_hf.checkpoint import read_trainer_state

    evals = {e["iter"]: e["val_loss"] for e in metrics(out, "eval")}
    assert evals[2] < evals[0] and all(evals[2] < evals[i] for i in (4, 6, 8))  # it diverged after step 2
    for step in (2, 4, 6, 8):  # each state's record: the best so far, and its step
        state = read_trainer_state(out / "state" / f"step-{step}")
        assert (state["best_val_loss"], state["best_step"]) == (evals[2], 2)
    saved, best = load_file(out / "model.safetensors"), load_file(out / "state" / "step-2" / "model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert f"| val | {evals[2]:.4f} |" in (out / "README.md").read_text()  # the card describes that model


def test_resume_is_exact(char_data, tmp_path):
    straight = tiny(char_data, tmp_path / "a", max_iters=6, eval_interval=3, dropout=0.1)
    assert train(straight) == 0
    from accelerate.state import AcceleratorState

    first = tiny(char_data, tmp_path / "b", max_iters=3, eval_interval=3, dropout=0.1)
    assert train(first) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = dataclasses.replace(first, max_iters=6, init_from="resume")
    assert train(resumed, explicit={"max_iters": 6, "init_from": "resume"}) == 0
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in metrics(tmp_path / "a", "train")] == [e["loss"] for e in metrics(tmp_path / "b", "train")]


def test_resume_on_another_device_says_it_is_not_bit_exact(char_data, tmp_path, capsys):
    # accelerate skips the RNG state of a device it does not have (a CUDA run resumed on a CPU) at INFO level
    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=3)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    ts_path = tmp_path / "state" / "step-3" / "trainer_state.json"
    ts = json.loads(ts_path.read_text())
    assert ts["device_type"] == "cpu"
    ts_path.write_text(json.dumps(dict(ts, device_type="cuda")))
    capsys.readouterr()
    assert train(tiny(char_data, tmp_path, max_iters=4, init_from="resume"),
                 explicit={"max_iters": 4, "init_from": "resume"}) == 0
    assert "the state was saved by 1 cuda process(es): this run continues" in capsys.readouterr().out


def test_resume_applies_a_dropout_change(char_data, tmp_path):
    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=3, dropout=0.1)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, tmp_path, max_iters=6, init_from="resume", dropout=0.0),
                 explicit={"max_iters": 6, "init_from": "resume", "dropout": 0.0}) == 0
    assert json.loads((tmp_path / "config.json").read_text())["dropout"] == 0.0


def test_finetuning_that_never_beats_step_0_still_saves_its_model(char_data, tmp_path):
    # step 0's evaluation of the loaded model is reported, not a candidate: nanoGPT would save nothing here
    assert train(tiny(char_data, tmp_path / "base", max_iters=6, eval_interval=6)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    s = tiny(char_data, tmp_path / "ft", init_from=str(tmp_path / "base"), max_iters=2, eval_interval=2,
             learning_rate=5.0, decay_lr=False, always_save_checkpoint=False, sample_at_end=True)
    assert train(s) == 0
    evals = metrics(tmp_path / "ft", "eval")
    assert evals[-1]["val_loss"] > evals[0]["val_loss"]  # it got worse, and is saved anyway
    assert (tmp_path / "ft" / "model.safetensors").exists()


def test_a_resumed_finetune_keeps_its_base_model_and_recipe_on_record(char_data, tmp_path):
    # train_config.yaml, the states and the model card said init_from=resume after a resume: the base model and
    # the recipe were lost, and the saved configuration could not repeat the run
    base, ft = tmp_path / "base", tmp_path / "ft"
    assert train(tiny(char_data, base, max_iters=2, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, ft, init_from=str(base), max_iters=2, eval_interval=2), recipes=["mine.yaml"]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, ft, init_from="resume", max_iters=4, eval_interval=2),
                 explicit={"init_from": "resume", "max_iters": 4}) == 0
    assert yaml.safe_load((ft / "train_config.yaml").read_text())["init_from"] == str(base)
    with open(ft / "state" / "step-4" / "trainer_state.json") as fh:
        assert json.load(fh)["settings"]["init_from"] == str(base)
    card = (ft / "README.md").read_text()
    assert "| base model | base |" in card and "| recipe | mine.yaml |" in card  # a local path: its name only


def test_resume_takes_the_same_dataset_written_another_way(char_data, tmp_path):
    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2)) == 0
    for spelling in (char_data + os.sep, os.path.relpath(char_data)):
        AcceleratorState._reset_state(reset_partial_state=True)
        assert train(tiny(spelling, tmp_path, init_from="resume", max_iters=2),
                     explicit={"init_from": "resume", "dataset": spelling}) == 0


def test_eval_only_on_resume_changes_nothing(char_data, tmp_path):
    from nanogpt_hf.checkpoint import state_dirs

    assert train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, keep_states=0)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, tmp_path, init_from="resume", eval_only=True, keep_states=1),
                 explicit={"init_from": "resume", "eval_only": True, "keep_states": 1}) == 0
    assert [step for step, _ in state_dirs(str(tmp_path))] == [2, 4]  # keep_states=1 had pruned step 2
    AcceleratorState._reset_state(reset_partial_state=True)
    (tmp_path / "fresh").mkdir()  # a run stopped before its first state: nothing to resume or evaluate
    (tmp_path / "fresh" / "train_config.yaml").write_text((tmp_path / "train_config.yaml").read_text())
    with pytest.raises(UserError, match="holds no resumable state .*--init_from=scratch"):
        train(tiny(char_data, tmp_path / "fresh", init_from="resume", eval_only=True),
              explicit={"init_from": "resume", "eval_only": True})


def test_max_iters_0_saves_the_starting_model(char_data, tmp_path):
    s = tiny(char_data, tmp_path, max_iters=0)
    assert train(s) == 0
    torch.manual_seed(s.seed)
    start = scratch_model(s, open_dataset(char_data).vocab_size).state_dict()
    saved = NanoGPTForCausalLM.from_pretrained(tmp_path).state_dict()
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)


def test_finetuning_refuses_a_dataset_of_another_tokenizer(char_data, tmp_path):
    assert train(tiny(char_data, tmp_path / "base", max_iters=0)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    (tmp_path / "other.txt").write_text("abc def\n" * 500)
    other = prepare(PrepareSettings(source=str(tmp_path / "other.txt"), tokenizer="char", out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="different char vocabularies"):
        train(tiny(other, tmp_path / "ft", init_from=str(tmp_path / "base")))
    state = next((tmp_path / "base" / "state").iterdir())  # holds no tokenizer: its run folder's is checked (it was
    with pytest.raises(UserError, match="different char vocabularies"):  # not, and the ids meant other chars)
        train(tiny(other, tmp_path / "ft", init_from=str(state)))
    bpe = prepare(PrepareSettings(source=str(tmp_path / "other.txt"), tokenizer="gpt2", out=str(tmp_path / "bpe")))
    with pytest.raises(UserError, match="uses the char tokenizer but dataset .* was prepared with gpt2"):
        train(tiny(bpe, tmp_path / "ft", init_from=str(tmp_path / "base")))


def test_resume_refuses_a_dataset_prepared_again_with_other_characters(tmp_path):
    # the resume trained on (same vocabulary size, other characters) and saved a tokenizer that mapped the model's
    # ids to the new characters; a larger vocabulary was refused naming a setting train.py does not have
    for i, text in enumerate(("abcdefgh\n" * 800, "qrstuvwx\n" * 800, "abcdefghijklmnopqrs\n" * 400)):
        (tmp_path / "corpus.txt").write_text(text)
        data = prepare(PrepareSettings(source=str(tmp_path / "corpus.txt"), tokenizer="char",
                                       out=str(tmp_path / "data"), force=True))
        if i == 0:
            assert train(tiny(data, tmp_path / "run", max_iters=3, eval_interval=3)) == 0
            continue
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(UserError, match=f"the run in {tmp_path / 'run'} and dataset .* have different char "
                                            "vocabularies"):
            train(tiny(data, tmp_path / "run", max_iters=6, init_from="resume"),
                  explicit={"max_iters": 6, "init_from": "resume"})


def test_sample_py_samples_from_a_resumable_state(char_data, tmp_path, capsys):
    # a state holds no tokenizer: its run folder's is used (the hint for out/state named step folders that failed)
    from nanogpt_hf.cli import sample_main

    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=3)) == 0
    capsys.readouterr()
    assert sample_main([f"--init_from={tmp_path / 'state'}", "--max_new_tokens=3"]) == 2
    assert f"choose one inside it: {tmp_path / 'state' / 'step-3'}" in capsys.readouterr().err
    assert sample_main([f"--init_from={tmp_path / 'state' / 'step-3'}", "--max_new_tokens=3", "--num_samples=1"]) == 0


def test_resume_checks_the_states_tokenizer_not_an_earlier_runs_model_folder(char_data, tmp_path):
    # a new run over a finished one keeps the old model folder (and its tokenizer) until it saves its own model: a
    # resume of the new run's states was refused against the old run's characters
    (tmp_path / "other.txt").write_text("qrstuvwxyz \n" * 600)
    other = prepare(PrepareSettings(source=str(tmp_path / "other.txt"), tokenizer="char", out=str(tmp_path / "o")))
    assert train(tiny(char_data, tmp_path / "a", max_iters=3, eval_interval=3)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(other, tmp_path / "b", max_iters=3, eval_interval=3)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.rmtree(tmp_path / "a" / "state")
    shutil.copytree(tmp_path / "b" / "state", tmp_path / "a" / "state")  # b's states beside a's model folder
    assert train(tiny(other, tmp_path / "a", max_iters=5, init_from="resume"),
                 explicit={"max_iters": 5, "init_from": "resume"}) == 0


def test_a_corpus_without_newlines_still_ends_with_a_sample(tmp_path, capsys):
    (tmp_path / "one_line.txt").write_text("to be or not to be that is the question " * 300)
    data = prepare(PrepareSettings(source=str(tmp_path / "one_line.txt"), tokenizer="char", out=str(tmp_path / "d")))
    assert train(tiny(data, tmp_path / "out", max_iters=2, eval_interval=2, sample_at_end=True)) == 0
    assert "---------- sample from" in capsys.readouterr().out


def test_ms_per_iter_counts_every_step_and_no_evaluation(char_data, tmp_path, monkeypatch):
    # a clock that moves 1 s per training step and 100 s per evaluation: every log must say 1000 ms per step, also
    # where an evaluation falls between two log lines (eval_interval 3, log_interval 2)
    import types

    import nanogpt_hf.training as T

    clock = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def timed(real, seconds):
        def run(*args, **kwargs):
            clock[0] += seconds
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(T, "train_step", timed(T.train_step, 1.0))
    monkeypatch.setattr(T, "estimate_loss", timed(T.estimate_loss, 100.0))
    assert train(tiny(char_data, tmp_path, max_iters=8, eval_interval=3, log_interval=2)) == 0
    assert [e["ms_per_iter"] for e in metrics(tmp_path, "train")] == [1000.0] * 4


def test_cpu_peak_is_one_threads_times_the_threads_and_leaves_threads_and_rng_alone(monkeypatch):
    from nanogpt_hf import hardware

    timed_on = []  # the threads torch had while the matmul was timed; the timings fixed (a shared machine's vary)

    def fixed_timings(fn, number, repeat):
        timed_on.append(torch.get_num_threads())
        fn()
        return [0.5, 0.25, 1.0]

    monkeypatch.setattr(hardware.timeit, "repeat", fixed_timings)
    before = torch.get_num_threads()  # the suite runs on one thread (conftest): two here, for a product that can fail
    torch.set_num_threads(threads := 2)
    try:
        rng = torch.get_rng_state()
        peak = hardware.measured_cpu_peak_flops.__wrapped__(torch.float32, n=256, repeats=5)
        assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(before)
    assert timed_on == [1] and peak == threads * 2 * 256**3 / 0.25  # one thread's best time, times the threads


def test_mfu_leaves_out_the_first_five_steps(char_data, tmp_path):
    # the first step's warm-up (and compilation on a GPU) would drag the running MFU down for many logs
    assert train(tiny(char_data, tmp_path, max_iters=8, eval_interval=8)) == 0
    assert ["mfu" in e for e in metrics(tmp_path, "train")] == [False] * 5 + [True] * 3


def test_a_resumed_run_does_not_credit_the_demo_recipe(char_data, tmp_path):
    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=3)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    saved = json.loads((tmp_path / "state" / "step-3" / "trainer_state.json").read_text())["settings"]
    assert train_main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=6"]) == 0
    card = (tmp_path / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    assert "| steps | 6 |" in rows and not [r for r in rows if r.startswith("| recipe |")]  # no recipe was given
    # the saved settings ran and are on record, with the one change: not the demo's
    public = {k: os.path.basename(saved[k]) for k in ("out_dir", "dataset")}  # the card names no local path
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == {**saved, **public, "max_iters": 6}


@pytest.mark.slow
def test_a_compiled_run_resumes_without_compile(char_data, tmp_path):
    # a GPU run (compiled by default) resumed on a CPU or with --compile=false: its states must hold the model's own
    # keys, not torch.compile's '_orig_mod.' ones (the resume failed with missing and unexpected keys)
    assert train(tiny(char_data, tmp_path / "run", max_iters=2, eval_interval=2, compile=True)) == 0
    state = load_file(tmp_path / "run" / "state" / "step-2" / "model.safetensors")
    assert not [k for k in state if "_orig_mod" in k]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, tmp_path / "run", max_iters=4, eval_interval=2, init_from="resume"),
                 explicit={"max_iters": 4, "compile": False}) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, tmp_path / "straight", max_iters=4, eval_interval=2)) == 0
    resumed, straight = ([e["loss"] for e in metrics(tmp_path / d, "train")] for d in ("run", "straight"))
    # steps 3 and 4 continued from the compiled steps' weights (inductor's sums may differ from eager's in the last bits)
    assert len(resumed) == 4 and resumed == pytest.approx(straight, abs=1e-4)
    resumed, straight = (load_file(tmp_path / d / "model.safetensors") for d in ("run", "straight"))
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-5) for k in straight)


def test_resuming_at_or_past_max_iters_says_there_is_nothing_to_train(char_data, tmp_path, capsys):
    assert train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert train_main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3"]) == 0
    assert "nothing to train: the state is at step 4 and max_iters is 3" in capsys.readouterr().out
    # evaluating a finished run is not an attempt to train it: no such note, just the evaluation
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train_main([f"--out_dir={tmp_path}", "--init_from=resume", "--eval_only=true"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" not in out and "eval: train loss" in out


def test_resume_prunes_states_beyond_keep_states(char_data, tmp_path):
    # a run killed between writing a state and pruning the old ones left one too many; resuming at the end saves
    # nothing new, so the resume itself must prune
    from nanogpt_hf.checkpoint import state_dirs

    assert train(tiny(char_data, tmp_path, max_iters=6, eval_interval=2, keep_states=0)) == 0
    assert [step for step, _ in state_dirs(str(tmp_path))] == [2, 4, 6]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(char_data, tmp_path, init_from="resume", keep_states=2),
                 explicit={"init_from": "resume", "keep_states": 2}) == 0
    assert [step for step, _ in state_dirs(str(tmp_path))] == [4, 6]


def test_resume_refuses_architecture_changes(char_data, tmp_path):
    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=3)) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(UserError, match="cannot resume with n_layer=4"):
        train(tiny(char_data, tmp_path, n_layer=4, init_from="resume"), explicit={"n_layer": 4})


def test_eval_only_from_a_checkpoint_folder(char_data, tmp_path, capsys):
    assert train(tiny(char_data, tmp_path / "run", max_iters=3, eval_interval=3)) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    s = tiny(char_data, tmp_path / "eval", init_from=str(tmp_path / "run"), eval_only=True)
    assert train(s) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" in out
    assert not (tmp_path / "eval").exists()  # evaluating writes nothing


def test_finetune_from_a_local_gpt2_with_block_size_cropped(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=48, n_positions=128)).save_pretrained(tmp_path / "gpt2")
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 200)
    (tmp_path / "c.txt").write_text(text)
    data = prepare(PrepareSettings(source=str(tmp_path / "c.txt"), tokenizer="gpt2", out=str(tmp_path / "bpe")))
    s = tiny(data, tmp_path / "ft", init_from=str(tmp_path / "gpt2"), block_size=16, max_iters=2, eval_interval=2,
             learning_rate=3e-5, decay_lr=False)
    assert train(s, explicit={"block_size": 16}) == 0  # else the checkpoint's own block size
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["block_size"] == 16 and cfg["activation_function"] == "gelu_new" and cfg["vocab_size"] == 50257
    # the saved settings are the model's, not the architecture in the settings (2 layers, 32 wide, no bias)
    saved = yaml.safe_load((tmp_path / "ft" / "train_config.yaml").read_text())
    assert (saved["n_layer"], saved["n_head"], saved["n_embd"], saved["bias"], saved["block_size"]) == (3, 4, 48, True, 16)
    with pytest.raises(UserError, match="block_size 256 is larger than the checkpoint's 128: use --block_size=128 or less"):
        train(dataclasses.replace(s, block_size=256, out_dir=str(tmp_path / "ft2")), explicit={"block_size": 256})


def test_wandb_offline_tracker(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert train(tiny(char_data, tmp_path / "out", wandb_log=True, max_iters=2, eval_interval=2)) == 0
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert runs and glob.glob(os.path.join(runs[0], "*.wandb"))


def test_two_processes_match_one_process(char_data, tmp_path, monkeypatch):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 with 3 micro-batches of 4 rows per step:
    each process takes half of the 12 rows, as 3 micro-batches of 2 (accumulated, gradients synchronised on the
    last); the ranks end with identical weights, and their losses equal a one-process run's within 1e-5. The data is
    a mixture of two folders: each source's losses and tokens are the same too."""
    copy = shutil.copytree(char_data, tmp_path / "copy")  # the same vocabulary, drawn as a second source
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "import nanogpt_hf.training as T\n"
        "seen = {}\n"
        "class Recording(T.Accelerator):\n"
        "    def prepare(self, *args):\n"
        "        out = super().prepare(*args)\n"
        "        seen['acc'], seen['model'] = self, out[0]\n"
        "        return out\n"
        "T.Accelerator = Recording\n"
        "code = T.main(sys.argv[1:])\n"
        "acc = seen['acc']\n"
        "sd = acc.unwrap_model(seen['model']).state_dict()\n"
        "torch.save(sd, f\"{sys.argv[-1].split('=')[1]}/rank{acc.process_index}.pt\")\n"
        "sys.exit(code)\n"
    )
    args = [f"--dataset={char_data}:0.6,{copy}:0.4", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--gradient_accumulation_steps=3", "--max_iters=4", "--eval_interval=4",
            "--eval_iters=3", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=1", "--lr_decay_iters=4",
            "--dtype=float32", "--device=cpu", "--sample_at_end=false", "--backend=gloo"]  # one process ignores it
    env = cpu_processes_env()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two, one = tmp_path / "two", tmp_path / "one"
    with InBackground(launch + [str(script), *args, f"--out_dir={two}"], timeout=600, env=env) as launched:
        # meanwhile, the one-process reference: the same script, in this process
        monkeypatch.setattr(T, "Accelerator", T.Accelerator)  # the script replaces it: put back after the test
        monkeypatch.setattr(sys, "argv", [str(script), *args, f"--out_dir={one}"])
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(script), run_name="__main__")
        assert exited.value.code == 0
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    r0, r1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert all(torch.allclose(r0[k], single[k], atol=1e-5) for k in r0)
    losses_two = [e["loss"] for e in metrics(two, "train")]
    losses_one = [e["loss"] for e in metrics(one, "train")]
    assert len(losses_two) == 4 and losses_two == pytest.approx(losses_one, abs=1e-5)
    (a, b), name = (metrics(out, "eval")[-1] for out in (two, one)), os.path.basename(char_data)
    assert a.keys() == b.keys() and a["tokens/copy"] + a[f"tokens/{name}"] == a["tokens"] == 4 * 12 * 32
    numbers = [{k: v for k, v in e.items() if k != "type"} for e in (a, b)]  # val_loss/copy, tokens/copy, ...
    assert numbers[0] == pytest.approx(numbers[1], abs=1e-5)


@pytest.mark.slow
def test_fsdp_saves_a_full_model_that_loads_without_the_package(char_data, tmp_path):
    # under FSDP the first save deadlocked (rank 0 alone gathered the sharded weights); FSDP2 also swaps the model's
    # class, whose code save_pretrained copied instead of ours. eval_iters 3 over 2 processes: uneven forwards hung.
    # With the modern switches (their modules sharded too), GPT-2's tied head kept
    args = ["--position_embedding=rotary", "--norm=rmsnorm", "--qk_norm", "--n_kv_head=1", "--activation_function=relu2",
            "--dataset=" + char_data, "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=2",
            "--eval_iters=3", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=1", "--lr_decay_iters=4",
            "--dtype=float32", "--device=cpu", "--sample_at_end=false"]
    env = cpu_processes_env(PYTHONPATH=ROOT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    # FSDP: 2 steps, then resumed from that state (sharded weights and optimizer) to 4; one process: 4 straight
    def fsdp_runs():
        return [run_group(launch + [os.path.join(ROOT, "tests", "fsdp_on_cpu.py"), *args, f"--out_dir={fsdp}", *extra],
                          timeout=600, env=env) for extra in (["--max_iters=2"], ["--init_from=resume"])]

    with ThreadPoolExecutor(1) as pool:  # the launches beside the one-process reference (in this process)
        launches = pool.submit(fsdp_runs)
        assert train_main([*args, f"--out_dir={one}"]) == 0
        outputs = launches.result()
    assert [res.returncode for res in outputs] == [0, 0], [res.stderr[-3000:] for res in outputs]
    assert f"resumed from {fsdp / 'state' / 'step-2'} at step 2" in outputs[1].stdout
    a, b = load_file(fsdp / "model.safetensors"), load_file(one / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert metrics(fsdp, "eval")[-1]["val_loss"] == pytest.approx(metrics(one, "eval")[-1]["val_loss"], abs=1e-5)
    losses = [[e["loss"] for e in metrics(out, "train")] for out in (fsdp, one)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    code = ("from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(fsdp)!r}, trust_remote_code=True); "
            "print(type(m).__name__, m.lm_head.weight is m.transformer.wte.weight)")
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.stdout.split() == ["NanoGPTForCausalLM", "True"], res.stderr[-3000:]


def test_deepspeed_is_refused(char_data, tmp_path, monkeypatch):
    # DeepSpeed's engine would step the optimizer at every micro-batch and ignore grad_clip in this loop
    import nanogpt_hf.training as T
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator(T.Accelerator):
        distributed_type = DistributedType.DEEPSPEED  # what `accelerate config` with DeepSpeed gives on GPUs

    monkeypatch.setattr(T, "Accelerator", DeepSpeedAccelerator)
    with pytest.raises(UserError, match="DeepSpeed is not supported: .* use FSDP or DDP"):
        train(tiny(char_data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, from_hub, listed", [("shakespeare", False, None),  # the embedded corpus
                                                       ("karpathy/tiny_shakespeare", True, ["karpathy/tiny_shakespeare"])])
def test_the_card_names_a_hub_dataset_only_when_the_data_came_from_the_hub(char_data, tmp_path, source, from_hub,
                                                                           listed):
    from huggingface_hub import ModelCard

    data = shutil.copytree(char_data, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "source": source, "hub_id": source if from_hub else None}))
    assert train(tiny(str(data), tmp_path / "out", max_iters=1, eval_interval=1)) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.to_dict().get("datasets") == listed and f"| dataset | {source} |" in card.text


def test_push_to_hub_from_training_uploads_and_survives_failure(char_data, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from huggingface_hub import HfApi, RepoUrl

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, repo_id, folder_path, commit_message, **kw:
                        commits.append((repo_id, sorted(p.name for p in Path(folder_path).rglob("*")), commit_message)))
    s = tiny(char_data, tmp_path / "out", max_iters=2, eval_interval=2, push_to_hub=True, hub_model_id="me/tiny")
    assert train(s) == 0
    (repo, files, message), = commits
    assert repo == "me/tiny" and "end of training" in message
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "loss.png"} <= set(files)
    assert not any(f.startswith("step-") or f == "optimizer.bin" for f in files)  # never the resumable states
    assert "me/tiny" in (tmp_path / "out" / "README.md").read_text()

    AcceleratorState._reset_state(reset_partial_state=True)

    def offline(self, *a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(HfApi, "upload_folder", offline)
    capsys.readouterr()
    s = tiny(char_data, tmp_path / "out2", max_iters=2, eval_interval=2, push_to_hub=True, hub_model_id="me/tiny",
             hub_strategy="every_save")
    assert train(s) == 0  # training goes on and ends normally
    err = capsys.readouterr().err
    assert "me/tiny" in err and "Traceback" not in err
    assert (tmp_path / "out2" / "model.safetensors").exists()


def test_tensorboard_tracker(char_data, tmp_path):
    pytest.importorskip("tensorboard")
    assert train(tiny(char_data, tmp_path / "out", log_with="tensorboard", max_iters=2, eval_interval=2)) == 0
    assert glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)


def test_tracker_that_cannot_start_is_a_clear_error(char_data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    def no_login(self, *args, **kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(Accelerator, "init_trackers", no_login)
    with pytest.raises(UserError, match="cannot start the tracker: No API key configured.*WANDB_MODE=offline"):
        train(tiny(char_data, tmp_path / "out", wandb_log=True, max_iters=2))
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("tracker", ["tensorboard", "mlfow"])
def test_a_tracker_that_is_unknown_or_not_installed_is_a_clear_error(char_data, tmp_path, monkeypatch, tracker):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "tensorboard" in name else find_spec(name, *a))
    with pytest.raises(UserError, match=f"the tracker '{tracker}' is unknown or not installed.*pip install {tracker}"):
        train(tiny(char_data, tmp_path, log_with=tracker))


def test_shipped_recipes_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an installed console script, run outside the clone
    for name in ("recipes/shakespeare_char_cpu.yaml", "shakespeare_char_cpu.yaml"):
        s, _ = parse_command(TrainSettings, [name], "t", "", recipes=True)
        assert s.n_embd == 128 and s.block_size == 64
    with pytest.raises(UserError, match="recipe 'nope.yaml' does not exist; the shipped ones: default.yaml, "):
        parse_command(TrainSettings, ["nope.yaml"], "t", "", recipes=True)


def test_init_from_a_missing_folder_says_so(char_data, tmp_path, capsys):
    with pytest.raises(UserError, match="checkpoint folder '.*nothing' does not exist"):
        train(tiny(char_data, tmp_path / "out", init_from=str(tmp_path / "nothing")))
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty out_dir behind
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="'.*empty' is not a checkpoint folder \\(no config.json\\)"):
        train(tiny(char_data, tmp_path / "out", init_from=str(tmp_path / "empty")))
    # a Hub id or a right GPT-2 name that cannot be fetched (offline here): the Hub library's error, on one line
    for ref in ("nobody/nothing", "gpt2-xl"):
        AcceleratorState._reset_state(reset_partial_state=True)
        capsys.readouterr()
        assert train_main([f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={ref}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "did you mean" not in err, err


def test_a_corpus_given_as_the_dataset_names_the_prepare_command(tmp_path):
    corpus = tmp_path / "my.txt"
    corpus.write_text("To be, or not to be\n" * 50)
    with pytest.raises(UserError, match=f"'{corpus}' is not a prepared dataset .*python prepare.py {corpus} "
                                        f"--out=data/my, then use data/my"):
        train(tiny(str(corpus), tmp_path / "out"))


def test_an_invalid_hub_repository_id_is_refused_before_training(char_data, tmp_path):
    with pytest.raises(UserError, match="hub_model_id 'bad id' is invalid .*set --hub_model_id=user/name"):
        train(tiny(char_data, tmp_path / "out", push_to_hub=True, hub_model_id="bad id"))
    with pytest.raises(UserError, match="taken from out_dir's name 'my run' is invalid"):
        train(tiny(char_data, tmp_path / "my run", push_to_hub=True))
    assert not (tmp_path / "out").exists() and not (tmp_path / "my run").exists()


@pytest.mark.parametrize("typo, name", [("scrach", "scratch"), ("resum", "resume"), ("gpt2-mediun", "gpt2-medium")])
def test_a_mistyped_init_from_is_named(char_data, tmp_path, typo, name):
    with pytest.raises(UserError, match=f"'{typo}' is not a folder or a known model \\(did you mean '{name}'\\?\\)"):
        train(tiny(char_data, tmp_path / "out", init_from=typo))
