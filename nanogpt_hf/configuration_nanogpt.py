"""NanoGPTConfig: nanoGPT's GPTConfig (names and defaults) as a transformers configuration.

`attribute_map` exposes the names HF tooling reads (hidden_size, num_hidden_layers, ...). The switches after GPT-2's
fields are departures from GPT-2 (together, nanochat's architecture); their defaults keep GPT-2's. This file imports
only transformers: save_pretrained copies it next to the weights for trust_remote_code.
"""

from transformers import PreTrainedConfig

# the values a switch takes, GPT-2's first; activations: exact GELU (nanoGPT), tanh GELU (OpenAI's weights), ReLU^2
CHOICES = {"activation_function": ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu2"),
           "position_embedding": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm")}
SWITCHES = ("position_embedding", "rope_theta", "norm", "norm_after_embedding", "qk_norm", "n_kv_head",
            "tie_word_embeddings", "final_logit_softcapping", "zero_init_projections")  # departures from GPT-2


class NanoGPTConfig(PreTrainedConfig):
    model_type = "nanogpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float | int = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    activation_function: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # transformers 5's base class no longer declares these: without tie_word_embeddings the head silently unties
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    # departures from GPT-2 (recipes/shakespeare_char_modern.yaml sets nanochat's)
    position_embedding: str = "learned"  # learned: a table of block_size positions (wpe); rotary: RoPE on q and k
    rope_theta: float = 10000.0  # rotary's base
    norm: str = "layernorm"  # layernorm: GPT-2's; rmsnorm: RMSNorm without parameters
    norm_after_embedding: bool = False  # normalise the embeddings before the first block
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (after rotary)
    n_kv_head: int | None = None  # grouped-query attention: key/value heads, each shared by n_head // n_kv_head
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    zero_init_projections: bool = False  # each block's two output projections start at zero

    def __post_init__(self, **kwargs):
        # impossible shapes fail here, naming the setting, rather than deep inside torch
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"NanoGPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"NanoGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"NanoGPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"NanoGPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if not (isinstance(kv, int) and kv > 0 and self.n_head % kv == 0):
            raise ValueError(f"NanoGPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.position_embedding == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError("NanoGPTConfig: rotary embeddings need an even head size (n_embd // n_head)")
        cap = self.final_logit_softcapping  # a float (NanoChat's config is strict); 0 means no cap, as None
        self.final_logit_softcapping = float(cap) if cap else None
        super().__post_init__(**kwargs)


__all__ = ["NanoGPTConfig"]
