"""NanoGPTForCausalLM: nanoGPT's GPT (karpathy/nanoGPT model.py) as a native transformers model.

Same architecture, module names and initialisation as nanoGPT, so its state dicts load unchanged. The config's
switches depart from GPT-2, each in the class it touches (rotary positions, RMSNorm, QK-norm, ReLU^2, grouped-query
attention, an untied head, logit soft-capping, zero-initialised projections: together nanochat's GPT). Plus the
transformers 5 conventions: the attention interface (sdpa / eager / flash), Cache objects for fast generate(),
padding masks and positions, labels -> loss, logits_to_keep, gradient checkpointing, recorded outputs.

This file imports only torch, transformers and configuration_nanogpt: save_pretrained copies both files beside the
weights, so `from_pretrained(dir, trust_remote_code=True)` works where nanogpt_hf is not installed.
"""

import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_nanogpt import NanoGPTConfig


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query (B, nh, T, hs), key/value (B, n_kv_head, S, hs); attention_mask additive (B, 1, T, S), or None for plain
    # causal attention. Also the CPU bf16 training attention (hardware.training_attention), so kept fast: the input
    # dtype throughout (softmax accumulates in fp32 inside), the scale on q (T x hs) rather than the scores (T x S), and
    # no float mask built when there is no padding.
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves n_head // n_kv_head
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, nh, S, hs)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    att = torch.matmul(query * scaling, key.transpose(-2, -1))  # (B, nh, T, S)
    if attention_mask is not None:
        att = att + attention_mask
    elif query.shape[2] > 1:
        T, S = query.shape[2], key.shape[2]
        future = torch.full((T, S), float("-inf"), dtype=att.dtype, device=att.device).triu(S - T + 1)  # (T, S)
        att = att + future  # cheaper than masked_fill, and nothing to do in backward
    att = nn.functional.softmax(att, dim=-1)
    att = nn.functional.dropout(att, p=dropout, training=module.training)
    y = torch.matmul(att, value)  # (B, nh, T, hs)
    return y.transpose(1, 2).contiguous(), att  # (B, T, nh, hs)


def make_norm(config: NanoGPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or (norm="rmsnorm") RMSNorm without parameters, as nanochat."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


def rotary_cos_sin(config: NanoGPTConfig, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings' cos and sin at each position, (B, T, 1, hs): frequency i = rope_theta^(-2i / hs)."""
    hs = config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, device=position_ids.device).float() / hs)  # (hs/2,)
    freqs = position_ids[..., None, None].float() * inv_freq  # (B, T, 1, hs/2); (T, 1, hs/2) for (T,) positions
    freqs = torch.cat((freqs, freqs), dim=-1)  # (B, T, 1, hs)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + hs/2}) of every head by its position's angle (nanochat's sign convention)."""
    x1, x2 = x.chunk(2, dim=-1)  # x (B, T, heads, hs); in x's dtype, autocast's bf16 included
    return x * cos.to(x.dtype) + torch.cat((x2, -x1), dim=-1) * sin.to(x.dtype)


class NanoGPTAttention(nn.Module):
    def __init__(self, config: NanoGPTConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.num_key_value_groups = self.n_head // self.n_kv_head  # read by transformers' attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # lets sdpa use its fused causal kernels when no padding mask is needed
        self.dropout = config.dropout
        # query, key, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention_mask=None, cache: Cache | None = None, position_embeddings=None, **kwargs):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # (B, T, heads, hs)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)  # queries and keys side by side
        if position_embeddings is not None:  # rotary: (cos, sin), each (B, T, 1, hs)
            qk = rotate(qk, *position_embeddings)
        if self.config.qk_norm:
            qk = nn.functional.rms_norm(qk, (self.head_dim,), eps=self.config.layer_norm_epsilon)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, n_kv_head, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv_head, S, hs) with S = past + T
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        y, att = attention(self, q, k, v, attention_mask, dropout=self.dropout if self.training else 0.0,
                           scaling=self.scaling, **kwargs)
        y = y.reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), att


class NanoGPTMLP(nn.Module):
    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = ACT2FN[config.activation_function]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see _init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config: NanoGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = NanoGPTAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = NanoGPTMLP(config)

    def forward(self, x, attention_mask=None, cache=None, **kwargs):
        x = x + self.attn(self.ln_1(x), attention_mask=attention_mask, cache=cache, **kwargs)[0]
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoGPTConfig
    config: NanoGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoGPTBlock"]
    _supports_sdpa = _supports_flash_attn = _supports_attention_backend = True
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions: capture_outputs (on NanoGPTModel.forward) records these modules'
    # outputs through hooks installed on first request, so training runs no per-layer code for them. Attention
    # weights exist only with eager attention (sdpa and flash never form them).
    _can_record_outputs = {"hidden_states": NanoGPTBlock, "attentions": NanoGPTAttention}
    # nanoGPT checkpoints made without flash attention carry a causal-mask buffer we do not need
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$"]

    def _init_weights(self, module):
        """nanoGPT's init: N(0, 0.02) for Linear and Embedding, zero biases, c_proj scaled by 1/sqrt(2 * n_layer).
        The transformers.initialization helpers skip tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2's scaled init of the 2 projections per block into the residual stream; flagged on the Linear
            # itself, as transformers skips the init of modules without parameters of their own in custom code
            if getattr(module, "residual_projection", False):
                std = 0.0 if self.config.zero_init_projections else std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            init.zeros_(module.bias)


class NanoGPTModel(NanoGPTPreTrainedModel):
    """The transformer without its head: nanoGPT's wte, wpe (learned positions), drop, h, ln_f; ln_emb (or none)."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.ln_emb = make_norm(config) if config.norm_after_embedding else nn.Identity()
        self.h = nn.ModuleList([NanoGPTBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # the pre-5.24 name
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # token embeddings (B, T, C)
        T = inputs_embeds.shape[1]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not (self.gradient_checkpointing and self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        self.check_length(past + T if isinstance(past, int) else cache.get_max_length(), attention_mask)

        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # left padding: a prompt's first real token gets position 0, exactly as if it were alone
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)  # (1, T)
        # plain causal attention without a cache (training, scoring): every attention implementation applies
        # causality itself, so no (B, 1, T, S) mask is built. With a cache, the mask also hides a static cache's
        # unfilled slots.
        if attention_mask is not None or cache is not None:
            attention_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                                attention_mask=attention_mask, cache=cache, position_ids=position_ids)

        x = inputs_embeds if self.wpe is None else inputs_embeds + self.wpe(position_ids)  # (B, T, C)
        x = self.drop(self.ln_emb(x))
        rotary = None if self.wpe is not None else rotary_cos_sin(self.config, position_ids, x.dtype)
        for block in self.h:
            # a cache passed in is read and extended even with use_cache=False (as GPT-2 does): that only keeps it
            # out of the output. By keyword: GradientCheckpointingLayer drops cache= from the recomputation
            x = block(x, attention_mask, cache=cache, position_ids=position_ids, position_embeddings=rotary, **kwargs)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache if use_cache else None)

    def check_length(self, length, attention_mask) -> None:
        """Refuse a sequence past block_size (learned positions end there; rotary ones were never trained past it).
        Padding takes no positions, so only real tokens count. A static cache's token count lives on the device
        (reading it would sync and split a compiled decoding step): its capacity, the longest sequence generate will
        make, is checked instead."""
        block_size = self.config.block_size
        if length > block_size and attention_mask is not None and attention_mask.ndim == 2:
            length = int(attention_mask.sum(-1).max())
        if length > block_size:
            raise ValueError(f"sequence of {length} tokens is longer than the model's block_size {block_size}: keep "
                             f"the last {block_size} tokens (or crop_block_size / train a longer model)")


class NanoGPTForCausalLM(NanoGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.transformer = NanoGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple  # return_dict=False; NanoGPTModel's capture_outputs handles it for the bare model
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """labels are shifted inside (labels = input_ids works; -100 is ignored). Training code that already holds
        next-token targets y (nanoGPT's x, y windows) passes shift_labels=y instead."""
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        # only compute the logits that are needed (the last position when generating; a (B, T) boolean mask: the
        # positions it marks, row by row, as (S, vocab_size): task scoring's continuations)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden, masked = out.last_hidden_state, isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
        logits = self.lm_head(hidden[keep] if masked else hidden[:, keep, :])  # (B, T', vocab_size)
        if cap := self.config.final_logit_softcapping:  # squashed smoothly into (-cap, cap)
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    # sdpa's cuDNN backend, torch's choice on Hopper GPUs, builds an execution plan for every new sequence length, and
    # decoding grows the key length by one at every token (an H200 made 43 tokens/s with a 10M model, a 2-core CPU
    # 194). generate runs on sdpa's other backends; training and evaluation (fixed lengths) keep torch's choice.
    GENERATION_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def generate(self, *args, **kwargs):
        """generate(), refused before the first token when the sequence would outgrow block_size (pipeline,
        max_new_tokens=...): the tokens fed back are the prompt's and all new ones but the last."""
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        new = kwargs.get("max_new_tokens") or getattr(kwargs.get("generation_config"), "max_new_tokens", None)
        if isinstance(ids, torch.Tensor) and new:
            prompt = int(mask.sum(-1).max()) if mask is not None and mask.ndim == 2 else ids.shape[-1]
            if prompt + new - 1 > self.config.block_size:
                raise ValueError(f"a prompt of {prompt} tokens and max_new_tokens={new} outgrow the model's block_size "
                                 f"{self.config.block_size}: ask for at most {self.config.block_size + 1 - prompt} "
                                 "new tokens (sample.py slides the context past block_size)")
        with sdpa_kernel(self.GENERATION_SDPA_BACKENDS):
            return super().generate(*args, **kwargs)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: embedding tables excluded by default, but tied token embeddings
        count once, as lm_head (so the count is the weights that do matmuls: what MFU counts)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_word_embeddings:
            n_params -= self.transformer.wte.weight.numel()
        return n_params

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery to use a smaller block size than the checkpoint's (e.g. 1024 -> 256 for finetuning)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        if self.transformer.wpe is not None:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())


__all__ = ["NanoGPTForCausalLM", "NanoGPTModel", "NanoGPTPreTrainedModel"]
