"""Examples/s of nanogpt_hf.evaluation.score_hellaswag on this machine, random weights (speed does not depend on them).

    python benchmarks/bench_hellaswag.py [--examples=64] [--batch_sizes=8,32] [--models=laptop-char,laptop-gpt2,gpt2]

Examples are synthetic, with HellaSwag-like lengths: a query of 20-100 words and four endings of 8-35 words
(random words from a fixed list; HellaSwag validation's contexts run from one sentence to a WikiHow paragraph).
Models: the laptop model (4 layers, 4 heads, 128 wide, block 64, no bias) with tiny Shakespeare's 65 characters or
GPT-2's vocabulary (50304), and the GPT-2 124M shape (12 layers, 12 heads, 768 wide, block 1024, vocab 50304).
One process; float32 on a CPU (accelerate's autocast is a no-op there), bf16 autocast on a GPU. One warm-up round.
"""

import argparse
import random
import time

import torch
from accelerate import Accelerator

from nanogpt_hf.configuration_nanogpt import NanoGPTConfig
from nanogpt_hf.evaluation import score_hellaswag
from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
from nanogpt_hf.tokenization import char_tokenizer, gpt2_tokenizer

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65
LAPTOP = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False)
MODELS = {"laptop-char": dict(LAPTOP, vocab_size=len(CHARS)), "laptop-gpt2": dict(LAPTOP, vocab_size=50304),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)}
WORDS = ("the man woman then she he is a of and to in on with his her car snow water ball field runs jumps "
         "slowly quickly camera shows person wearing pieces plays begins continues talking kitchen".split())


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"query": "Activity: " + sentence(rng, 20, 100), "choices": [sentence(rng, 8, 35) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


def bench(name: str, examples: list[dict], batch_size: int, accelerator: Accelerator) -> float:
    config = dict(MODELS[name], dropout=0.0)
    model = accelerator.prepare(NanoGPTForCausalLM(NanoGPTConfig(**config)))
    tokenizer = char_tokenizer(CHARS) if name == "laptop-char" else gpt2_tokenizer()
    score_hellaswag(model, tokenizer, examples[:batch_size], accelerator, batch_size)  # warm-up
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    score_hellaswag(model, tokenizer, examples, accelerator, batch_size)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return len(examples) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch_sizes", default="8,32")
    parser.add_argument("--models", default="laptop-char,laptop-gpt2,gpt2")
    args = parser.parse_args()
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    examples = synthetic_examples(args.examples)
    print(f"device {accelerator.device}, torch threads {torch.get_num_threads()}, {args.examples} examples")
    for name in args.models.split(","):
        for batch_size in map(int, args.batch_sizes.split(",")):
            rate = bench(name, examples, batch_size, accelerator)
            print(f"{name:12s} batch_size {batch_size:3d}: {rate:8.1f} examples/s", flush=True)


if __name__ == "__main__":
    main()
