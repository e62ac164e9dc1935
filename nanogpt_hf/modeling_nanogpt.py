"""NanoGPTForCausalLM: nanoGPT's GPT (karpathy/nanoGPT model.py) as a native transformers model.

Same architecture, module names and initialisation as nanoGPT, so its state dicts load unchanged; plus what makes
a model native in transformers 5: the attention interface (sdpa / eager / flash), Cache objects for fast
generate(), padding masks and positions, labels -> loss, logits_to_keep, gradient checkpointing.

This file imports only torch, transformers and configuration_nanogpt: save_pretrained copies both files beside the
weights so that `from_pretrained(dir, trust_remote_code=True)` works where nanogpt_hf is not installed.
"""

import math
from collections.abc import Callable

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

# The four GPT-2 weights stored by OpenAI as Conv1D (in, out); nn.Linear stores (out, in).
GPT2_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config options that change the function the model computes, at the values nanoGPT's architecture has.
# reorder_and_upcast_attn is not one: it only computes eager attention scores in fp32 under autocast.
GPT2_OPTIONS_OF_NANOGPT = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                               add_cross_attention=False)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query (B, nh, T, hs), key/value (B, nh, S, hs); attention_mask additive (B, 1, T, S) or None for plain causal
    # attention. Kept in the input dtype (bf16 under autocast): no float mask to add, the scale applied to q (T x hs)
    # rather than to the scores (T x S), and softmax, which accumulates in fp32 internally, without a round trip to
    # fp32 scores. On a CPU under bf16 this is the fastest training attention (torch's flash kernel's backward is slow
    # there): see hardware.training_attention.
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


class NanoGPTAttention(nn.Module):
    def __init__(self, config: NanoGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # lets sdpa use its fused causal kernels when no padding mask is needed
        self.dropout = config.dropout
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        B, T, C = hidden_states.size()
        q, k, v = self.c_attn(hidden_states).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs) with S = past + T

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        y, att = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
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
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = NanoGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
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
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions: capture_outputs (on NanoGPTModel.forward) records what these modules
    # return through forward hooks, installed the first time an output is asked for: the usual forward (training)
    # runs no per-layer code for it. Attention weights exist only with eager attention (sdpa/flash never form them).
    _can_record_outputs = {"hidden_states": NanoGPTBlock, "attentions": NanoGPTAttention}
    # nanoGPT checkpoints made without flash attention carry a causal-mask buffer we do not need
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$"]

    def _init_weights(self, module):
        """nanoGPT's init: N(0, 0.02) for Linear and Embedding, zero biases, c_proj scaled by 1/sqrt(2 * n_layer).

        transformers.initialization helpers skip tensors already loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2's scaled init of the projections into the residual stream (2 per block). Flagged on the Linear
            # itself: transformers skips the init of modules without parameters of their own in custom code.
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class NanoGPTModel(NanoGPTPreTrainedModel):
    """The transformer without its head: wte, wpe, drop, h, ln_f (nanoGPT's `transformer` ModuleDict)."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([NanoGPTBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is None:  # the pre-5.24 name of the same argument
            cache = kwargs.pop("past_key_values", None)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        T = inputs_embeds.shape[1]

        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        # a static cache counts its tokens on the device: reading the count would sync and split a compiled decoding
        # step, so its capacity (the longest sequence generate will make) is checked instead
        length = past + T if isinstance(past, int) else cache.get_max_length()
        if length > self.config.block_size and attention_mask is not None and attention_mask.ndim == 2:
            length = int(attention_mask.sum(-1).max())  # padding takes no positions (below): only real tokens count
        if length > self.config.block_size:
            raise ValueError(
                f"sequence of {length} tokens is longer than the model's block_size {self.config.block_size}: "
                f"keep the last {self.config.block_size} tokens (or crop_block_size / train a longer model)"
            )

        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # left padding: a prompt's first real token gets position 0, exactly as if it were alone
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)

        # plain causal attention without a cache (training, scoring): every attention implementation applies
        # causality itself, so no (B, 1, T, S) mask is built (eager would add a float one to every score matrix).
        # With a cache the mask also hides a static cache's unfilled slots.
        causal_mask = None if attention_mask is None and cache is None else create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        x = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            # a cache passed in is read and extended even with use_cache=False (as GPT-2 does), which only keeps
            # it out of the output: the mask above already spans its tokens. By keyword: a checkpointed block's
            # recomputation in backward must not extend it again (GradientCheckpointingLayer drops cache=)
            x = block(x, causal_mask, cache=cache, position_ids=position_ids, **kwargs)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache if use_cache else None)


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
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels are shifted inside (labels = input_ids works; -100 is ignored). Training code that already holds
        next-token targets y (nanoGPT's x, y windows) passes shift_labels=y instead."""
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # only compute the logits that are needed (the last position when generating)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', vocab_size)

        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # sdpa's cuDNN backend, which torch prefers on Hopper GPUs, builds an execution plan for every new sequence
    # length. Decoding grows the key length by one at every token, so it paid that build at every token (an H200
    # made 43 tokens/s with a 10M model, a 2-core CPU 194). Generation runs on sdpa's other backends, which take any
    # length at no set-up cost; training and evaluation (fixed lengths) keep torch's choice.
    GENERATION_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def generate(self, *args, **kwargs):
        config = args[1] if len(args) > 1 else kwargs.get("generation_config")
        self._check_generation_fits(args[0] if args else kwargs.get("inputs", kwargs.get("input_ids")), config,
                                    kwargs)
        with sdpa_kernel(self.GENERATION_SDPA_BACKENDS):
            return super().generate(*args, **kwargs)

    def _check_generation_fits(self, inputs, config, kwargs: dict) -> None:
        """Refuse, before decoding, a request that outgrows block_size: forward refuses only when it gets there,
        after up to block_size tokens of work (and a pipeline's default 256 new tokens outgrow a small model)."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
            inputs = kwargs.get("inputs_embeds")
            if not isinstance(inputs, torch.Tensor):
                return
        width, block_size = inputs.shape[1], self.config.block_size  # width: the prompt with its padding
        prompt = width
        configs = [c for c in (config, self.generation_config) if c is not None]

        def setting(name):  # as generate resolves it: the call's keyword, its config, the model's config
            return kwargs.get(name, next((getattr(c, name) for c in configs if getattr(c, name, None) is not None),
                                         None))

        mask = kwargs.get("attention_mask")
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        dynamic = setting("cache_implementation") in (None, "dynamic") and (given is None or
                                                                              isinstance(given, DynamicCache))
        if dynamic and isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == width:
            # padding takes no positions: a padded batch fits as its longest prompt. (A static cache is checked by
            # its capacity, padding included, which forward reads without a device sync.)
            prompt = int(mask.sum(-1).max())

        new = setting("max_new_tokens")
        if new is None:
            max_length = setting("max_length")
            new = None if max_length is None else max_length - width  # max_length counts the padding
        if new is None or prompt + new - 1 <= block_size:  # the last new token is never fed back
            return
        fix = (f"ask for at most {block_size + 1 - prompt} new tokens" if prompt <= block_size
               else f"keep the prompt's last {block_size} tokens")
        raise ValueError(f"{new} new tokens after a {prompt}-token prompt make a sequence of {prompt + new - 1} "
                         f"tokens, longer than the model's block_size {block_size}: {fix} (sample.py slides the "
                         f"window to generate past it)")

    # ---- nanoGPT's helpers ------------------------------------------------------------------------------------

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: position embeddings excluded by default; the token embeddings
        count once because they are shared with lm_head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery to use a smaller block size than the checkpoint's (e.g. 1024 -> 256 for finetuning)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay for every 2-D tensor (matmul weights, embeddings), none for biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]  # shared weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type) -> torch.optim.AdamW:
        # fused AdamW: one kernel per tensor instead of about ten (CUDA and CPU; on CPU the foreach path loops anyway)
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=learning_rate, betas=betas,
                                 fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (the device's peak; nanoGPT hard-wires an A100's
        312e12). fwdbwd_per_iter sequences of seq_len tokens took dt seconds."""
        T = seq_len or self.config.block_size
        flops_per_iter = self.flops_per_token(T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # ---- GPT-2 interoperability -------------------------------------------------------------------------------

    @classmethod
    def from_gpt2(cls, name_or_path: str, dropout: float = 0.0, **kwargs) -> "NanoGPTForCausalLM":
        """Load any GPT2LMHeadModel checkpoint (gpt2 ... gpt2-xl on the Hub, or a local folder).

        The logits equal transformers' GPT2LMHeadModel: same weights (Conv1D transposed into Linear) and the same
        activation (tanh GELU for OpenAI's weights). Raises OSError with one clear line when it cannot be loaded.
        """
        from transformers import GPT2Config, GPT2LMHeadModel

        try:
            # the type first: GPT2Config.from_pretrained of another model's config logs a warning before our error
            model_type = GPT2Config.get_config_dict(name_or_path)[0].get("model_type", "gpt2")
            if model_type == "gpt2":
                gpt2_config = GPT2Config.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"cannot load a GPT-2 checkpoint from '{name_or_path}': {str(exc).splitlines()[0]}"
            ) from None
        if model_type != "gpt2":
            raise OSError(f"'{name_or_path}' is a {model_type!r} checkpoint, not GPT-2 (model_type gpt2)")
        unsupported = [f"{name}={getattr(gpt2_config, name)!r}" for name, value in GPT2_OPTIONS_OF_NANOGPT.items()
                       if getattr(gpt2_config, name) != value]
        if gpt2_config.n_inner not in (None, 4 * gpt2_config.n_embd):
            unsupported.append(f"n_inner={gpt2_config.n_inner!r}")
        if unsupported:
            raise OSError(f"'{name_or_path}' uses GPT-2 options outside nanoGPT's architecture: "
                          f"{', '.join(unsupported)}")
        try:
            config = NanoGPTConfig(
                block_size=gpt2_config.n_positions,
                vocab_size=gpt2_config.vocab_size,
                n_layer=gpt2_config.n_layer,
                n_head=gpt2_config.n_head,
                n_embd=gpt2_config.n_embd,
                dropout=dropout,
                bias=True,
                activation_function=gpt2_config.activation_function,
                layer_norm_epsilon=gpt2_config.layer_norm_epsilon,
                bos_token_id=gpt2_config.bos_token_id,
                eos_token_id=gpt2_config.eos_token_id,
                tie_word_embeddings=gpt2_config.tie_word_embeddings,
            )
        except ValueError as exc:  # a GPT-2 setting nanoGPT has no equivalent for, e.g. another activation
            raise OSError(f"cannot load '{name_or_path}' as nanoGPT: {exc}") from None
        try:
            gpt2 = GPT2LMHeadModel.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"cannot load GPT-2 weights from '{name_or_path}': {str(exc).splitlines()[0]}"
            ) from None
        model = cls(config)
        state = {}
        for key, value in gpt2.state_dict().items():
            if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
                continue  # old checkpoints' mask buffers
            state[key] = value.t() if key.endswith(GPT2_CONV1D_WEIGHTS) else value
        model.load_state_dict(state, strict=True)
        model.generation_config.bos_token_id = config.bos_token_id
        model.generation_config.eos_token_id = config.eos_token_id
        return model

    def to_gpt2(self):
        """This model as a stock transformers GPT2LMHeadModel (same logits). A model trained with bias=False gets
        zero biases, which computes the same function."""
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = self.config
        gpt2_config = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function=cfg.activation_function,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        gpt2 = GPT2LMHeadModel(gpt2_config)
        ours = {k: v.detach().float() for k, v in self.state_dict().items()}
        state = {}
        for key, target in gpt2.state_dict().items():
            if key in ours:
                value = ours[key]
                state[key] = value.t().contiguous() if key.endswith(GPT2_CONV1D_WEIGHTS) else value
            else:
                state[key] = torch.zeros_like(target)  # a bias the bias=False model does not have
        gpt2.load_state_dict(state, strict=True)
        return gpt2

    def save_gpt2(self, save_directory: str, **kwargs) -> None:
        """Write a plain GPT2LMHeadModel checkpoint that stock transformers loads with no custom code."""
        gpt2 = self.to_gpt2()
        gpt2.generation_config = self.generation_config
        gpt2.save_pretrained(save_directory, **kwargs)


__all__ = ["NanoGPTForCausalLM", "NanoGPTModel", "NanoGPTPreTrainedModel"]
