"""nanogpt-hf conversions: nanoGPT ckpt.pt -> ours (same logits and greedy tokens as nanoGPT), GPT-2 both ways.

The nanoGPT side is nanoGPT's model.py re-implemented (tests/nanogpt_reference.py) and a checkpoint written the way
nanoGPT's train.py writes it.
"""

import datetime
import json
import os
import pickle

import pytest
import torch
from nanogpt_reference import RefGPT  # nanoGPT's model.py
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

from warm import warm_run
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.cli import hf_main
from nanogpt_hf.tokenization import char_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def make_nanogpt(vocab_size, bias=True, flash=True, seed=0):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=bias, vocab_size=vocab_size, dropout=0.0)
    torch.manual_seed(seed)
    model = RefGPT(args, flash)
    with torch.no_grad():  # spread-out weights (LayerNorms too): logits far from ties, swapped weights would show
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return model.eval(), args


def save_nanogpt_ckpt(path, model, args, compiled=False, dataset="shakespeare_char"):
    """What nanoGPT's train.py writes: model (raw_model.state_dict()), optimizer, model_args, iter_num, best_val_loss,
    config (the train.py globals)."""
    state = model.state_dict()
    if compiled:  # torch.compile(model) saves its wrapper's names
        state = {"_orig_mod." + k: v for k, v in state.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    config = dict(out_dir=os.path.dirname(path), dataset=dataset, batch_size=64, block_size=args["block_size"],
                  gradient_accumulation_steps=2, learning_rate=1e-3, max_iters=5000, n_layer=args["n_layer"],
                  dropout=0.2, compile=compiled, dtype="bfloat16", device="cuda")
    ckpt = dict(model=state, optimizer=optimizer.state_dict(), model_args=args, iter_num=1250,
                best_val_loss=torch.tensor(1.4697), config=config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)


def save_meta(path, text=TEXT):
    chars = sorted(set(text))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, fh)
    return {c: i for i, c in enumerate(chars)}


def run_cli(argv, capsys):
    rc = hf_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_same_as_nanogpt(ref, folder, vocab_size):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, NanoGPTForCausalLM) and model.config.activation_function == "gelu"
    torch.manual_seed(1)
    idx = torch.randint(0, vocab_size, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref(idx), atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :6]
    ours = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == ref.generate_greedy(prompt, 24).tolist()
    return model


# ---- convert-nanogpt ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compiled, flash, bias, meta_at",
    [
        (False, True, True, "beside"),  # plain ckpt.pt, meta.pkl next to it
        (True, True, False, "dataset"),  # torch.compile prefix, bias=False, meta in ../data/<dataset>/
        (False, False, True, "--meta"),  # non-flash model (tril buffer in the state dict), meta given explicitly
    ],
)
def test_convert_char_checkpoint_matches_nanogpt(tmp_path, capsys, compiled, flash, bias, meta_at):
    stoi = {c: i for i, c in enumerate(sorted(set(TEXT)))}
    ref, args = make_nanogpt(len(stoi), bias=bias, flash=flash)
    ckpt = tmp_path / "out-shakespeare-char" / "ckpt.pt"
    save_nanogpt_ckpt(str(ckpt), ref, args, compiled=compiled)
    meta = {"beside": ckpt.parent / "meta.pkl", "dataset": tmp_path / "data" / "shakespeare_char" / "meta.pkl",
            "--meta": tmp_path / "elsewhere" / "meta.pkl"}[meta_at]
    save_meta(str(meta))
    out = tmp_path / "hf"
    argv = ["convert-nanogpt", ckpt, out] + (["--meta", meta] if meta_at == "--meta" else [])
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "character tokenizer" in stdout

    model = assert_same_as_nanogpt(ref, out, len(stoi))
    assert model.config.bias is bias and model.config.eos_token_id is None  # characters have no <|endoftext|>

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(TEXT) == [stoi[c] for c in TEXT] and tok.decode(tok.encode(TEXT)) == TEXT
    # the pipeline decodes exactly what nanoGPT's greedy generation gives (decode = ''.join(itos[i]))
    itos = {i: c for c, i in stoi.items()}
    generator = pipeline("text-generation", model=str(out))
    text = generator("All:\n", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    expected = ref.generate_greedy(torch.tensor([[stoi[c] for c in "All:\n"]]), 20)[0].tolist()
    assert text == "".join(itos[i] for i in expected)

    # loadable without nanogpt_hf (the model code travels with it) and a complete card
    assert (out / "modeling_nanogpt.py").is_file() and (out / "configuration_nanogpt.py").is_file()
    card = (out / "README.md").read_text()
    assert "1.4697" in card and "1,250" in card and f"{1250 * 2 * 64 * 32:,}" in card and "shakespeare_char" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_convert_bpe_checkpoint_uses_gpt2_tokenizer_and_exports_to_stock_gpt2(tmp_path, capsys):
    ref, args = make_nanogpt(50304, bias=False)  # nanoGPT's padded GPT-2 vocabulary
    ckpt = tmp_path / "out" / "ckpt.pt"
    save_nanogpt_ckpt(str(ckpt), ref, args, dataset="openwebtext")  # no meta.pkl anywhere -> GPT-2 BPE
    out = tmp_path / "hf"
    rc, stdout, err = run_cli(["convert-nanogpt", ckpt, out], capsys)
    assert rc == 0, err
    assert "GPT-2 BPE" in stdout
    model = assert_same_as_nanogpt(ref, out, 50257)
    assert model.config.eos_token_id == 50256

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("Hello world") == [15496, 995]
    generator = pipeline("text-generation", model=str(out))
    prompt = "Hello world"
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    expected = ref.generate_greedy(torch.tensor([[15496, 995]]), 8)[0, 2:].tolist()
    assert 50256 not in expected  # else generate stops early at <|endoftext|>, unlike nanoGPT
    assert text == prompt + tok.decode(expected)

    # ours -> stock GPT2LMHeadModel: same function as nanoGPT (exact GELU, zero biases for bias=False)
    gpt2_dir = tmp_path / "gpt2"
    rc, _, err = run_cli(["export-gpt2", out, gpt2_dir], capsys)
    assert rc == 0, err
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    assert not list(gpt2_dir.glob("*.py"))  # no custom code needed
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpt2(idx).logits, ref(idx), atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(gpt2_dir).encode("Hello world") == [15496, 995]


def test_force_replaces_a_non_empty_output(tmp_path, capsys):
    ref, args = make_nanogpt(len(set(TEXT)))
    save_nanogpt_ckpt(str(tmp_path / "o" / "ckpt.pt"), ref, args)
    save_meta(str(tmp_path / "o" / "meta.pkl"))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old checkpoint: --force may replace it
    (out / "old.txt").write_text("old")
    rc, _, err = run_cli(["convert-nanogpt", tmp_path / "o" / "ckpt.pt", out, "--force"], capsys)
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]


def modes(folder):
    return {p.name: oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask, folder, file", [(0o022, "0o755", "0o644"), (0o027, "0o750", "0o640")])
def test_outputs_get_the_modes_of_anything_the_user_creates(tmp_path, capsys, umask, folder, file):
    """Converted folders and a run's model files are readable by whom the umask allows (they were 0700 / 0600)."""
    from nanogpt_hf.common import atomic_output

    ref, args = make_nanogpt(len(set(TEXT)))
    save_nanogpt_ckpt(str(tmp_path / "o" / "ckpt.pt"), ref, args)
    save_meta(str(tmp_path / "o" / "meta.pkl"))
    before = os.umask(umask)
    try:
        assert run_cli(["convert-nanogpt", tmp_path / "o" / "ckpt.pt", tmp_path / "hf"], capsys)[0] == 0
        assert run_cli(["export-gpt2", tmp_path / "hf", tmp_path / "gpt2"], capsys)[0] == 0
        run = tmp_path / "run"  # train.py's out_dir: the model is merged into it as Checkpointer.save_model does
        with atomic_output(str(run), merge=True) as tmp:
            AutoModelForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(tmp)
    finally:
        os.umask(before)
    for out in ("hf", "gpt2", "run"):
        got = modes(tmp_path / out)
        assert got == {name: folder if name == out else file for name in got}, (out, got)
        assert "model.safetensors" in got


# ---- GPT-2 both ways ------------------------------------------------------------------------------------------------


def test_import_and_export_gpt2_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=len(set(TEXT)), n_positions=32,
                        bos_token_id=None, eos_token_id=None)
    gpt2 = GPT2LMHeadModel(config).eval()
    src = tmp_path / "src"
    gpt2.save_pretrained(src)
    char_tokenizer(TEXT).save_pretrained(src)

    ours_dir, back_dir = tmp_path / "ours", tmp_path / "back"
    assert run_cli(["import-gpt2", src, ours_dir], capsys)[0] == 0
    ours = AutoModelForCausalLM.from_pretrained(ours_dir)
    assert isinstance(ours, NanoGPTForCausalLM) and ours.config.activation_function == "gelu_new"
    assert AutoTokenizer.from_pretrained(ours_dir).encode("All:") == char_tokenizer(TEXT).encode("All:")
    assert run_cli(["export-gpt2", ours_dir, back_dir], capsys)[0] == 0
    back = GPT2LMHeadModel.from_pretrained(back_dir)

    idx = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        expected = gpt2(idx).logits
        torch.testing.assert_close(ours(idx).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(idx).logits, expected, atol=1e-5, rtol=1e-5)
    assert "GPT2LMHeadModel" in (back_dir / "README.md").read_text()


# the keys of OpenAI's config.json for gpt2 ... gpt2-xl on the Hub (openai-community/gpt2/config.json, as uploaded)
OPENAI_GPT2_CONFIG_KEYS = (
    "activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
    "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd", "n_head", "n_layer", "n_positions",
    "resid_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "task_specific_params", "vocab_size")
# not written: {"text-generation": {"do_sample": true, "max_length": 50}}, which transformers 4's pipelines put over
# the model's own generation config; a sampling default, not the model
NOT_EXPORTED = ("task_specific_params",)


def test_exported_config_has_openai_gpt2_keys_that_llama_cpp_reads(tmp_path, capsys):
    """llama.cpp's convert_hf_to_gguf.py reads a GPT-2's n_layer, n_ctx, n_embd, n_head and layer_norm_epsilon from
    AutoConfig(folder).to_dict(); without n_ctx it stopped with KeyError: 'n_ctx'."""
    NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=24, vocab_size=40, bias=True,
                                     bos_token_id=None, eos_token_id=None)).save_pretrained(tmp_path / "ours")
    assert run_cli(["export-gpt2", tmp_path / "ours", tmp_path / "gpt2"], capsys)[0] == 0
    written = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    missing = [k for k in OPENAI_GPT2_CONFIG_KEYS if k not in written and k not in NOT_EXPORTED]
    assert not missing, f"OpenAI's GPT-2 config.json has {missing}"
    hparams = AutoConfig.from_pretrained(tmp_path / "gpt2").to_dict()  # how the converter reads it
    assert [hparams[k] for k in ("n_layer", "n_ctx", "n_positions", "n_embd", "n_head")] == [1, 24, 24, 16, 2]
    assert hparams["layer_norm_epsilon"] == 1e-5 and hparams["architectures"] == ["GPT2LMHeadModel"]


# ---- bad inputs: exit 2, one line, nothing written or changed ------------------------------------------------------


def _bad_inputs(root):
    """name -> argv; every file they need is created here."""
    ref, args = make_nanogpt(len(set(TEXT)))
    good = root / "good" / "ckpt.pt"
    save_nanogpt_ckpt(str(good), ref, args, dataset="none")
    (good.parent / "config.json").write_text("{}")  # looks like a checkpoint folder: only the input check refuses
    (root / "corrupt.pt").write_bytes(os.urandom(3000))
    (root / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"foo": 1, "bar": torch.zeros(2)}, root / "notackpt.pt")
    torch.save({"model": {}, "model_args": args, "when": datetime.date(2020, 1, 1)}, root / "unsafe.pt")
    state = {k: v for k, v in ref.state_dict().items() if ".h.1." not in k}  # a layer short of its model_args
    torch.save({"model": state, "model_args": args}, root / "short.pt")
    torch.save({"model": ref.state_dict(), "model_args": {**args, "n_embd": 30}}, root / "badargs.pt")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("precious")
    (root / "plainfile").write_text("x")
    (root / "run" / "state" / "step-4").mkdir(parents=True)  # a train.py out_dir: --force would wipe states and logs
    (root / "run" / "config.json").write_text("{}")
    (root / "run" / "metrics.jsonl").write_text("{}\n")
    (root / "logs").mkdir()  # the same after its states were deleted
    (root / "logs" / "config.json").write_text("{}")
    (root / "logs" / "train_config.yaml").write_text("max_iters: 4\n")
    NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)).save_pretrained(
        root / "ours")  # a valid checkpoint to export
    return {
        "missing ckpt": ["convert-nanogpt", root / "nope.pt", root / "out"],
        "folder as ckpt": ["convert-nanogpt", root / "good", root / "out"],
        "corrupt ckpt": ["convert-nanogpt", root / "corrupt.pt", root / "out"],
        "truncated ckpt": ["convert-nanogpt", root / "truncated.pt", root / "out"],
        "not a nanoGPT ckpt": ["convert-nanogpt", root / "notackpt.pt", root / "out"],
        "unsafe pickle": ["convert-nanogpt", root / "unsafe.pt", root / "out"],
        "weights short of model_args": ["convert-nanogpt", root / "short.pt", root / "out"],
        "invalid model_args": ["convert-nanogpt", root / "badargs.pt", root / "out"],
        "small vocab without meta": ["convert-nanogpt", good, root / "out"],
        "missing --meta": ["convert-nanogpt", good, root / "out", "--meta", root / "nometa.pkl"],
        "--meta not a pickle": ["convert-nanogpt", good, root / "out", "--meta", root / "plainfile"],
        "non-empty out dir": ["convert-nanogpt", good, root / "full"],
        "out is a file": ["convert-nanogpt", good, root / "plainfile"],
        "out inside a file": ["convert-nanogpt", good, root / "plainfile" / "hf"],
        "--force on a folder that is no checkpoint": ["convert-nanogpt", good, root / "full", "--force"],
        "--force on the folder holding the input": ["convert-nanogpt", good, good.parent, "--force"],
        "--force on a training run's out_dir": ["export-gpt2", root / "ours", root / "run", "--force"],
        "--force on a run's out_dir without states": ["export-gpt2", root / "ours", root / "logs", "--force"],
        "export missing": ["export-gpt2", root / "nope", root / "out"],
        "export not ours": ["export-gpt2", root / "full", root / "out"],
        "import offline hub id": ["import-gpt2", "gpt2", root / "out"],
        "import not gpt2": ["import-gpt2", root / "full", root / "out"],
        "import missing folder": ["import-gpt2", root / "nope" / "deeper", root / "out"],
        "push missing": ["push", root / "nope", "me/model"],
        "unknown command": ["frobnicate"],
        "missing argument": ["convert-nanogpt"],
        "no command": [],
    }


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_bad_inputs_exit_2_with_one_line_and_change_nothing(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    for name, argv in cases.items():
        rc, _, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in err
        assert _snapshot(tmp_path) == before, name  # nothing created, nothing changed, no temp folder left


def test_cli_module_converts_and_the_folder_loads_without_the_package(tmp_path):
    """`python -m nanogpt_hf.cli` is the nanogpt-hf command; the folder it writes loads in a fresh process that never
    imports nanogpt_hf (trust_remote_code runs the model code saved beside the weights), with GPT-2's logits."""
    import sys

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16)).eval()
    gpt2.save_pretrained(tmp_path / "src")
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.save({"idx": idx, "logits": gpt2(idx).logits}, tmp_path / "ref.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = warm_run([sys.executable, "-m", "nanogpt_hf.cli", "import-gpt2", str(tmp_path / "src"),
                    str(tmp_path / "ours")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ours")!r}, trust_remote_code=True).eval()
assert "nanogpt_hf" not in sys.modules, "the package was imported"
ref = torch.load({str(tmp_path / "ref.pt")!r})
torch.testing.assert_close(m(ref["idx"]).logits, ref["logits"], atol=1e-5, rtol=1e-5)
print("OK", type(m).__name__)
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "OK NanoGPTForCausalLM" in res.stdout, res.stderr
