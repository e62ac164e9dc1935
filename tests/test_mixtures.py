"""Your own data in the loop: weighted mixtures of prepared folders, the wsd and constant schedules, the LR jump of an
extended cosine, total_batch_size, and the gradient norm in the log."""

import json
import lzma
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from accelerate.utils import set_seed

from warm import warm_popen
from nanogpt_hf.cli import train_main
from nanogpt_hf.data import Mixture, PrepareSettings, TokenStream, parse_mixture, prepare, sample_batch
from nanogpt_hf.settings import TrainSettings, parse_command
from nanogpt_hf.training import get_lr, learning_rates, micro_batches, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2", "--dtype=float32",
        "--device=cpu", "--compile=false", "--sample_at_end=false", "--dropout=0.0",
        "--gradient_accumulation_steps=1"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two char datasets with one vocabulary: 'plays' (Shakespeare) and 'mirror' (each of its lines reversed), so a
    window tells its source; and 'other', whose characters differ."""
    root = tmp_path_factory.mktemp("mix")
    with lzma.open(os.path.join(ROOT, "nanogpt_hf", "assets", "shakespeare.jsonl.xz"), "rt") as fh:
        text = json.loads(fh.readline())["text"][:20_000]
    texts = {"plays": text, "mirror": "\n".join(line[::-1] for line in text.split("\n")), "other": text.upper()}
    out = {}
    for name, t in texts.items():
        (root / f"{name}.txt").write_text(t)
        out[name] = prepare(PrepareSettings(source=str(root / f"{name}.txt"), tokenizer="char", out=str(root / name)))
    return out, texts


def source_of(x_row: torch.Tensor, stream_text: dict, itos: list) -> str:
    window = "".join(itos[i] for i in x_row.tolist())
    found = [name for name, t in stream_text.items() if window in t]
    assert len(found) == 1, (window, found)
    return found[0]


def test_mixture_rows_follow_the_weights_and_are_the_same_for_any_process_count(corpora):
    (paths, texts), G = corpora, 4
    from nanogpt_hf.tokenization import load_tokenizer

    vocab = load_tokenizer(paths["plays"]).get_vocab()
    itos = [c for c, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    mix = Mixture([TokenStream(paths["plays"]), TokenStream(paths["mirror"])], [0.8, 0.2], ["plays", "mirror"])
    s = TrainSettings(batch_size=4, gradient_accumulation_steps=G, block_size=16, seed=3)
    counts, tokens = {"plays": 0, "mirror": 0}, {"plays": 0, "mirror": 0}
    for step in range(60):
        one = micro_batches(mix, s, step, 0, 1, "cpu")
        two = micro_batches(mix, s, step, 0, 2, "cpu") + micro_batches(mix, s, step, 1, 2, "cpu")
        x1, x2 = torch.cat([x for x, _ in one]), torch.cat([x for x, _ in two])
        assert torch.equal(x1, x2)  # 1 and 2 processes: the same rows, in the same order
        for row in x1:
            counts[source_of(row, {k: texts[k] for k in counts}, itos)] += 1
        for k, n in mix.tokens(s.seed, step, G, s.batch_size, s.block_size).items():
            tokens[k] += n
    rows = sum(counts.values())  # 960: a share of 0.8 has a standard deviation of 0.013
    assert abs(counts["plays"] / rows - 0.8) < 0.05 and counts["mirror"] > 0
    assert tokens == {k: n * s.block_size for k, n in counts.items()}  # what is logged is what was drawn
    # one source: the batches of a plain stream, as before mixtures
    alone = Mixture([TokenStream(paths["plays"])])
    a = sample_batch(alone, seed=1, step=2, index=3, batch_size=4, block_size=16)
    b = sample_batch(TokenStream(paths["plays"]), seed=1, step=2, index=3, batch_size=4, block_size=16)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_mixture_settings(corpora, tmp_path, capsys):
    paths, _ = corpora
    assert parse_mixture(f"{paths['plays']}:3,{paths['mirror']}") == {paths["plays"]: 3.0, paths["mirror"]: 1.0}
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"dataset:\n  {paths['plays']}: 0.7\n  {paths['mirror']}: 0.3\n")
    s, _ = parse_command(TrainSettings, [str(recipe)], "train.py", "", recipes=True)
    assert parse_mixture(s.dataset) == {paths["plays"]: 0.7, paths["mirror"]: 0.3}
    for bad, named in ((f"{paths['plays']}:0.7,{paths['mirror']}:-1", "must be a positive number"),
                       (f"{paths['plays']}:1,{paths['other']}:1", f"{paths['plays']} and {paths['other']} were prepared with different"),
                       (f"{paths['plays']},{tmp_path}/x/plays", "name each source once")):
        rc = train_main([f"--dataset={bad}", f"--out_dir={tmp_path / 'o'}", *TINY, "--max_iters=1"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and named in lines[0], lines
    assert not os.path.exists(tmp_path / "o" / "state")


def events(out_dir, kind):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in e.items() if k not in ("ms_per_iter", "tokens_per_s", "mfu")}
                for e in map(json.loads, fh) if e["type"] == kind]


def test_a_mixture_run_killed_and_resumed_equals_an_uninterrupted_one(corpora, tmp_path):
    paths, _ = corpora
    args = [f"--dataset={paths['plays']}:0.75,{paths['mirror']}:0.25", "--max_iters=12", "--eval_interval=4", *TINY,
            "--gradient_accumulation_steps=2"]
    assert train_main([*args, f"--out_dir={tmp_path / 'straight'}"]) == 0
    ev = events(tmp_path / "straight", "eval")
    assert [e["iter"] for e in ev] == [0, 4, 8, 12]
    for e in ev:  # the val that selects the best model is the weighted mean of the sources'
        assert e["val_loss"] == pytest.approx(0.75 * e["val_loss/plays"] + 0.25 * e["val_loss/mirror"], rel=1e-6)
        assert e["train_loss"] == pytest.approx(0.75 * e["train_loss/plays"] + 0.25 * e["train_loss/mirror"],
                                                rel=1e-6)
        assert e["tokens/plays"] + e["tokens/mirror"] == e["tokens"] == e["iter"] * 4 * 2 * 32
    assert ev[-1]["tokens/mirror"] > 0 and ev[-1]["tokens/plays"] > ev[-1]["tokens/mirror"]
    # SIGKILL after step 6 (the newest state: step 4), then resume to the end
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={killed}"]
    proc = warm_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    for line in proc.stdout:
        if line.startswith("iter 6:"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    watchdog.cancel()
    assert proc.wait() == -signal.SIGKILL
    assert train_main([*args, f"--out_dir={killed}", "--init_from=resume"]) == 0
    assert events(killed, "eval") == ev and events(killed, "train") == events(tmp_path / "straight", "train")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.getsize(killed / "loss.png") > 0


def test_wsd_and_constant_schedules_equal_their_definition():
    lr, low = 1e-3, 1e-4
    kw = dict(learning_rate=lr, min_lr=low, warmup_iters=10, lr_decay_iters=100)
    wsd = [get_lr(it, schedule="wsd", warmdown_frac=0.4, **kw) for it in range(120)]
    assert wsd[0] == pytest.approx(lr * 1 / 11) and wsd[9] == pytest.approx(lr * 10 / 11)  # warmup, as cosine's
    assert wsd[10] == wsd[35] == wsd[60] == lr  # stable until the last 40 of 100 steps
    assert wsd[70] == pytest.approx(low + (lr - low) * 30 / 40) and wsd[90] == pytest.approx(low + (lr - low) / 4)
    assert wsd[100] == pytest.approx(low) and wsd[119] == low
    assert [get_lr(it, schedule="constant", **kw) for it in (0, 50, 200)] == [lr] * 3
    s = TrainSettings(lr_schedule="wsd", warmdown_frac=0.5, max_iters=40, warmup_iters=0, optimizer="muon",
                      learning_rate=1e-3, muon_lr=0.02, min_lr=0.0)
    assert learning_rates(s, 10) == [1e-3, pytest.approx(0.02)]  # stable; Muon follows the same curve
    assert learning_rates(s, 30) == [pytest.approx(0.5e-3), pytest.approx(0.01)]  # half-way down the warmdown


def test_an_extended_run_says_the_learning_rate_jump_and_wsd_has_none(corpora, tmp_path, capsys):
    paths, _ = corpora
    for schedule in ("cosine", "wsd"):
        out = tmp_path / schedule
        base = [f"--dataset={paths['plays']}", f"--out_dir={out}", f"--lr_schedule={schedule}", "--eval_interval=4",
                "--warmdown_frac=0.25", *TINY]
        assert train_main([*base, "--max_iters=4"]) == 0
        capsys.readouterr()
        assert train_main([*base, "--max_iters=16", "--init_from=resume"]) == 0
        said = [line for line in capsys.readouterr().out.splitlines() if "learning rate jumps" in line]
        lr = [e["lr"] for e in events(out, "train")]  # the i-th: step i's
        expected = [get_lr(i, 1e-2, 1e-3, 2, 16, schedule=schedule, warmdown_frac=0.25) for i in range(16)]
        assert lr[4:] == pytest.approx(expected[4:], rel=1e-12)
        if schedule == "cosine":  # step 3 was near min_lr on the curve of 4 steps; the curve of 16 is back up
            assert said == [f"the learning rate jumps with these settings: {get_lr(3, 1e-2, 1e-3, 2, 4):.2e} at "
                            f"step 3 -> {expected[4]:.2e} at step 4 (lr_schedule=wsd keeps it while a run is "
                            "extended)"], said
        else:  # wsd: the 4 steps ended in the stable part; the extended run stays there until its own warmdown
            assert said == [] and lr[2:12] == pytest.approx([1e-2] * 10, rel=1e-12) and lr[15] == pytest.approx(1e-3 + 9e-3 / 4)


def test_total_batch_size_derives_accumulation_and_refuses_a_remainder(corpora, tmp_path, capsys):
    paths, _ = corpora
    args = [f"--dataset={paths['plays']}", *TINY, "--max_iters=1", "--eval_interval=1"]
    assert train_main([*args, f"--out_dir={tmp_path / 'a'}", "--total_batch_size=384"]) == 0
    assert "tokens per iteration: 384 = 4 batch x 3 micro-batches x 32 block" in capsys.readouterr().out
    assert train_main([*args, f"--out_dir={tmp_path / 'b'}", "--total_batch_size=500"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "total_batch_size 500 is not a multiple of batch_size x block_size (4 x 32 = 128)" \
        in lines[0], lines


def test_the_logged_gradient_norm_is_the_norm_of_the_gradient(corpora, tmp_path):
    paths, _ = corpora
    s = parse_command(TrainSettings, [f"--dataset={paths['plays']}", f"--out_dir={tmp_path}", *TINY,
                                      "--max_iters=1", "--eval_interval=1", "--grad_clip=0.01"], "train.py", "")[0]
    assert train(s) == 0
    logged = events(tmp_path, "train")[0]["grad_norm"]
    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM

    set_seed(s.seed)  # the run's initial weights
    model = NanoGPTForCausalLM(NanoGPTConfig(block_size=32, vocab_size=TokenStream(paths["plays"]).meta["vocab_size"],
                                             n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False))
    x, y = sample_batch(TokenStream(paths["plays"]), seed=s.seed, step=0, index=0, batch_size=4, block_size=32)
    model(input_ids=x, shift_labels=y).loss.backward()
    direct = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert logged == pytest.approx(direct, rel=1e-5) and logged > 0.01  # the norm before clipping
    assert events(tmp_path, "train")[0]["clipped"] is True  # grad_clip 0.01
    from matplotlib.image import imread

    assert imread(tmp_path / "loss.png").shape[1] == 1400  # two panels: the losses, the gradient's norm


def test_a_resume_may_change_the_mixture_a_new_phase(corpora, tmp_path, capsys):
    paths, _ = corpora
    base = [f"--out_dir={tmp_path}", "--eval_interval=4", "--always_save_checkpoint=false", *TINY]
    assert train_main([*base, f"--dataset={paths['plays']}", "--max_iters=4"]) == 0
    capsys.readouterr()
    phase = f"{paths['plays']}:0.5,{paths['mirror']}:0.5"
    assert train_main([*base, f"--dataset={phase}", "--max_iters=8", "--init_from=resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming with dataset changed: '{paths['plays']}' -> '{phase}'" in out
    assert "the dataset changed: the best val loss starts again with this phase" in out
    last, mix = events(tmp_path, "eval")[-1], Mixture([TokenStream(paths[k]) for k in ("plays", "mirror")], [1, 1],
                                                      ["plays", "mirror"])
    phase_two = sum(mix.tokens(1337, step, 1, 4, 32)["plays"] for step in range(4, 8))  # 4 rows of 32 a step
    assert last["tokens/plays"] == 4 * 128 + phase_two  # the first phase's tokens carried over
    assert last["tokens/plays"] + last["tokens/mirror"] == last["tokens"] == 8 * 128
    assert "saved the model" in out.split("step 8:")[1]  # the new phase's first val is its best so far
