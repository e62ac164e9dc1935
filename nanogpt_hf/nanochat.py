"""Our modern GPT as transformers' native NanoChatForCausalLM: no custom code, the same logits; weights map 1:1."""

import torch
from transformers import NanoChatConfig, NanoChatForCausalLM

from .gpt2 import check_target

# what nanochat's architecture expresses: any shape, key/value heads, tied head, cap (...); the values it fixes
NANOCHAT = dict(dict.fromkeys(("block_size", "n_layer", "n_head", "n_embd", "dropout", "n_kv_head", "tie_word_embeddings",
                               "final_logit_softcapping", "rope_theta", "zero_init_projections"), ...),
                position_embedding="rotary", norm="rmsnorm", norm_after_embedding=True, qk_norm=True,
                activation_function="relu2", bias=False)


def to_nanochat(model) -> NanoChatForCausalLM:
    """The model as NanoChatForCausalLM: c_attn cut into q/k/v, the MLP's c_fc/c_proj as fc1/fc2 (float32)."""
    c = model.config
    check_target(c, NANOCHAT, "transformers' NanoChat")
    n_kv = c.n_kv_head or c.n_head
    kv = n_kv * c.n_embd // c.n_head  # rows of c_attn per key or value
    config = NanoChatConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=n_kv, max_position_embeddings=c.block_size,
        hidden_act="relu2", rms_norm_eps=c.layer_norm_epsilon, final_logit_softcapping=c.final_logit_softcapping,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    state = {"model.embed_tokens.weight": ours["transformer.wte.weight"], "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.n_layer):
        ours_i, theirs_i = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = ours[ours_i + "attn.c_attn.weight"].split([c.n_embd, kv, kv])
        state.update({theirs_i + "self_attn.q_proj.weight": q, theirs_i + "self_attn.k_proj.weight": k,
                      theirs_i + "self_attn.v_proj.weight": v,
                      theirs_i + "self_attn.o_proj.weight": ours[ours_i + "attn.c_proj.weight"],
                      theirs_i + "mlp.fc1.weight": ours[ours_i + "mlp.c_fc.weight"],
                      theirs_i + "mlp.fc2.weight": ours[ours_i + "mlp.c_proj.weight"]})
    nanochat = NanoChatForCausalLM(config).to(torch.float32)
    nanochat.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    nanochat.generation_config = model.generation_config
    return nanochat
