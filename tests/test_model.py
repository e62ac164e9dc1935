"""The model: nanoGPT's architecture as a native transformers model, and GPT-2 interoperability both ways."""

import math
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from warm import warm_run
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM, NanoGPTModel
from nanogpt_hf.common import UserError
from nanogpt_hf.gpt2 import from_gpt2, to_gpt2
from nanogpt_hf.training import configure_optimizer


def tiny_config(**kw):
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300, bos_token_id=1, eos_token_id=2)
    args.update(kw)
    return NanoGPTConfig(**args)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved by stock transformers (OpenAI's layout: Conv1D, tanh GELU)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=300, n_positions=64, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    # random LayerNorm parameters too, so that a swapped weight/bias would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


def test_config_names_defaults_and_hf_aliases():
    c = NanoGPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.dropout, c.bias) == (
        1024, 50304, 12, 12, 768, 0.0, True)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings) == (768, 12, 12, 1024)
    assert c.tie_word_embeddings and c.use_cache and c.activation_function == "gelu"
    assert AutoConfig.for_model("nanogpt").__class__ is NanoGPTConfig


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(n_embd=100, n_head=3), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(activation_function="relu"), "activation_function"),
    ],
)
def test_impossible_config_raises_value_error_naming_the_setting(kw, name):
    with pytest.raises(ValueError, match=name):
        NanoGPTConfig(**kw)


def test_architecture_names_and_init_follow_nanogpt():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config(n_layer=8, n_embd=256, vocab_size=2000, bias=False))
    names = set(model.state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.7.attn.c_attn.weight",
            "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight", "lm_head.weight"} <= names
    assert not any(n.endswith(".bias") for n in names)  # bias=False
    assert model.lm_head.weight is model.transformer.wte.weight
    h = model.transformer.h[0]
    assert h.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert h.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert h.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert isinstance(h.mlp.gelu, torch.nn.Module) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_and_greedy_tokens_equal_nanogpt(bias, impl):
    from nanogpt_reference import RefGPT  # nanoGPT's model.py

    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=bias, vocab_size=300, dropout=0.0)
    torch.manual_seed(0)
    ref = RefGPT(args, flash=False).eval()
    with torch.no_grad():  # spread-out weights (LayerNorms too): a swapped or missing weight would show
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    model = NanoGPTForCausalLM(tiny_config(bias=bias, attn_implementation=impl)).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all(k.endswith("attn.bias") for k in unexpected)  # nanoGPT's mask buffer
    x = torch.randint(0, 300, (2, 40))
    assert (model(x).logits - ref(x)).abs().max().item() < 1e-4
    ours = model.generate(x[:, :5], attention_mask=torch.ones_like(x[:, :5]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None)
    assert torch.equal(ours, ref.generate_greedy(x[:, :5], 20))


def test_num_params_excludes_position_embeddings():
    model = NanoGPTForCausalLM(tiny_config())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 64 * 64


def test_gpt2_124m_shape_has_nanogpt_parameter_count():
    with torch.device("meta"):
        model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=50257))
    assert model.get_num_params() == 123_653_376  # nanoGPT prints "number of parameters: 123.65M" for gpt2


def test_loss_from_labels_and_shift_labels_and_ignore_index():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 16))
    out = model(x, labels=x)
    logits = out.logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.loss.item() == pytest.approx(math.log(300), rel=0.05)  # ln(vocab) at init
    # nanoGPT's (x, y) windows: targets already shifted
    y = torch.randint(0, 300, (2, 16))
    out2 = model(x, shift_labels=y)
    assert torch.allclose(out2.loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 300), y.reshape(-1)), atol=1e-6)
    labels = x.clone()
    labels[:, :8] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, 7:-1].reshape(-1, 300), x[:, 8:].reshape(-1))
    assert torch.allclose(model(x, labels=labels).loss, ref, atol=1e-6)


def test_logits_to_keep():
    model = NanoGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 10))
    full = model(x).logits
    assert torch.allclose(model(x, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)


def test_input_longer_than_block_size_is_a_clear_error():
    model = NanoGPTForCausalLM(tiny_config(block_size=16))
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size():
    model = NanoGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 300, (1, 20))
    before = model(x).logits
    model.crop_block_size(32)
    assert model.config.block_size == 32 and model.transformer.wpe.weight.shape == (32, 64)
    assert torch.allclose(model(x).logits, before, atol=1e-6)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_optimizer_decays_only_2d_weights():
    model = NanoGPTForCausalLM(tiny_config())
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert isinstance(opt, torch.optim.AdamW)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.get_num_params(non_embedding=False)  # tied weight counted once


def test_eager_and_sdpa_give_same_logits():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 30))
    sdpa = model(x).logits
    model.set_attn_implementation("eager")
    assert torch.allclose(model(x).logits, sdpa, atol=1e-5)


def test_hidden_states_and_attentions_like_gpt2():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config(n_layer=3)).eval()
    gpt2 = to_gpt2(model).eval()
    x = torch.randint(0, 300, (2, 20))
    for m in (model, gpt2):
        m.set_attn_implementation("eager")  # sdpa never forms the attention weights
    ours = model(x, output_hidden_states=True, output_attentions=True)
    theirs = gpt2(x, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == 3 + 1 and len(ours.attentions) == 3
    for a, b in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    bare = model.transformer(x, output_hidden_states=True)
    assert len(bare.hidden_states) == 4 and bare.attentions is None
    assert model(x, return_dict=False)[0].shape == (2, 20, 300)


def test_no_output_asked_no_per_layer_hooks():
    """Hooks that record outputs are installed on first request only: training never pays for them."""
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config())
    x = torch.randint(0, 300, (2, 20))
    out = model(x, labels=x)
    out.loss.backward()
    assert out.hidden_states is None and out.attentions is None
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_static_cache_without_a_mask_hides_its_empty_slots(impl):
    # training skips the causal mask (no cache); a static cache still needs one for its unfilled slots
    from transformers import StaticCache

    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(impl)
    x = torch.randint(0, 300, (1, 7))
    cached = model(x, cache=StaticCache(config=model.config, max_cache_len=32), use_cache=True).logits
    assert torch.allclose(cached, model(x, use_cache=False).logits, atol=1e-5)


def test_eager_bf16_training_attention_matches_fp32():
    # training on a bf16 CPU uses eager attention under autocast (hardware.training_attention): its loss and
    # gradients must be those of the fp32 sdpa model, to bf16 accuracy
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).train()
    x = torch.randint(0, 300, (4, 32))

    def loss_and_grads(impl, dtype):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x, labels=x, use_cache=False).loss  # as training calls it: no cache, no mask
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grad32 = loss_and_grads("sdpa", torch.float32)
    loss16, grad16 = loss_and_grads("eager", torch.bfloat16)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.999


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config())
    x = torch.randint(0, 300, (2, 16))
    model(x, labels=x).loss.backward()
    ref = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    model(x, labels=x).loss.backward()
    assert torch.allclose(model.transformer.h[0].attn.c_attn.weight.grad, ref, atol=1e-6)


def test_from_gpt2_equals_gpt2lmheadmodel(gpt2_dir):
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    model = from_gpt2(str(gpt2_dir)).eval()
    assert model.config.activation_function == "gelu_new"
    torch.manual_seed(1)
    x = torch.randint(0, 300, (3, 40))
    assert (model(x).logits - gpt2(x).logits).abs().max().item() < 1e-5
    prompt = x[:, :5]
    ours = model.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt))
    theirs = gpt2.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)


def test_to_gpt2_round_trip_loads_in_stock_transformers(gpt2_dir, tmp_path):
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    to_gpt2(from_gpt2(str(gpt2_dir))).save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is GPT2LMHeadModel
    x = torch.randint(0, 300, (2, 30))
    assert (back(x).logits - gpt2(x).logits).abs().max().item() < 1e-5


def test_to_gpt2_of_a_biasless_model(tmp_path):
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config(bias=False)).eval()
    to_gpt2(model).save_pretrained(tmp_path)
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 30))
    assert (gpt2(x).logits - model(x).logits).abs().max().item() < 1e-5


def test_from_gpt2_errors(tmp_path):
    # what the CLI prints as one `error:` line: the library's OSError for a missing checkpoint, ours for the rest
    for missing in (str(tmp_path / "nope"), "gpt2-nonexistent-id"):  # offline in tests: fails at once
        with pytest.raises(OSError):
            from_gpt2(missing)
    NanoGPTForCausalLM(tiny_config()).save_pretrained(tmp_path / "ours")
    with pytest.raises(UserError, match="not GPT-2"):
        from_gpt2(str(tmp_path / "ours"))


def tiny_gpt2_dir(path, **options):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, **options)
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("option, value", [
    ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True),
    ("n_inner", 24),
    ("activation_function", "relu"),
])
def test_from_gpt2_refuses_what_nanogpt_cannot_compute(tmp_path, option, value):
    with pytest.raises((UserError, ValueError), match=option) as info:
        from_gpt2(tiny_gpt2_dir(tmp_path, **{option: value}))
    assert "\n" not in str(info.value)


def test_untied_head_round_trips_through_gpt2(tmp_path):
    # the export tied the head whatever the model had: GPT-2 then computed logits from the wrong matrix
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config(tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    to_gpt2(model).save_pretrained(tmp_path / "gpt2")
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    back = from_gpt2(str(tmp_path / "gpt2")).eval()
    assert not back.config.tie_word_embeddings
    x = torch.randint(0, 300, (2, 30))
    assert (gpt2(x).logits - model(x).logits).abs().max().item() < 1e-4
    assert (back(x).logits - model(x).logits).abs().max().item() < 1e-4


def test_from_gpt2_accepts_reorder_and_upcast_attn(tmp_path):
    """It only changes the precision of eager attention under autocast: in fp32 the logits are the same."""
    folder = tiny_gpt2_dir(tmp_path, reorder_and_upcast_attn=True)
    gpt2 = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    x = torch.randint(0, 50, (2, 16))
    assert (from_gpt2(folder).eval()(x).logits - gpt2(x).logits).abs().max().item() < 1e-5


def test_cached_and_uncached_generation_equal():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 300, (2, 6))
    mask = torch.ones_like(prompt)
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False)
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    for kw in (dict(do_sample=True, top_k=20), dict(do_sample=True, top_p=0.9, temperature=0.8)):
        torch.manual_seed(3)
        a = model.generate(prompt, attention_mask=mask, max_new_tokens=30, **kw)
        torch.manual_seed(3)
        b = model.generate(prompt, attention_mask=mask, max_new_tokens=30, use_cache=False, **kw)
        assert torch.equal(a, b)


def test_beam_search_with_the_cache_equals_beam_search_without():
    """Beam search reorders the cache's rows as beams are kept or dropped: every beam, cached, is what a full
    recomputation of each step gives."""
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, 300, (2, 6))
    # 16 tokens: long enough for a cache left in its old order to change the beams (8 were not, here)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, num_beams=3, num_return_sequences=3,
              do_sample=False, eos_token_id=None)
    cached, recomputed = model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (6, 22) and torch.equal(cached, recomputed)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_batch_generates_like_each_prompt_alone(impl):
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(impl)
    prompts = [torch.randint(3, 300, (n,)) for n in (3, 9, 5)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=15,
                               do_sample=False)
        assert torch.equal(batch[i, L:], alone[0, len(p):])


def test_bare_model_continues_a_cache_like_gpt2():
    """NanoGPTModel takes past_key_values (it ignored it), and a cache passed with use_cache=False is still read (the
    mask spanned its tokens while the blocks did not: a shape error)."""
    from transformers import AutoModel, DynamicCache

    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    x = torch.randint(3, 300, (2, 10))
    full = model.transformer(x).last_hidden_state[:, 6:]
    first = model.transformer(x[:, :6], past_key_values=DynamicCache(config=model.config))
    assert first.cache.get_seq_length() == 6
    rest = model.transformer(x[:, 6:], past_key_values=first.cache)
    assert (rest.last_hidden_state - full).abs().max().item() < 1e-5
    cache = model(x[:, :6]).cache
    out = model(x[:, 6:], cache=cache, use_cache=False)
    assert out.cache is None
    assert (out.logits - model(x).logits[:, 6:]).abs().max().item() < 1e-5
    assert type(AutoModel.from_config(model.config)) is NanoGPTModel


def test_padding_does_not_count_against_block_size():
    """Positions come from the attention mask, so a padded prompt fits as its real tokens do (GPT-2 generates it);
    only real tokens past block_size are refused."""
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config(block_size=16)).eval()
    prompt = torch.randint(3, 300, (1, 5))
    alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    padded = torch.cat([torch.zeros(1, 12, dtype=torch.long), prompt], 1)
    mask = (padded != 0).long()
    mask[:, 12:] = 1
    out = model.generate(padded, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 12:], alone)
    with pytest.raises(ValueError, match="a prompt of 5 tokens and max_new_tokens=13 outgrow the model's block_size 16"):
        model.generate(padded, attention_mask=mask, max_new_tokens=13, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than the model's block_size 16"):
        model(torch.randint(3, 300, (1, 20)), attention_mask=torch.tensor([[0] * 3 + [1] * 17]))
    logits = model(padded, attention_mask=mask).logits[:, 12:]
    assert (logits - model(prompt).logits).abs().max().item() < 1e-5
    out = model.generate(padded, attention_mask=mask, max_length=27, do_sample=False, pad_token_id=0)  # 10 new
    assert torch.equal(out[:, 12:], alone)
    # generate gives a static cache a 4-D mask: there the padding counts, and forward refuses before decoding
    with pytest.raises(ValueError, match="sequence of 17 tokens"):
        model.generate(padded, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                       cache_implementation="static")


def test_auto_classes_and_remote_code_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "configuration_nanogpt.py",
            "modeling_nanogpt.py"} <= files
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is NanoGPTForCausalLM
    prompt = torch.randint(0, 300, (2, 5))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    torch.save({"prompt": prompt, "expected": expected}, tmp_path / "ref.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert "nanogpt_hf" not in sys.modules, "the package was imported"
ref = torch.load({str(tmp_path / "ref.pt")!r})
out = m.generate(ref["prompt"], attention_mask=torch.ones_like(ref["prompt"]), max_new_tokens=20, do_sample=False)
assert torch.equal(out, ref["expected"]), "different tokens"
print("OK", type(m).__module__)
"""
    res = warm_run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK transformers_modules" in res.stdout


def test_generation_keeps_off_cudnn_attention():
    # cuDNN's sdpa builds a plan per new sequence length: on an H200, decoding (one more key per token) ran at 43
    # tokens/s instead of 430. generate (pipeline's and sample.py's path too) turns it off; forward keeps torch's choice.
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(tiny_config()).eval()
    seen = []
    model.transformer.h[0].register_forward_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert seen == [False] * 3
    model(torch.tensor([[1, 5, 7]]))
    assert seen[-1] is True and torch.backends.cuda.cudnn_sdp_enabled()
