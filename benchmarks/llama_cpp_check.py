"""Does a checkpoint run the same in llama.cpp as in transformers? The README's GGUF path, checked end to end:
`nanogpt-hf export-gpt2`, llama.cpp's convert_hf_to_gguf.py (float32 GGUF), then llama-cpp-python against
transformers' GPT2LMHeadModel: the prompt's token ids, the last position's logits, and 20 greedy tokens.

    python benchmarks/llama_cpp_check.py [CHECKPOINT] --converter=PATH/llama.cpp/convert_hf_to_gguf.py

CHECKPOINT: a nanogpt_hf folder (train.py's out_dir) with GPT-2's BPE tokenizer, or gpt2 (OpenAI's, from the Hub).
Needs llama-cpp-python and the converter's requirements (its gguf package from the same llama.cpp checkout, numpy,
sentencepiece); not run in CI (llama-cpp-python builds llama.cpp from source, ~10 minutes).
llama.cpp's GPT-2 always computes tanh GELU, on CPUs through a float16 table: a model trained with exact GELU
(activation_function "gelu", nanoGPT's) is compared both with its own activation and with tanh GELU."""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nanogpt_hf.convert import export_gpt2

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def export_and_convert(checkpoint: str, converter: str, folder: str) -> tuple[str, str]:
    """CHECKPOINT -> a stock GPT-2 folder -> a float32 GGUF file; (folder, gguf path)."""
    hf_dir, gguf_path = os.path.join(folder, "gpt2"), os.path.join(folder, "model-f32.gguf")
    export_gpt2(checkpoint, hf_dir)
    subprocess.run([sys.executable, converter, hf_dir, "--outfile", gguf_path, "--outtype", "f32"], check=True)
    return hf_dir, gguf_path


def greedy(next_logits, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """(the logits after the prompt, n greedy tokens); next_logits(new ids) -> the last position's logits."""
    first = logits = next_logits(ids)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        logits = next_logits(tokens[-1:])
    return first, tokens


@torch.no_grad()
def run_transformers(hf_dir: str, prompt: str, n: int, activation: str | None = None):
    """(prompt ids, last logits, greedy tokens) from GPT2LMHeadModel in float32, its activation optionally replaced."""
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32, **(
        {"activation_function": activation} if activation else {})).eval()
    ids = AutoTokenizer.from_pretrained(hf_dir)(prompt, add_special_tokens=False)["input_ids"]
    context = []  # the whole sequence, recomputed at each token (a few dozen tokens)

    def next_logits(new: list[int]) -> np.ndarray:
        context.extend(new)
        return model(torch.tensor([context])).logits[0, -1].numpy()

    return ids, *greedy(next_logits, ids, n)


def run_llama_cpp(gguf_path: str, prompt: str, n: int, n_ctx: int):
    """(prompt ids, last logits, greedy tokens) from llama.cpp through llama-cpp-python, its KV cache growing."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=n_ctx, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)

    def next_logits(new: list[int]) -> np.ndarray:
        llm.eval(new)
        return np.array(llm.scores[llm.n_tokens - 1])

    return ids, *greedy(next_logits, ids, n)


def compare(name: str, ours, theirs, atol: float) -> bool:
    (ids, logits, tokens), (ref_ids, ref_logits, ref_tokens) = ours, theirs
    diff = float(np.abs(logits - ref_logits).max())
    same = ids == ref_ids and diff <= atol and tokens == ref_tokens
    print(f"llama.cpp vs {name}: prompt ids {'equal' if ids == ref_ids else f'DIFFER {ids} vs {ref_ids}'} | last "
          f"logits max |diff| {diff:.2e} (largest |logit| {float(np.abs(ref_logits).max()):.1f}, atol {atol:g}) | "
          f"{len(tokens)} greedy tokens {'equal' if tokens == ref_tokens else f'DIFFER {tokens} vs {ref_tokens}'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="gpt2")
    parser.add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--prompt", default="First Citizen:\nBefore we proceed any further, hear me speak.")
    parser.add_argument("--tokens", type=int, default=20, help="greedy tokens to compare")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest logit difference accepted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        hf_dir, gguf_path = export_and_convert(args.checkpoint, args.converter, folder)
        config = GPT2LMHeadModel.config_class.from_pretrained(hf_dir)
        ours = run_llama_cpp(gguf_path, args.prompt, args.tokens, config.n_positions)
        ok = compare(f"transformers ({config.activation_function})",
                     ours, run_transformers(hf_dir, args.prompt, args.tokens), args.atol)
        if config.activation_function not in TANH_GELU:  # what llama.cpp computes: is the rest the same?
            ok = compare("transformers (tanh GELU, as llama.cpp)", ours,
                         run_transformers(hf_dir, args.prompt, args.tokens, "gelu_new"), args.atol) and ok
    print("same in llama.cpp" if ok else "DIFFERENT in llama.cpp")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
