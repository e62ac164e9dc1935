"""nanogpt-hf export-nanochat: our GPT with nanochat's switches as transformers' native NanoChatForCausalLM (same
logits, same greedy tokens, a folder plain transformers loads); export-nanochat and export-gpt2 refuse, before writing
anything, a model their target cannot express, naming the switch."""

import json
import os
import sys

import pytest
import torch
from test_convert import TEXT, _snapshot, run_cli
from transformers import GPT2LMHeadModel

from warm import warm_run
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.common import UserError
from nanogpt_hf.configuration_nanogpt import ARCHITECTURE
from nanogpt_hf.gpt2 import GPT2, to_gpt2
from nanogpt_hf.nanochat import NANOCHAT, to_nanochat
from nanogpt_hf.tokenization import char_tokenizer

VOCAB = len(set(TEXT))
# nanochat's architecture, with an untied head and capped logits; rope_theta and eps off their defaults so that a
# wrong mapping shows in the logits
MODERN = dict(position_embedding="rotary", norm="rmsnorm", norm_after_embedding=True, qk_norm=True,
              activation_function="relu2", bias=False, tie_word_embeddings=False, final_logit_softcapping=15.0,
              rope_theta=100.0, layer_norm_epsilon=1e-3)


def make_model(**switches) -> NanoGPTForCausalLM:
    """A tiny model (GPT-2's switches unless given) with spread-out weights: logits far from ties, reaching the cap."""
    torch.manual_seed(0)
    config = NanoGPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=32), **switches}, vocab_size=VOCAB,
                           bos_token_id=None, eos_token_id=None)
    model = NanoGPTForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if name == "lm_head.weight" else 0.3))
    return model.eval()


def left_padded_batch():
    """Two prompts of 12 and 8 tokens, the second left-padded: (ids, attention_mask, position_ids), each (2, 12)."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attention, switches", [
    ("eager", {}),
    ("sdpa", {}),
    ("eager", {"n_kv_head": 2}),  # grouped-query attention
    ("sdpa", {"n_kv_head": 1}),  # multi-query attention
    ("sdpa", {"tie_word_embeddings": True, "final_logit_softcapping": None}),  # nanochat's head may be tied, uncapped
], ids=["eager", "sdpa", "gqa-eager", "mqa-sdpa", "tied-uncapped-sdpa"])
def test_nanochat_computes_our_logits_and_greedy_tokens(attention, switches):
    ours = make_model(**{**MODERN, **switches})
    theirs = to_nanochat(ours).eval()
    ours.set_attn_implementation(attention)
    theirs.set_attn_implementation(attention)
    assert type(theirs).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, VOCAB, (3, 32))
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        expected = ours(idx).logits
        if ours.config.final_logit_softcapping:  # the cap (15) bends these logits: a missing or wrong cap would show
            assert expected.abs().max() > 10
        torch.testing.assert_close(theirs(idx).logits, expected, atol=1e-5, rtol=1e-5)
        # a left-padded batch: the real tokens' logits agree, and are those of the prompt alone
        padded = ours(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(theirs(ids, attention_mask=mask, position_ids=positions).logits[real],
                                   padded[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1, 4:], ours(ids[1:, 4:]).logits[0], atol=1e-5, rtol=1e-5)
    # greedy decoding with the KV cache, from the padded batch: the same tokens
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.generate(ids, **kwargs).tolist() == theirs.generate(ids, **kwargs).tolist()


def save_checkpoint(folder, **switches):
    """A checkpoint folder as training writes it: model and character tokenizer."""
    make_model(**switches).save_pretrained(folder)
    char_tokenizer(TEXT).save_pretrained(folder)


def test_export_nanochat_folder_loads_in_plain_transformers(tmp_path, capsys):
    """The folder needs no custom code: a fresh process that cannot import nanogpt_hf loads it with AutoModel, without
    trust_remote_code, and gets our logits and tokenizer."""
    save_checkpoint(tmp_path / "ckpt", **MODERN, n_kv_head=2)
    out = tmp_path / "nanochat"
    rc, stdout, err = run_cli(["export-nanochat", tmp_path / "ckpt", out], capsys)
    assert rc == 0, err
    assert "NanoChatForCausalLM" in stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "nanochat"
    assert not list(out.glob("*.py")) and (out / "README.md").is_file()
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        logits = NanoGPTForCausalLM.from_pretrained(tmp_path / "ckpt")(idx).logits
    torch.save({"idx": idx, "logits": logits}, tmp_path / "ref.pt")
    code = f"""
import sys, torch
sys.modules["nanogpt_hf"] = None  # importing it now fails, wherever it is installed
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ref = torch.load({str(tmp_path / "ref.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(m(ref["idx"]).logits, ref["logits"], atol=1e-5, rtol=1e-5)
tok = AutoTokenizer.from_pretrained({str(out)!r})
assert tok.decode(tok.encode({TEXT!r})) == {TEXT!r}
print("OK", type(m).__name__)
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert res.returncode == 0 and "OK NanoChatForCausalLM" in res.stdout, res.stderr


def assert_refused(argv, capsys, root, switch):
    """Exit 2 with one `error:` line naming the switch (after the weights' loading bar), and nothing written (no OUT,
    no temporary folder)."""
    before = _snapshot(root)
    rc, _, err = run_cli(argv, capsys)
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: ") and f"{switch}=" in errors[0], err
    assert _snapshot(root) == before


def test_export_nanochat_refuses_a_gpt2_model_before_writing(tmp_path, capsys):
    save_checkpoint(tmp_path / "gpt2-style")
    capsys.readouterr()
    assert_refused(["export-nanochat", tmp_path / "gpt2-style", tmp_path / "out"], capsys, tmp_path, "bias")
    assert not (tmp_path / "out").exists()


def test_export_gpt2_refuses_a_modern_model_and_exports_what_gpt2_expresses(tmp_path, capsys):
    save_checkpoint(tmp_path / "modern", **MODERN)
    capsys.readouterr()
    assert_refused(["export-gpt2", tmp_path / "modern", tmp_path / "out"], capsys, tmp_path, "position_embedding")
    assert not (tmp_path / "out").exists()
    # no biases, ReLU^2, an untied head, zero-initialised projections, n_kv_head = n_head: all stock GPT-2
    save_checkpoint(tmp_path / "plain", bias=False, activation_function="relu2", tie_word_embeddings=False,
                    zero_init_projections=True, n_kv_head=4)
    rc, _, err = run_cli(["export-gpt2", tmp_path / "plain", tmp_path / "gpt2"], capsys)
    assert rc == 0, err
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")(idx).logits,
                                   NanoGPTForCausalLM.from_pretrained(tmp_path / "plain")(idx).logits,
                                   atol=1e-5, rtol=1e-5)


# each switch, alone at a value the target cannot express, is refused by name
NOT_GPT2 = dict(MODERN, n_kv_head=2)
NOT_NANOCHAT = dict(position_embedding="learned", norm="layernorm", norm_after_embedding=False, qk_norm=False,
                    activation_function="gelu", bias=True)


@pytest.mark.parametrize("switch", sorted(k for k in ARCHITECTURE if GPT2.get(k) is not ...))
def test_to_gpt2_names_each_switch_it_cannot_express(switch):
    with pytest.raises(UserError, match=f"{switch}="):
        to_gpt2(make_model(**{switch: NOT_GPT2[switch]}))


@pytest.mark.parametrize("switch", sorted(k for k in NANOCHAT if NANOCHAT[k] is not ...))
def test_to_nanochat_names_each_switch_it_cannot_express(switch):
    with pytest.raises(UserError, match=f"{switch}="):
        to_nanochat(make_model(**{**MODERN, switch: NOT_NANOCHAT[switch]}))


# a value off GPT-2's default for every declared field: a field added to NanoGPTConfig must be listed here
OTHER_VALUE = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1, bias=False,
                   activation_function="gelu_new", tie_word_embeddings=False, position_embedding="rotary",
                   rope_theta=100.0, norm="rmsnorm", norm_after_embedding=True, qk_norm=True, n_kv_head=2,
                   final_logit_softcapping=2.0, zero_init_projections=True)


@pytest.mark.parametrize("field", ARCHITECTURE)
@pytest.mark.parametrize("target", ["gpt2", "nanochat"])
def test_an_export_is_exact_or_refused_for_every_declared_field(field, target):
    """By construction: any field of the architecture, off its value, exports to the same logits or is refused by
    name; never a model that computes something else."""
    assert set(OTHER_VALUE) == set(ARCHITECTURE)
    base, convert = ({}, to_gpt2) if target == "gpt2" else (MODERN, to_nanochat)
    value = OTHER_VALUE[field] if OTHER_VALUE[field] != base.get(field) else getattr(NanoGPTConfig, field)
    ours = make_model(**{**base, field: value})
    try:
        theirs = convert(ours).eval()
    except UserError as exc:
        assert f"{field}=" in str(exc)
        return
    idx = torch.randint(0, VOCAB, (2, ours.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx).logits, atol=1e-5, rtol=1e-5)
