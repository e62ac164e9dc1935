"""Chat finetuning: conversations prepared with a chat template (masks as transformers computes them), the loss on the
assistant's tokens, exact resume and 2 processes, pipeline with messages without the package, sample.py --chat, and
exports that keep the template."""

import json
import os
import random
import signal
import subprocess
import sys
import threading

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import InBackground, cpu_processes_env, free_port
from warm import warm_popen, warm_run

from nanogpt_hf.cli import train_main
from nanogpt_hf.data import Conversations, PrepareSettings, open_dataset, prepare, sample_batch
from nanogpt_hf.modeling_nanogpt import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.tokenization import CHAT_TOKENS, END_OF_TURN, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2", "--dtype=float32",
        "--device=cpu", "--compile=false", "--sample_at_end=false", "--dropout=0.0", "--weight_decay=0.0"]
WORDS = ["thou", "art", "fair", "émigré", "日本語", "🙂", "naïve", "good", "morrow", "\n"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """System prompts, one to three exchanges, unicode, and an empty assistant turn now and then."""
    rng, out = random.Random(seed), []
    for i in range(n):
        turns = [{"role": "system", "content": f"be brief, {rng.choice(WORDS)}"}] if i % 3 == 0 else []
        for k in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))})
            reply = "" if (i + k) % 7 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
            turns.append({"role": "assistant", "content": reply})
        out.append(turns)
    return out


def write_jsonl(path, convs) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs)
    return str(path)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """chats.jsonl (80 conversations) prepared with GPT-2's BPE, a trained BPE and a character vocabulary reused from
    a base corpus (base_char); echo.jsonl, whose assistant always answers "yes", with a character vocabulary."""
    root = tmp_path_factory.mktemp("chat")
    convs = conversations(80)
    source = write_jsonl(root / "chats.jsonl", convs)
    (root / "base.txt").write_text(" ".join(t["content"] for c in convs for t in c) * 20 + "\n\n", encoding="utf-8")
    out = {"convs": convs, "base_char": prepare(PrepareSettings(source=str(root / "base.txt"), tokenizer="char",
                                                                out=str(root / "base_char")))}
    for name, tokenizer in (("gpt2", "gpt2"), ("bpe", "bpe"), ("char", out["base_char"])):
        out[name] = prepare(PrepareSettings(source=source, tokenizer=tokenizer, vocab_size=300, out=str(root / name)))
    rng = random.Random(1)
    echo = [[{"role": "user", "content": " ".join(rng.choices(WORDS[:5], k=rng.randint(1, 5)))},
             {"role": "assistant", "content": "yes"}] for _ in range(100)]
    out["echo"] = prepare(PrepareSettings(source=write_jsonl(root / "echo.jsonl", echo), tokenizer="char",
                                          out=str(root / "echo")))
    return out


@pytest.fixture(scope="module")
def echo_model(chats, tmp_path_factory):
    """A tiny chat model trained from scratch on echo: it answers "yes" and ends its turn."""
    out = tmp_path_factory.mktemp("echo") / "model"
    assert train_main([f"--dataset={chats['echo']}", f"--out_dir={out}", "--max_iters=60", "--eval_interval=60",
                       *TINY]) == 0
    return str(out)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_masks_equal_transformers_and_cover_the_assistant_turns(chats, kind):
    tok = load_tokenizer(chats[kind])
    rows = []
    for split in ("train", "val"):
        ds = datasets.load_from_disk(os.path.join(chats[kind], split))
        rows += [(tuple(r["ids"]), tuple(r["mask"])) for r in ds]
    expected = []
    for conv in chats["convs"]:
        out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        expected.append((tuple(out["input_ids"]), tuple(out["assistant_masks"])))
        # what is learned: each assistant turn's content and its end of turn, nothing else
        learned = tok.decode([i for i, m in zip(*expected[-1]) if m])
        assert learned == "".join(t["content"] + END_OF_TURN for t in conv if t["role"] == "assistant")
        assert tok.decode(expected[-1][0], skip_special_tokens=True).replace("\n\n", "") == "".join(
            t["content"] for t in conv).replace("\n\n", "")  # every message's text, in order, round-trips
    assert sorted(rows) == sorted(expected)
    ids = tok.convert_tokens_to_ids(list(CHAT_TOKENS))
    base = {"gpt2": 50257, "bpe": 1, "char": len(load_tokenizer(chats["base_char"]))}[kind]
    assert ids == list(range(base, base + len(CHAT_TOKENS)))  # GPT-2's padding, the reserved ids, appended
    assert open_dataset(chats[kind]).model_vocab_size == {"gpt2": 50304, "bpe": 320, "char": base + 9}[kind]


def test_the_loss_is_the_masked_cross_entropy_and_rows_are_whole_conversations(chats):
    stream = open_dataset(chats["char"]).stream("train")
    assert isinstance(stream, Conversations)
    tok = load_tokenizer(chats["char"])
    x, y = sample_batch(stream, seed=3, step=5, index=1, batch_size=4, block_size=64)
    x2, y2 = sample_batch(stream, seed=3, step=5, index=1, batch_size=4, block_size=64)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a pure function of (seed, step, index)
    assert (x[:, 0] == tok.bos_token_id).all()  # each row starts a conversation
    assert ((y[:, :-1] == -100) | (y[:, :-1] == x[:, 1:])).all()  # targets are the next tokens, or ignored
    assert 0 < (y != -100).sum() < y.numel()
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(tok)))
    logits = model(input_ids=x).logits  # (B, T, V)
    keep = y != -100
    direct = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(model(input_ids=x, shift_labels=y).loss, direct)
    # a training step over micro-batches of other counts of targets: the mean over all the step's targets
    from accelerate import Accelerator

    from nanogpt_hf.training import train_step

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(Accelerator(cpu=True), model, [optimizer], [(x[:1], y[:1]), (x[1:], y[1:])], [0.0], 1.0)
    torch.testing.assert_close(loss, direct)


def sft_args(chats, out, *extra):
    return [f"--dataset={chats['char']}", f"--out_dir={out}", "--max_iters=8", "--eval_interval=4",
            "--gradient_accumulation_steps=2", *TINY, *extra]


def events(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [{k: v for k, v in e.items() if k not in ("ms_per_iter", "tokens_per_s", "mfu")}
                for e in map(json.loads, fh) if e["type"] == kind]


@pytest.fixture(scope="module")
def base_model(chats, tmp_path_factory):
    """A base model pretrained for 4 steps on base_char (65-odd characters, no chat tokens)."""
    out = tmp_path_factory.mktemp("base") / "model"
    assert train_main([f"--dataset={chats['base_char']}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=4",
                       *TINY]) == 0
    return str(out)


def kill_at(proc, marker: str) -> None:  # SIGKILL the process when it prints a line starting with marker
    for line in proc.stdout:
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()


def test_sft_killed_and_resumed_equals_an_uninterrupted_run(chats, base_model, tmp_path, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *sft_args(chats, killed, f"--init_from={base_model}")]
    proc = warm_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                      env=dict(os.environ, PYTHONUNBUFFERED="1"))  # killed after step 6 (newest state: 4)
    watcher = threading.Thread(target=kill_at, args=(proc, "iter 6:"))
    watcher.start()
    assert train_main(sft_args(chats, straight, f"--init_from={base_model}")) == 0  # meanwhile, uninterrupted
    out = capsys.readouterr().out
    assert "the embeddings grow from" in out and "conversations" in out
    base_vocab = len(load_tokenizer(base_model))
    model = NanoGPTForCausalLM.from_pretrained(straight)
    assert model.config.vocab_size == base_vocab + len(CHAT_TOKENS)
    tok = load_tokenizer(straight)
    assert tok.chat_template and model.generation_config.eos_token_id == tok.convert_tokens_to_ids(END_OF_TURN)
    card = (straight / "README.md").read_text()
    assert f"A chat model, finetuned from {os.path.basename(base_model)} on conversations" in card and "- chat" in card
    assert """generator([{'role': 'user', 'content': 'ROMEO:'}], max_new_tokens=54)[0]["generated_text"][-1]""" in card
    watcher.join(timeout=240)
    proc.kill()  # (a no-op once killed at step 6)
    assert proc.wait() == -signal.SIGKILL
    assert train_main(sft_args(chats, killed, "--init_from=resume")) == 0
    assert events(killed, "eval") == events(straight, "eval")
    assert events(killed, "train") == events(straight, "train")
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "README.md").read_text() == card.replace("straight", "killed")  # the same base, once resumed


def test_sft_on_two_processes_equals_one_process(chats, base_model, tmp_path):
    env = cpu_processes_env()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    # one micro-batch of 4 rows per step: each process takes 2 rows, with other counts of tokens to learn
    args = [a for a in sft_args(chats, "", f"--init_from={base_model}", "--max_iters=4", "--backend=gloo",
                                "--gradient_accumulation_steps=1") if not a.startswith("--out_dir")]
    with InBackground([*launch, os.path.join(ROOT, "train.py"), *args, f"--out_dir={tmp_path / 'two'}"], 600,
                      env=env) as two:
        assert train_main([*args, f"--out_dir={tmp_path / 'one'}"]) == 0  # meanwhile, one process
    assert two.result.returncode == 0, two.result.stderr[-3000:]
    two, one = events(tmp_path / "two", "train"), events(tmp_path / "one", "train")
    assert len(two) == 4 and [e["loss"] for e in two] == pytest.approx([e["loss"] for e in one], abs=1e-5)
    assert events(tmp_path / "two", "eval")[-1]["val_loss"] == pytest.approx(
        events(tmp_path / "one", "eval")[-1]["val_loss"], abs=1e-5)


def test_pipeline_with_messages_without_the_package(echo_model, tmp_path):
    code = f"""
import sys
from transformers import pipeline
chat = pipeline("text-generation", model={echo_model!r}, trust_remote_code=True)
assert "nanogpt_hf" not in sys.modules, "the package was imported"
out = chat([{{"role": "user", "content": "good morrow"}}], max_new_tokens=20, do_sample=False)
reply = out[0]["generated_text"][-1]
print("REPLY", reply["role"], repr(reply["content"]))
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REPLY assistant 'yes'" in res.stdout  # the reply, stopped at its end of turn


def test_sample_chat_through_stdin(echo_model):
    res = warm_run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={echo_model}", "--chat",
                    "--greedy", "--start=art thou fair", "--max_new_tokens=20", "--device=cpu"],
                   input="fair sight\nthou \u2603\n/reset\nthou\n\nnever read\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    replies = [part.strip() for part in res.stdout.split("---------------")]
    assert replies == ["yes", "yes", "(a new conversation)\nyes", ""], res.stdout  # the empty line ended it
    # a character the vocabulary lacks is named, and the conversation goes on (it was dropped without a word)
    assert "character '\u2603' (U+2603, position 5) is not in the model's character vocabulary" in res.stderr


def test_sample_chat_refuses_a_model_without_a_template(base_model):
    res = warm_run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={base_model}", "--chat"],
                   input="hello\n", capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no chat template" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["export-gpt2", "export-nanochat"])
def test_exports_keep_the_chat_template(echo_model, tmp_path, command):
    from transformers import AutoTokenizer, GenerationConfig

    from nanogpt_hf.nanochat import NANOCHAT

    source = echo_model
    if command == "export-nanochat":  # nanochat's architecture, with the echo model's tokenizer and generation config
        source, echo = tmp_path / "modern", NanoGPTForCausalLM.from_pretrained(echo_model)
        switches = {k: v for k, v in NANOCHAT.items() if v is not ...}
        model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64,
                                                 vocab_size=echo.config.vocab_size, **switches))
        model.generation_config = echo.generation_config
        model.save_pretrained(source)
        load_tokenizer(echo_model).save_pretrained(source)
    res = warm_run([sys.executable, "-m", "nanogpt_hf.cli", command, str(source), str(tmp_path / "out")],
                   capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ours, theirs = AutoTokenizer.from_pretrained(echo_model), AutoTokenizer.from_pretrained(tmp_path / "out")
    conv = [{"role": "user", "content": "good morrow"}, {"role": "assistant", "content": "yes"}]
    assert theirs.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True) == \
        ours.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    ends = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    assert ends == GenerationConfig.from_pretrained(echo_model).eos_token_id
    assert ends == theirs.convert_tokens_to_ids(END_OF_TURN)  # a character vocabulary has no eos: the turn's end


@pytest.mark.parametrize("bad, says", [({"role": "tool", "content": "x"}, "a message has the role tool"),
                                       ({"role": "user"}, "has no attribute 'content'")])
def test_a_conversation_the_template_cannot_render_is_one_line(tmp_path, capsys, bad, says):
    from nanogpt_hf.cli import prepare_main

    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    source = write_jsonl(tmp_path / "chats.jsonl", [good] * 12 + [[good[0], bad]])
    assert prepare_main([source, f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()  # (in-process, datasets' progress bars come first)
    assert err.splitlines()[-1].startswith("error: ") and says in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_chat_history_keeps_to_the_block(chats):
    from nanogpt_hf.sampling import chat_ids

    tok = load_tokenizer(chats["gpt2"])
    messages = [{"role": r, "content": f"turn {i} " * 5} for i, r in enumerate(["user", "assistant"] * 6 + ["user"])]
    whole = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_ids(tok, messages, len(whole)) == whole  # it fits: all of it
    ids = chat_ids(tok, messages, 60)  # the oldest exchanges dropped, whole, until it fits
    assert len(ids) <= 60 and ids[0] == tok.bos_token_id and "turn 12" in tok.decode(ids)
    kept = tok.decode(ids)
    assert "turn 0 " not in kept and tok.decode(ids).count("<|user_start|>") == kept.count("<|user_end|>")
    last = tok.apply_chat_template(messages[-1:], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_ids(tok, messages[-1:], 5) == last[-5:]  # one turn longer than the room: its end


def test_our_template_renders_nanochats_format_and_a_foreign_one_needs_generation():
    from nanogpt_hf.common import UserError
    from nanogpt_hf.tokenization import char_tokenizer, gpt2_tokenizer, with_chat_template

    tok = with_chat_template(char_tokenizer("abehiosty \n"))
    conv = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    ids = tok.apply_chat_template(conv, return_dict=True)["input_ids"]
    assert tok.decode(ids) == "<|bos|><|user_start|>be\n\nhi<|user_end|><|assistant_start|>yo<|assistant_end|>"
    gpt2 = with_chat_template(gpt2_tokenizer())  # documents follow <|endoftext|>: a conversation starts with it
    assert gpt2.apply_chat_template(conv[1:], return_dict=True)["input_ids"][:2] == [50256, 50258]
    foreign = gpt2_tokenizer()
    foreign.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="no {% generation %} block"):
        with_chat_template(foreign)
    foreign.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert with_chat_template(foreign).chat_template == foreign.chat_template and len(foreign) == 50257  # kept as is


def test_the_shakespeare_demo_set_alternates_speeches_of_a_scene():
    from nanogpt_hf.chat import shakespeare_conversations
    from nanogpt_hf.data import EMBEDDED_PATH

    convs = list(shakespeare_conversations(EMBEDDED_PATH))
    assert len(convs) > 5000
    first, second = convs[0]["messages"], convs[1]["messages"]
    assert [t["role"] for t in first] == ["user", "assistant", "user", "assistant"]
    assert first[0]["content"] == "In delivering my son from me, I bury a second husband."  # the COUNTESS, then BERTRAM
    assert second[0] == {"role": "system", "content": "All's Well That Ends Well: LAFEU, COUNTESS"}
    assert all(c["messages"][-1]["role"] == "assistant" for c in convs)
