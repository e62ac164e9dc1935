"""`python sample.py` against nanoGPT's sample.py as whole processes, on the same checkpoint.

    python benchmarks/bench_sample.py [--rounds=5] [--num_samples=2] [--max_new_tokens=500] [--dtype=auto]

A nanoGPT checkpoint of the laptop model's shape (4 layers, 4 heads, 128 wide, block 64, tiny Shakespeare's 65
characters; nanoGPT's initialisation: sampling costs the same whatever the weights) is written as nanoGPT's train.py
writes it (ckpt.pt, meta.pkl) and converted with `nanogpt-hf convert-nanogpt`. Then, alternating, --rounds times:
- nanoGPT: nanoGPT's sample.py for that checkpoint (its imports: torch, tiktoken; torch.load of ckpt.pt, meta.pkl;
  fp32 without autocast on a CPU; GPT.generate: crop to block_size, full forward, logits of the last position,
  temperature 0.8, top_k 200, multinomial), on nanoGPT's model.py (tests/nanogpt_reference.py);
- ours: `python sample.py --out_dir=<converted> --num_samples=N --max_new_tokens=M [--dtype=...]`.
Each is timed from process start to exit (imports included); also `python -c "import ..."` of each side's imports,
and of what any transformers model imports (torch, transformers.modeling_utils: the floor for a PreTrainedModel).
Prints every time, the medians and ours / nanoGPT.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65
LAPTOP = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, vocab_size=len(CHARS), dropout=0.0)


def write_nanogpt_checkpoint(folder: str) -> str:
    """ckpt.pt and meta.pkl as nanoGPT's train.py and prepare.py write them."""
    import math
    import pickle

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from nanogpt_reference import RefGPT

    torch.manual_seed(1337)
    model = RefGPT(LAPTOP)
    for name, p in model.named_parameters():  # nanoGPT's init
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * LAPTOP["n_layer"]) if name.endswith("c_proj.weight") else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": LAPTOP, "iter_num": 2000, "best_val_loss": 1.88,
                "config": dict(dataset="shakespeare_char", batch_size=12, block_size=64,
                               gradient_accumulation_steps=1)}, os.path.join(folder, "ckpt.pt"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as fh:
        pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                     "stoi": {c: i for i, c in enumerate(CHARS)}}, fh)
    return os.path.join(folder, "ckpt.pt")


def nanogpt_sample(folder: str, num_samples: int, max_new_tokens: int) -> None:
    """The child process: nanoGPT's sample.py with its defaults (start "\\n", seed 1337, temperature 0.8, top_k 200)."""
    import pickle
    from contextlib import nullcontext

    import tiktoken  # noqa: F401  (nanoGPT's sample.py imports it whatever the tokenizer)
    import torch
    from torch.nn import functional as F

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from nanogpt_reference import RefGPT

    torch.manual_seed(1337)
    checkpoint = torch.load(os.path.join(folder, "ckpt.pt"), map_location="cpu")
    model = RefGPT(checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with open(os.path.join(folder, "meta.pkl"), "rb") as fh:
        meta = pickle.load(fh)
    stoi, itos = meta["stoi"], meta["itos"]
    x = torch.tensor([stoi[c] for c in "\n"], dtype=torch.long)[None, ...]
    t = model.transformer
    with torch.no_grad(), nullcontext():  # nanoGPT: no autocast on a CPU
        for _ in range(num_samples):
            idx = x
            for _ in range(max_new_tokens):  # nanoGPT's GPT.generate
                idx_cond = idx if idx.size(1) <= model.block_size else idx[:, -model.block_size:]
                pos = torch.arange(idx_cond.size(1), dtype=torch.long)
                h = t.drop(t.wte(idx_cond) + t.wpe(pos))
                for block in t.h:
                    h = block(h)
                logits = model.lm_head(t.ln_f(h)[:, [-1], :])  # inference: the last position only
                logits = logits[:, -1, :] / 0.8
                v, _ = torch.topk(logits, min(200, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                idx = torch.cat((idx, idx_next), dim=1)
            print("".join(itos[i] for i in idx[0].tolist()))
            print("---------------")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{res.stderr}")
    return time.perf_counter() - start


def main() -> None:
    opts = dict(rounds="5", num_samples="2", max_new_tokens="500", dtype="auto")
    for arg in sys.argv[1:]:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts or not value:
            sys.exit(__doc__)
        opts[key] = value
    work = tempfile.mkdtemp(prefix="bench_sample-")
    ckpt = write_nanogpt_checkpoint(os.path.join(work, "out-shakespeare-char"))
    converted = os.path.join(work, "hf")
    subprocess.run([sys.executable, "-m", "nanogpt_hf.cli", "convert-nanogpt", ckpt, converted], check=True,
                   cwd=ROOT, capture_output=True)
    n, m = opts["num_samples"], opts["max_new_tokens"]
    kinds = {
        "nanoGPT sample.py": [sys.executable, __file__, "--child", os.path.dirname(ckpt), n, m],
        "ours: sample.py": [sys.executable, "sample.py", f"--out_dir={converted}", f"--num_samples={n}",
                            f"--max_new_tokens={m}", f"--dtype={opts['dtype']}"],
        "nanoGPT's imports (torch, tiktoken)": [sys.executable, "-c", "import torch, tiktoken"],
        "ours: import nanogpt_hf.sampling": [sys.executable, "-c", "import nanogpt_hf.sampling"],
        "any transformers model: import torch, transformers.modeling_utils":
            [sys.executable, "-c", "import torch, transformers.modeling_utils"],
    }
    times = {k: [] for k in kinds}
    for r in range(int(opts["rounds"])):
        for kind, argv in kinds.items():
            times[kind].append(timed(argv))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    print(f"\n{n} samples x {m} tokens, whole processes, median of {opts['rounds']}:")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for kind, t in medians.items():
        print(f"  {kind:40s} {t:6.2f} s   ({', '.join(f'{x:.2f}' for x in times[kind])})")
    sample_ratio = medians["ours: sample.py"] / medians["nanoGPT sample.py"]
    import_gap = medians["ours: import nanogpt_hf.sampling"] - medians["nanoGPT's imports (torch, tiktoken)"]
    print(f"ours / nanoGPT: {sample_ratio:.2f}x (of which imports: {import_gap:+.2f} s)")
    floor = medians["any transformers model: import torch, transformers.modeling_utils"]
    print(f"importing PreTrainedModel alone takes {floor / medians['nanoGPT sample.py']:.2f}x nanoGPT's whole run")
    shutil.rmtree(work)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        nanogpt_sample(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
