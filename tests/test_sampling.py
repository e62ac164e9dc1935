"""sample.py end to end on tiny checkpoints built here: every option, determinism, the sliding window, and errors."""

import os
import shutil
import sys

import pytest
import torch

from warm import warm_run
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.bench import generate_full_recompute
from nanogpt_hf.cli import sample_main
from nanogpt_hf.sampling import generate_ids, generate_text, left_pad
from nanogpt_hf.tokenization import char_tokenizer, gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
BLOCK = 32
SEP = "---------------\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine every parallel op can wait a
    whole scheduler slice for its second thread (measured: a 32-wide GELU at 6 ms). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(vocab_size: int, **kw) -> NanoGPTForCausalLM:
    torch.manual_seed(0)
    config = NanoGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size, **kw)
    return NanoGPTForCausalLM(config)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("char_ckpt")
    tok = char_tokenizer(TEXT)
    tiny_model(len(tok), bos_token_id=None, eos_token_id=None).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_ckpt")
    tiny_model(50304).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


def sample(capsys, *argv):
    rc = sample_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def samples_of(out: str) -> list[str]:
    assert out.endswith(SEP)
    return out.split(SEP)[:-1]


def assert_user_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


# ---- every option --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        [],  # what each option does: test_each_option_changes_the_samples_as_it_should
        ["--temperature=1.5", "--top_k=5", "--top_p=0.9", "--repetition_penalty=1.3"],
        ["--batch"],
        ["--stream", "--dtype=bfloat16"],
        ["--device=cpu", "--dtype=float32"],
    ],
)
def test_every_option_runs(capsys, char_dir, options):
    rc, out, err = sample(capsys, f"--init_from={char_dir}", "--start=Speak", "--num_samples=3",
                          "--max_new_tokens=20", *options)
    assert rc == 0, err
    texts = samples_of(out)
    assert len(texts) == 3
    for t in texts:
        assert t.startswith("Speak") and t.endswith("\n")
        assert len(t) == len("Speak") + 20 + 1  # one character per token, then print's newline


def greedy_by_generate(char_dir, dtype=torch.float32, **kw) -> str:
    """'Speak' and 20 tokens, by model.generate itself: what sample.py must print for a greedy sample."""
    from transformers import AutoTokenizer

    model = NanoGPTForCausalLM.from_pretrained(char_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(char_dir)
    ids = torch.tensor([tokenizer("Speak")["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, **kw)
    return tokenizer.decode(out[0]) + "\n"


def test_each_option_changes_the_samples_as_it_should(capsys, char_dir, monkeypatch):
    """Each option shows: an option ignored would leave the samples as they were, or not as expected."""
    import nanogpt_hf.sampling as sampling

    dtypes, real = [], sampling.generate_ids
    def spy(model, *args, **kw):  # the dtype sample.py generates in
        dtypes.append(model.dtype)
        return real(model, *args, **kw)

    monkeypatch.setattr(sampling, "generate_ids", spy)

    def texts(*options):
        rc, out, err = sample(capsys, f"--init_from={char_dir}", "--start=Speak", "--num_samples=3",
                              "--max_new_tokens=20", *options)
        assert rc == 0, err
        return samples_of(out)

    greedy = texts("--greedy", "--dtype=float32")
    assert greedy == [greedy_by_generate(char_dir)] * 3
    assert texts("--temperature=1.5", "--top_k=1", "--dtype=float32") == greedy  # only the most likely token left
    assert texts("--top_k=0", "--top_p=1e-6", "--dtype=float32") == greedy  # so in the smallest nucleus
    penalised = texts("--greedy", "--repetition_penalty=1.3", "--dtype=float32")
    assert penalised == [greedy_by_generate(char_dir, repetition_penalty=1.3)] * 3 and penalised != greedy
    sampled = texts("--dtype=float32")
    assert len(set(sampled)) == 3 and texts("--temperature=1.5", "--dtype=float32") != sampled
    assert texts("--stream", "--dtype=float32") == sampled  # the same samples, printed as they come
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    assert texts("--greedy", "--dtype=bfloat16") == [greedy_by_generate(char_dir, torch.bfloat16)] * 3
    assert dtypes == [torch.bfloat16] * 3  # (this random model's greedy text is the same in float32)


def test_resume_reads_out_dir_and_file_prompt(capsys, char_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All:\n", encoding="utf-8")
    rc, out, err = sample(capsys, f"--out_dir={char_dir}", f"--start=FILE:{prompt}", "--num_samples=2",
                          "--max_new_tokens=10")
    assert rc == 0, err
    assert [t[:5] for t in samples_of(out)] == ["All:\n"] * 2


def test_no_arguments_samples_what_train_py_trains(capsys, char_dir, tmp_path, monkeypatch):
    # `python train.py` (the default recipe) saves into out/shakespeare_char; sample.py looked in out/
    shutil.copytree(char_dir, tmp_path / "out" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    rc, out, err = sample(capsys, "--num_samples=1", "--max_new_tokens=5")  # only shortened
    assert rc == 0, err
    assert len(samples_of(out)) == 1


def test_gpt2_tokenizer_checkpoint_and_stop_at_eot(capsys, gpt2_dir):
    rc, out, err = sample(capsys, f"--init_from={gpt2_dir}", "--start=Hello world", "--num_samples=2",
                          "--max_new_tokens=12", "--stop_at_eot")
    assert rc == 0, err
    assert all(t.startswith("Hello world") and "<|endoftext|>" not in t for t in samples_of(out))
    # an empty prompt starts from <|endoftext|>, like GPT-2's unconditional samples
    rc, out, err = sample(capsys, f"--init_from={gpt2_dir}", "--start=", "--num_samples=1", "--max_new_tokens=5")
    assert rc == 0, err


def test_stop_at_eot_stops():
    """A model that always predicts <|endoftext|> stops at once with --stop_at_eot and goes on without it."""
    model = tiny_model(50304)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied with lm_head: every logit 0 ...
        model.transformer.wte.weight[50256, 0] = 1.0
        model.transformer.ln_f.bias[0] = 100.0  # ... except <|endoftext|>'s, about 100
    tok = gpt2_tokenizer()
    text = generate_text(model, tok, "Hi", max_new_tokens=5, stop_at_eot=True)
    assert text == "Hi"
    assert generate_text(model, tok, "Hi", max_new_tokens=3) == "Hi" + "<|endoftext|>" * 3


def test_real_subprocess(char_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = warm_run([sys.executable, "sample.py", f"--init_from={char_dir}", "--num_samples=2",
                    "--max_new_tokens=8", "--seed=7"], cwd=ROOT, capture_output=True, text=True, env=env,
                   timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(SEP) == 2


# ---- determinism ----------------------------------------------------------------------------------------------


def test_same_seed_same_text_and_samples_independent_of_count(capsys, char_dir):
    base = [f"--init_from={char_dir}", "--max_new_tokens=30", "--start=\n"]
    _, a, _ = sample(capsys, *base, "--num_samples=3", "--seed=5")
    _, b, _ = sample(capsys, *base, "--num_samples=3", "--seed=5")
    _, c, _ = sample(capsys, *base, "--num_samples=3", "--seed=6")
    _, d, _ = sample(capsys, *base, "--num_samples=2", "--seed=5")
    assert a == b
    assert a != c
    assert samples_of(a)[:2] == samples_of(d)  # sample k depends on (seed, k) only
    assert len(set(samples_of(a))) == 3  # and the samples differ from each other
    _, e, _ = sample(capsys, *base, "--num_samples=3", "--seed=5", "--batch")
    _, f, _ = sample(capsys, *base, "--num_samples=3", "--seed=5", "--batch")
    assert e == f


def test_stream_prints_the_same_text(capsys, char_dir):
    base = [f"--init_from={char_dir}", "--num_samples=2", "--max_new_tokens=70", "--start=All"]  # > block_size
    _, plain, _ = sample(capsys, *base)
    _, streamed, _ = sample(capsys, *base, "--stream")
    assert plain == streamed


def test_stream_keeps_a_character_split_between_window_chunks(capsys):
    # generate_ids calls generate once per window chunk, and each call ends the streamer: a character whose bytes
    # are two tokens, one in each chunk, was printed as two '\ufffd'
    from nanogpt_hf.sampling import Printer

    tok = gpt2_tokenizer()
    text = "Ah 龘 yes 龘"
    ids = tok.encode(text)
    first, second = ids[:ids.index(11737) + 1], ids[ids.index(11737) + 1:]  # the cut inside the first 龘
    streamer = Printer(tok, skip_prompt=True)
    for chunk in (first, second):  # what generate does per call: the prompt, the new tokens one by one, end()
        streamer.put(torch.tensor([[0]]))
        for i in chunk:
            streamer.put(torch.tensor([i]))
        streamer.end()
    streamer.finish()
    assert capsys.readouterr().out == text


# ---- the KV cache and the sliding window --------------------------------------------------------------------------


def test_cached_equals_full_recompute_across_the_window():
    model = tiny_model(65).eval()
    prompt = torch.tensor([[1, 2, 3]])
    n = 3 * BLOCK  # far beyond block_size: several window slides
    cached = generate_ids(model, prompt, None, n, do_sample=False, eos_token_id=[], pad_token_id=0)
    full = generate_full_recompute(model, prompt, n)
    assert cached.shape == (1, n)
    assert torch.equal(cached, full)


def nanogpt_greedy(model, idx, n):
    """nanoGPT's GPT.generate, greedy: crop the context to its last block_size tokens before every forward."""
    for _ in range(n):
        idx_cond = idx if idx.size(1) <= BLOCK else idx[:, -BLOCK:]
        logits = model(idx_cond, use_cache=False).logits[:, -1, :]
        idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt_len, n", [(BLOCK, 1), (5, BLOCK + 1 - 5), (1, BLOCK)])
def test_a_context_that_fits_gives_nanogpts_tokens(prompt_len, n):
    """Up to prompt + n - 1 = block_size tokens nanoGPT never crops: the window must not slide before that."""
    # large weights: the next token depends on the far context (at std 0.02 a cropped one mostly gives the same)
    model = tiny_model(65, initializer_range=0.5).eval()
    torch.manual_seed(1)
    prompt = torch.randint(0, 65, (8, prompt_len))
    with torch.no_grad():
        expected = nanogpt_greedy(model, prompt, n)[:, prompt_len:]
    cached = generate_ids(model, prompt, None, n, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(cached, expected)
    assert torch.equal(generate_full_recompute(model, prompt, n), expected)


def test_left_padded_batch_equals_one_by_one_across_the_window():
    model = tiny_model(65).eval()
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    kwargs = dict(do_sample=False, eos_token_id=[], pad_token_id=0)
    ids, mask = left_pad(prompts, 0, "cpu")
    batched = generate_ids(model, ids, mask, 2 * BLOCK, **kwargs)
    for row, p in zip(batched, prompts):
        alone = generate_ids(model, torch.tensor([p]), None, 2 * BLOCK, **kwargs)[0]
        assert torch.equal(row, alone)


def test_long_prompt_keeps_last_block_size_tokens(capsys, char_dir):
    long = (TEXT * 3)[:100]
    rc, out, err = sample(capsys, f"--init_from={char_dir}", f"--start={long}", "--num_samples=1",
                          "--max_new_tokens=5", "--greedy")
    assert rc == 0, err
    assert f"the prompt has 100 tokens, more than block_size {BLOCK}; keeping its last {BLOCK}" in err
    assert samples_of(out)[0].startswith(long)


def test_generate_text_for_training():
    tok = char_tokenizer(TEXT)
    model = tiny_model(len(tok), bos_token_id=None, eos_token_id=None).train()
    text = generate_text(model, tok, "All", max_new_tokens=40, seed=3)
    assert text.startswith("All") and len(text) == 43
    assert model.training  # restored
    assert generate_text(model, tok, "All", max_new_tokens=40, seed=3) == text


# ---- errors: one line, exit 2 ---------------------------------------------------------------------------------


def test_errors_are_one_line(capsys, char_dir, gpt2_dir, tmp_path):
    ck = f"--init_from={char_dir}"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    damaged = tmp_path / "damaged"
    shutil.copytree(char_dir, damaged)
    (damaged / "tokenizer.json").write_text("{not json")
    cases = [
        ([ck, "--temperature=0"], ["temperature", "use --greedy"]),  # the setting's help
        ([ck, "--temperature=-1"], ["temperature"]),
        ([ck, "--temperature=nan"], ["temperature", "nan"]),
        ([ck, "--temperature=1e-40"], ["temperature", "1e-40"]),
        ([ck, "--temperature=inf"], ["temperature"]),
        ([ck, "--start=Zebra!"], ["'Z'", "vocabulary"]),
        ([f"--out_dir={tmp_path / 'nothing'}"], ["no checkpoint folder", "train a model first"]),
        ([f"--out_dir={latin1}"], ["no checkpoint folder"]),  # a file
        ([f"--init_from={tmp_path / 'nothing'}"], ["does not exist"]),
        ([f"--init_from={tmp_path}"], ["not a checkpoint"]),
        ([f"--out_dir={os.path.dirname(char_dir)}"], ["not a checkpoint", char_dir]),  # like out/ of several runs
        ([f"--init_from={damaged}"], ["JSON"]),  # the damaged tokenizer.json
        ([ck, f"--start=FILE:{tmp_path / 'missing.txt'}"], ["missing.txt", "No such file"]),
        ([ck, f"--start=FILE:{latin1}"], ["utf-8"]),
        ([ck, f"--start=FILE:{tmp_path}"], ["Is a directory"]),
        ([ck, "--repetition_penalty=nan"], ["repetition_penalty"]),
        ([ck, "--stop_at_eot"], ["end-of-text"]),
        ([ck, "--stream", "--batch"], ["--stream"]),
        ([ck, "--top_p=0"], ["top_p"]),
        ([ck, "--device=nonsense"], ["device", "cuda:N"]),
        ([ck, "--device=cuda:1"] if not torch.cuda.is_available() else [ck, "--device=cpu:1"], ["device"]),
        ([ck, "--temprature=1"], ["did you mean 'temperature'"]),
        (["--init_from=gpt2"], ["huggingface.co"]),  # offline: no Hub
        (["--init_from=someone/not-a-model"], ["huggingface.co"]),
    ]
    for argv, words in cases:
        rc, out, err = sample(capsys, *argv, "--num_samples=1", "--max_new_tokens=2")
        assert_user_error(rc, err, *words)


def test_a_compiled_decoding_step_is_one_graph():
    # the block_size check read a static cache's on-device token count: a sync and a graph break at every token
    # (with fullgraph=True generate failed); dynamo's eager backend traces without inductor's compile time
    from transformers import CompileConfig

    model = tiny_model(11, bos_token_id=None, eos_token_id=None)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # compile on a CPU too
    kw = dict(do_sample=False, eos_token_id=[], pad_token_id=0)
    prompt = torch.zeros((1, 1), dtype=torch.long)
    compiled = generate_ids(model, prompt, None, BLOCK + 8, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(compiled, generate_ids(model, prompt, None, BLOCK + 8, **kw))  # windows slid past block_size
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=BLOCK + 1)
    model(prompt, cache=cache)  # allocates the cache (lazily, in the first forward)
    with pytest.raises(ValueError, match=f"sequence of {BLOCK + 1} tokens is longer than the model's block_size"):
        model(prompt, cache=cache)  # forward's own check, on the cache's capacity


@pytest.mark.slow
def test_compile_gives_the_same_text(capsys, char_dir):
    """--compile: a static cache and a compiled decoding step (~30 s to compile on CPU), the same samples."""
    base = [f"--init_from={char_dir}", "--num_samples=2", "--max_new_tokens=40", "--dtype=float32"]
    _, plain, _ = sample(capsys, *base)
    rc, compiled, err = sample(capsys, *base, "--compile")
    assert rc == 0, err
    assert compiled == plain
