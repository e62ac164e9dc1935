"""Wall time of nanoGPT's laptop run against ours, back to back on the same machine and the same prepared data.

    python benchmarks/bench_wall_time.py DATASET_DIR [--runs=ours-auto,ours-fp32,nanogpt] [--max_iters=2000]
                                         [--seed=1337] [--base=DIR]

DATASET_DIR is a prepared character-level dataset (python prepare.py tinyshakespeare.txt --tokenizer=char
--out=data/tiny_char). Each run is a fresh process timed from its start (imports included) to its end:
- nanogpt: nanoGPT's train.py loop for the shakespeare_char_cpu values, re-implemented here on nanoGPT's model.py
  (tests/nanogpt_reference.py): fp32 (what nanoGPT uses on a CPU), its get_batch from uint16 .bin files, evaluation every
  250 steps over 20 batches per split, torch.save of ckpt.pt when val loss improves, a printed line per step;
- ours-auto / ours-fp32: python train.py recipes/shakespeare_char_cpu.yaml with --dtype=auto / float32 (no final
  sample: nanoGPT does not print one).
- base-auto / base-fp32: the same from DIR, another checkout of this repository (git archive COMMIT | tar -x -C DIR),
  to measure a change against the code before it in the same alternation.
Prints, per run: wall and CPU seconds (user + system), the wall seconds outside the training steps (wall minus the sum
of the logged step times: imports, set-up, evaluations, saves; on a busy machine the steps vary most), median ms/iter,
the last evaluation's val loss (20 batches) and the saved model's loss on every token of the val split; then each
kind's medians against nanoGPT's.
A kind may be listed more than once (--runs=ours-auto,nanogpt,ours-auto,nanogpt): runs alternate in that order.
"""

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAPTOP = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr_decay_iters=2000,
              learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
              grad_clip=1.0, eval_interval=250, eval_iters=20)


def nanogpt_loop(data_dir: str, out_dir: str, max_iters: int, seed: int) -> None:
    """The child process: nanoGPT's train.py as it runs the laptop command (single process, CPU, fp32)."""
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from nanogpt_reference import RefGPT

    c = dict(LAPTOP, max_iters=max_iters)
    torch.manual_seed(seed)
    train_data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    val_data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    vocab_size = json.load(open(os.path.join(data_dir, "meta.json")))["vocab_size"]
    model = RefGPT(dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                        bias=False, vocab_size=vocab_size, dropout=0.0))
    for name, p in model.named_parameters():  # nanoGPT's init
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * c["n_layer"]) if name.endswith("c_proj.weight") else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=c["learning_rate"],
                                  betas=(c["beta1"], c["beta2"]))

    def get_batch(split):
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - c["block_size"], (c["batch_size"],))
        x = torch.stack([torch.from_numpy(data[i:i + c["block_size"]].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + c["block_size"]].astype(np.int64)) for i in ix])
        return x, y

    def loss_of(x, y):
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            out[split] = torch.stack([loss_of(*get_batch(split)) for _ in range(c["eval_iters"])]).mean().item()
        model.train()
        return out

    def get_lr(it):
        if it < c["warmup_iters"]:
            return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
        ratio = (it - c["warmup_iters"]) / (c["lr_decay_iters"] - c["warmup_iters"])
        return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (c["learning_rate"] - c["min_lr"])

    x, y = get_batch("train")
    best_val_loss, t0, times = 1e9, time.time(), []
    for iter_num in range(c["max_iters"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "iter_num": iter_num, "best_val_loss": best_val_loss},
                               os.path.join(out_dir, "ckpt.pt"))
            t0 = time.time()
        if iter_num == c["max_iters"]:
            break
        loss = loss_of(x, y)
        x, y = get_batch("train")  # nanoGPT fetches the next batch while the step runs
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        times.append(dt)
        print(f"iter {iter_num}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms", flush=True)
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump({"val_loss": losses["val"], "median_ms": statistics.median(times) * 1000, "steps_s": sum(times)}, fh)


def export_bins(dataset: str, out: str) -> None:
    """Our prepared splits as nanoGPT's train.bin / val.bin (uint16), so both read the same tokens."""
    import numpy as np

    sys.path.insert(0, ROOT)
    from nanogpt_hf.data import open_dataset

    data = open_dataset(dataset)
    for split in ("train", "val"):
        stream = data.stream(split)
        np.concatenate(stream.chunks).astype(np.uint16).tofile(os.path.join(out, f"{split}.bin"))
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump({"vocab_size": data.vocab_size}, fh)


def full_val_loss(name: str, out: str, dataset: str) -> float:
    """The saved model's mean loss on every token of the val split (data.sequential_windows), not a 20-batch sample."""
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from nanogpt_hf import NanoGPTForCausalLM
    from nanogpt_hf.data import open_dataset, sequential_windows
    from nanogpt_reference import RefGPT

    data = open_dataset(dataset)
    if name == "nanogpt":
        model = RefGPT(dict(n_layer=LAPTOP["n_layer"], n_head=LAPTOP["n_head"], n_embd=LAPTOP["n_embd"],
                            block_size=LAPTOP["block_size"], bias=False, vocab_size=data.vocab_size, dropout=0.0))
        model.load_state_dict(torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu")["model"])
    else:
        ours = NanoGPTForCausalLM.from_pretrained(out)
        model = lambda x: ours(input_ids=x, use_cache=False).logits  # noqa: E731
    total, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in sequential_windows(data.stream("val"), LAPTOP["block_size"], 64):
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            tokens += y.numel()
    return total / tokens


def cpu_seconds() -> float:  # user + system time of the finished children so far
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], log_path: str, root: str = ROOT) -> tuple[float, float]:
    """The command's wall seconds and CPU seconds (on a busy machine, CPU time varies less than wall time)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=root))
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    if sys.argv[1:2] == ["--nanogpt-child"]:
        nanogpt_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    if len(args) != 1 or not os.path.isfile(os.path.join(args[0], "meta.json")):
        sys.exit("usage: python benchmarks/bench_wall_time.py DATASET_DIR [--runs=ours-auto,ours-fp32,nanogpt] "
                 "[--max_iters=2000] [--seed=1337] [--base=DIR]  (DATASET_DIR: a prepared character-level dataset)")
    dataset = os.path.abspath(args[0])
    runs = opts.get("runs", "ours-auto,ours-fp32,nanogpt").split(",")
    max_iters = int(opts.get("max_iters", LAPTOP["max_iters"]))
    seed = int(opts.get("seed", 1337))
    work = tempfile.mkdtemp(prefix="bench_wall_")
    export_bins(dataset, work)
    results = {name: [] for name in runs}
    for i, name in enumerate(runs):  # a name may repeat: alternate runs so that machine noise hits both sides
        out = os.path.join(work, f"{i}-{name}")
        os.makedirs(out)
        if name == "nanogpt":
            cmd = [sys.executable, os.path.abspath(__file__), "--nanogpt-child", work, out, str(max_iters),
                   str(seed)]
        else:
            dtype = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[name.split("-")[1]]
            cmd = [sys.executable, "train.py", "recipes/shakespeare_char_cpu.yaml", f"--dataset={dataset}",
                   f"--out_dir={out}", f"--dtype={dtype}", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
                   f"--seed={seed}", "--sample_at_end=false"]
        root = os.path.abspath(opts["base"]) if name.startswith("base-") else ROOT
        wall, cpu = run(cmd, os.path.join(out, "log.txt"), root)
        if name == "nanogpt":
            r = json.load(open(os.path.join(out, "result.json")))
        else:
            events = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            ms = [e["ms_per_iter"] for e in events if e["type"] == "train"]  # one event a step (log_interval 1)
            r = {"val_loss": [e for e in events if e["type"] == "eval"][-1]["val_loss"],
                 "median_ms": statistics.median(ms), "steps_s": sum(ms) / 1000}
        results[name].append((wall, cpu, wall - r["steps_s"]))
        print(f"{name:10s} wall {wall:6.1f} s | cpu {cpu:6.1f} s | outside steps {wall - r['steps_s']:5.1f} s | median "
              f"{r['median_ms']:5.1f} ms/iter | val loss {r['val_loss']:.4f} (every val token: "
              f"{full_val_loss(name, out, dataset):.4f})", flush=True)
    if "nanogpt" in results:  # outside steps: imports, set-up, evaluations, saves (less exposed to a busy machine)
        base = [statistics.median(t) for t in zip(*results["nanogpt"])]
        for name, runs_ in results.items():
            print(f"{name:10s} medians: " + ", ".join(f"{what} {m:6.1f} s = {m / b:.2f}x" for what, m, b in zip(
                ("wall", "cpu", "outside steps"), (statistics.median(t) for t in zip(*runs_)), base)) + " nanoGPT's")
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
