"""The modern switches (nanochat's architecture, one departure from GPT-2 at a time): each alone trains, resumes
exactly, saves, and loads without the package; together they keep the KV cache, padding and checkpointing right."""

import os
import shutil
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from warm import warm_run
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.settings import parse_command
from nanogpt_hf.training import TrainSettings, train
from test_training import tiny

SWITCHES = {  # each departure from GPT-2, alone
    "rotary": dict(position_embedding="rotary", rope_theta=500.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "norm_after_embedding": dict(norm_after_embedding=True),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation_function="relu2"),
    "gqa": dict(n_kv_head=1),
    "untied": dict(tie_word_embeddings=False),
    "softcap": dict(final_logit_softcapping=3.0),
    "zero_init": dict(zero_init_projections=True),
}
MODERN = dict(position_embedding="rotary", norm="rmsnorm", norm_after_embedding=True, qk_norm=True,
              activation_function="relu2", n_kv_head=2, tie_word_embeddings=False, final_logit_softcapping=15.0,
              zero_init_projections=True, bias=False)


def modern_config(**kw):
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300, bos_token_id=1, eos_token_id=2,
                **MODERN)
    args.update(kw)
    return NanoGPTConfig(**args)


def random_model(config, seed=0):
    """Spread-out random weights (zero-initialised projections would hide the attention)."""
    torch.manual_seed(seed)
    model = NanoGPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_gpt2_defaults_build_exactly_the_gpt2_model():
    """The switches' defaults are GPT-2's: same modules and parameter shapes as before the switches existed."""
    model = NanoGPTForCausalLM(modern_config(**{k: getattr(NanoGPTConfig(), k) for k in MODERN}))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.wpe.weight"] == (64, 64) and shapes["transformer.h.0.attn.c_attn.weight"] == (192, 64)
    assert "transformer.h.0.ln_1.bias" in shapes and "lm_head.weight" not in dict(model.named_parameters())


@pytest.fixture(scope="module")
def switch_runs(char_data, tmp_path_factory):
    """For each switch alone: a run of 4 steps (states at steps 2 and 4), and a copy of it resumed from step 2."""
    runs = {}
    for name, switch in SWITCHES.items():
        root = tmp_path_factory.mktemp(name)
        assert train(tiny(char_data, root / "straight", max_iters=4, eval_interval=2, **switch)) == 0
        shutil.copytree(root / "straight", root / "resumed")
        shutil.rmtree(root / "resumed" / "state" / "step-4")
        AcceleratorState._reset_state(reset_partial_state=True)
        resumed = tiny(char_data, root / "resumed", max_iters=4, eval_interval=2, init_from="resume", **switch)
        assert train(resumed, explicit={"init_from": "resume"}) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        runs[name] = root
    return runs


@pytest.mark.parametrize("name", SWITCHES)
def test_each_switch_alone_trains_and_resumes_exactly(name, switch_runs):
    a = load_file(switch_runs[name] / "straight" / "model.safetensors")
    b = load_file(switch_runs[name] / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = NanoGPTForCausalLM.from_pretrained(switch_runs[name] / "straight")
    assert all(getattr(model.config, k) == v for k, v in SWITCHES[name].items())  # the switch is on record
    assert sorted(k for k, _ in model.named_parameters()) == sorted(a)  # every weight saved (an untied head too)


def test_each_switch_alone_loads_without_the_package(switch_runs, tmp_path):
    folders = [str(root / "straight") for root in switch_runs.values()]
    prompt = torch.tensor([[5, 6, 7]])
    expected = [NanoGPTForCausalLM.from_pretrained(f).eval().generate(prompt, max_new_tokens=8, do_sample=False)
                for f in folders]
    torch.save(expected, tmp_path / "tokens.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
for folder, expected in zip({folders!r}, torch.load({str(tmp_path / "tokens.pt")!r})):
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected), folder
from transformers import pipeline
text = pipeline("text-generation", model={folders[0]!r}, trust_remote_code=True)("ROMEO:", max_new_tokens=10)
assert len(text[0]["generated_text"]) == 16, text  # rotary positions through pipeline
assert "nanogpt_hf" not in sys.modules
print("OK")
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_each_switch_changes_what_it_names():
    """With the same weights, each switch that keeps GPT-2's parameters changes the function (rotary, GQA and the
    untied head change the parameters; their function is checked against NanoChat in test_nanochat.py)."""
    gpt2 = {k: getattr(NanoGPTConfig(), k) for k in MODERN}
    base = random_model(modern_config(**gpt2))
    x = torch.randint(0, 300, (2, 16))
    for name in ("rmsnorm", "norm_after_embedding", "qk_norm", "relu2", "softcap"):
        model = random_model(modern_config(**{**gpt2, **SWITCHES[name]}))
        model.load_state_dict(base.state_dict(), strict=False)  # RMSNorm has no weights to take
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-4), name
    assert random_model(modern_config(final_logit_softcapping=3.0))(x).logits.abs().max() < 3.0
    params = dict(NanoGPTForCausalLM(modern_config()).named_parameters())
    assert "transformer.wpe.weight" not in params and not any(".ln_" in k for k in params)  # rotary, parameter-free
    assert params["transformer.h.0.attn.c_attn.weight"].shape == ((4 + 2 * 2) * 16, 64)  # GQA: 2 key/value heads
    assert params["transformer.h.0.attn.c_proj.weight"].abs().max() == 0  # zero-initialised
    assert params["transformer.h.0.mlp.c_proj.weight"].abs().max() == 0
    assert params["lm_head.weight"].data_ptr() != params["transformer.wte.weight"].data_ptr()  # untied


def test_num_params_counts_what_does_matmuls():
    """MFU's parameter count: an untied head counts, the token table does not; no position table to leave out."""
    model = NanoGPTForCausalLM(modern_config())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params() == total - model.transformer.wte.weight.numel()
    learned = NanoGPTForCausalLM(modern_config(position_embedding="learned"))  # untied: both tables left out
    assert learned.get_num_params() == sum(p.numel() for p in learned.parameters()) - 300 * 64 - 64 * 64
    tied = NanoGPTForCausalLM(modern_config(tie_word_embeddings=True))  # the shared table counts once, as the head
    assert tied.get_num_params() == sum(p.numel() for p in tied.parameters()) == model.get_num_params()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_modern_cached_generation_and_left_padding_equal_the_plain_forward(impl):
    model = random_model(modern_config())
    model.set_attn_implementation(impl)
    prompt = torch.randint(0, 300, (1, 7))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    seq = prompt
    for _ in range(12):  # no cache: the whole sequence every time
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=1)
    alone = model(prompt).logits[0, -1]
    assert torch.allclose(model(padded, attention_mask=mask).logits[0, -1], alone, atol=1e-5)


def test_gradient_checkpointing_with_rotary_gives_the_same_gradients():
    model = random_model(modern_config()).train()
    x = torch.randint(0, 300, (2, 16))
    model(x, labels=x).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(x, labels=x).loss.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, model.parameters()))


def test_the_modern_recipe_is_nanochats_architecture_at_the_laptop_size():
    s, _ = parse_command(TrainSettings, ["shakespeare_char_modern.yaml"], "train.py", "", recipes=True)
    laptop, _ = parse_command(TrainSettings, ["shakespeare_char_cpu.yaml"], "train.py", "", recipes=True)
    assert all(getattr(s, k) == v for k, v in MODERN.items() if k != "n_kv_head")
    assert [getattr(s, k) for k in ("n_layer", "n_embd", "block_size", "batch_size")] == \
        [getattr(laptop, k) for k in ("n_layer", "n_embd", "block_size", "batch_size")]


def test_a_resume_cannot_switch_the_architecture(char_data, tmp_path, capsys):
    from nanogpt_hf.cli import train_main

    s = tiny(char_data, tmp_path, max_iters=2, eval_interval=2)
    assert train(s) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    code = train_main([f"--dataset={char_data}", f"--out_dir={tmp_path}", "--init_from=resume", "--qk_norm",
                       "--device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "error: cannot resume with qk_norm=True" in err and err.count("\n") == 1


def test_rotary_takes_1d_position_ids_like_learned_positions():
    model = random_model(modern_config())
    x = torch.randint(0, 300, (2, 10))
    assert torch.equal(model(x, position_ids=torch.arange(10)).logits, model(x).logits)


def test_a_finetune_refuses_a_switch_its_checkpoint_does_not_have(char_data, tmp_path, capsys):
    from nanogpt_hf.cli import train_main

    assert train(tiny(char_data, tmp_path / "base", max_iters=2, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    code = train_main([f"--dataset={char_data}", f"--out_dir={tmp_path / 'ft'}", f"--init_from={tmp_path / 'base'}",
                       "--qk_norm", "--device=cpu", "--max_iters=2", "--block_size=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "its model has qk_norm=False" in err, err
    assert not (tmp_path / "ft").exists()


def test_the_model_card_names_the_switches(tmp_path):
    from nanogpt_hf.hub import write_model_card

    for folder, config in (("modern", modern_config()), ("gpt2", modern_config(**{k: getattr(NanoGPTConfig(), k)
                                                                                   for k in MODERN}))):
        NanoGPTForCausalLM(config).save_pretrained(tmp_path / folder)
        write_model_card(str(tmp_path / folder), {})
    card = (tmp_path / "modern" / "README.md").read_text()
    assert "position_embedding=rotary" in card and "tie_word_embeddings=False" in card and "n_kv_head=2" in card
    assert "| switches | none |" in (tmp_path / "gpt2" / "README.md").read_text()


def test_an_integer_cap_is_a_float_and_a_zero_cap_is_none():
    """NanoChat's config is strict about types: an integer cap (YAML's 15) must still export."""
    from nanogpt_hf.nanochat import to_nanochat

    assert NanoGPTConfig(final_logit_softcapping=0).final_logit_softcapping is None
    model = random_model(modern_config(final_logit_softcapping=15))
    assert to_nanochat(model).config.final_logit_softcapping == 15.0


def test_a_state_saved_before_the_switches_resumes_with_its_models_architecture(char_data, tmp_path):
    """A state whose settings predate a switch (here: activation_function, for a model with OpenAI's gelu_new)
    resumes with the model's own value, explicit or not."""
    import json

    from nanogpt_hf.checkpoint import TRAINER_STATE, latest_state

    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2, activation_function="gelu_new")) == 0
    path = os.path.join(latest_state(str(tmp_path)), TRAINER_STATE)
    with open(path) as fh:
        ts = json.load(fh)
    del ts["settings"]["activation_function"]  # as saved before the setting existed
    with open(path, "w") as fh:
        json.dump(ts, fh)
    AcceleratorState._reset_state(reset_partial_state=True)
    explicit = {"init_from": "resume", "max_iters": 3, "activation_function": "gelu_new"}
    assert train(tiny(char_data, tmp_path, max_iters=3, eval_interval=2, init_from="resume",
                      activation_function="gelu_new"), explicit=explicit) == 0
    with open(tmp_path / "train_config.yaml") as fh:
        assert "activation_function: gelu_new" in fh.read()
