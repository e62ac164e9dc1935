"""GPT-2 <-> nanoGPT: transformers' GPT2LMHeadModel as NanoGPTForCausalLM and back, with exactly the same logits.

The same network with the same parameter names, except that GPT-2 stores four weights as Conv1D (in, out), not
nn.Linear (out, in); OpenAI's tanh GELU ("gelu_new") is kept as the model's activation_function."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .common import UserError
from .configuration_nanogpt import ARCHITECTURE, NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config options that change the function computed, at nanoGPT's values (not reorder_and_upcast_attn: it upcasts)
NANOGPT_OPTIONS = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
# what stock GPT-2 expresses, any value (...): its shape, its biases (ours may be zero), any of transformers'
# activations, a head tied or not, how the weights began; any other declared field must keep GPT-2's value
GPT2 = dict.fromkeys(("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation_function",
                      "tie_word_embeddings", "zero_init_projections", "rope_theta"), ...)  # rope_theta: unused


def check_target(config, target: dict, name: str) -> None:
    """Refuse, naming it, a declared field (configuration_nanogpt.ARCHITECTURE) that `name`'s architecture cannot
    express: a field `target` lists takes any value (...) or the one listed; any other must keep NanoGPTConfig's
    default (GPT-2's), so a field added later is refused until a target lists it."""
    for k in ARCHITECTURE:
        value = None if k == "n_kv_head" and config.n_kv_head == config.n_head else getattr(config, k)  # one per head
        needed = target.get(k, getattr(NanoGPTConfig, k))
        if needed is not ... and value != needed:
            raise UserError(f"the model has {k}={getattr(config, k)!r}, which {name} cannot express (it needs "
                            f"{k}={needed!r})")


def convert_state(state: dict, like: dict) -> dict:
    """`state` in the layout of `like`: Conv1D weights transposed, mask buffers left out, missing biases zero."""
    out = {}
    for key, target in like.items():  # a missing key is a bias, never a Conv1D weight
        value = state[key].detach().float() if key in state else torch.zeros_like(target)
        out[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    return out


def from_gpt2(name_or_path: str, dropout: float = 0.0, **kwargs) -> NanoGPTForCausalLM:
    """Any GPT2LMHeadModel checkpoint (gpt2 ... gpt2-xl, a Hub id or a folder) as NanoGPTForCausalLM, same logits."""
    model_type = GPT2Config.get_config_dict(name_or_path, **kwargs)[0].get("model_type")
    if model_type != "gpt2":  # GPT2LMHeadModel would load another model's weights with a mere warning
        raise UserError(f"'{name_or_path}' is a {model_type!r} checkpoint, not GPT-2 (model_type gpt2)")
    gpt2 = GPT2LMHeadModel.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
    c = gpt2.config
    unsupported = [f"{k}={getattr(c, k)!r}" for k, v in NANOGPT_OPTIONS.items() if getattr(c, k) != v]
    unsupported += [f"n_inner={c.n_inner}"] if c.n_inner not in (None, 4 * c.n_embd) else []
    if unsupported:
        raise UserError(f"'{name_or_path}' uses GPT-2 options outside nanoGPT's architecture: {', '.join(unsupported)}")
    model = NanoGPTForCausalLM(NanoGPTConfig(
        block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        dropout=dropout, bias=True, activation_function=c.activation_function, layer_norm_epsilon=c.layer_norm_epsilon,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_word_embeddings))
    model.load_state_dict(convert_state(gpt2.state_dict(), model.state_dict()), strict=True)
    return model


def to_gpt2(model: NanoGPTForCausalLM) -> GPT2LMHeadModel:
    """The model as a stock transformers GPT2LMHeadModel computing the same logits (float32)."""
    c = model.config
    check_target(c, GPT2, "GPT-2")
    gpt2 = GPT2LMHeadModel(GPT2Config(  # n_ctx: OpenAI's config.json has it, and llama.cpp's converter reads it
        vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function=c.activation_function, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
        attn_pdrop=c.dropout, layer_norm_epsilon=c.layer_norm_epsilon, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, tie_word_embeddings=c.tie_word_embeddings))
    gpt2.load_state_dict(convert_state(model.state_dict(), gpt2.state_dict()), strict=True)
    gpt2.generation_config = model.generation_config
    return gpt2
