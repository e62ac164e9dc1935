"""NanoGPTConfig: nanoGPT's GPTConfig (names and defaults) as a transformers configuration.

The architecture is declared here once: each field a user may set carries its help and its allowed values (choices,
or an interval), from which the checks below, train.py's model settings (settings.py) and the exports' refusals
(gpt2.py) are derived. `attribute_map` exposes the names HF tooling reads (hidden_size, num_hidden_layers, ...). The
switches after GPT-2's fields are departures from GPT-2 (together, nanochat's architecture); their defaults keep
GPT-2's. This file imports only transformers: save_pretrained copies it next to the weights for trust_remote_code.
"""

import dataclasses
import math

from transformers import PreTrainedConfig


def declared(default, help: str, allowed: tuple | str | None = None):
    """A field of the architecture: its default, its --help and its allowed values (a tuple of choices, or an
    interval such as "[1, inf)" or "[0, 1)"; None, for an optional switch, is always allowed: off)."""
    return dataclasses.field(default=default, metadata={"help": help, "allowed": allowed})


def allows(allowed: tuple | str | None, value) -> bool:
    if allowed is None or value is None:
        return True
    if isinstance(allowed, tuple):
        return value in allowed
    lo, hi = (float(x) for x in allowed[1:-1].split(","))
    above = value >= lo if allowed[0] == "[" else value > lo
    below = value <= hi if allowed[-1] == "]" else value < hi
    return above and below and math.isfinite(value)


class NanoGPTConfig(PreTrainedConfig):
    model_type = "nanogpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    block_size: int = declared(1024, "context length (init_from a checkpoint: its own, unless given)", "[1, inf)")
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = declared(12, "transformer blocks", "[1, inf)")
    n_head: int = declared(12, "attention heads", "[1, inf)")
    n_embd: int = declared(768, "embedding width (a multiple of n_head)", "[1, inf)")
    dropout: float | int = declared(0.0, "dropout; 0 for pretraining, 0.1+ for finetuning", "[0, 1)")
    bias: bool = declared(True, "biases in Linear and LayerNorm layers (GPT-2's); false is a bit better and faster")
    activation_function: str = declared("gelu", "MLP activation: exact GELU (nanoGPT), tanh GELU (OpenAI's weights), "
                                        "ReLU^2", ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu2"))
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # transformers 5's base class no longer declares these: without tie_word_embeddings the head silently unties
    tie_word_embeddings: bool = declared(True, "the output head is the token embedding (false: a head of its own)")
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    # departures from GPT-2 (recipes/shakespeare_char_modern.yaml sets nanochat's)
    position_embedding: str = declared("learned", "learned: a table of block_size positions (wpe); rotary: RoPE on "
                                       "q and k", ("learned", "rotary"))
    rope_theta: float = declared(10000.0, "rotary embeddings' base", "(0, inf)")
    norm: str = declared("layernorm", "layernorm (GPT-2) | rmsnorm (without parameters)", ("layernorm", "rmsnorm"))
    norm_after_embedding: bool = declared(False, "normalise the embeddings before the first block")
    qk_norm: bool = declared(False, "RMSNorm of each head's queries and keys (after rotary)")
    n_kv_head: int | None = declared(None, "grouped-query attention's key/value heads, each shared by "
                                     "n_head // n_kv_head (none: n_head)", "[1, inf)")
    final_logit_softcapping: float | None = declared(None, "logits = cap * tanh(logits / cap)", "(0, inf)")
    zero_init_projections: bool = declared(False, "each block's two output projections start at zero")

    def __post_init__(self, **kwargs):
        cap = self.final_logit_softcapping  # a float (NanoChat's config is strict); 0 means no cap, as None
        self.final_logit_softcapping = float(cap) if cap else None
        # impossible shapes fail here, naming the setting, rather than deep inside torch
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"NanoGPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            if "allowed" in f.metadata and not allows(f.metadata["allowed"], getattr(self, f.name)):
                allowed = f.metadata["allowed"]
                allowed = f"one of {', '.join(allowed)}" if isinstance(allowed, tuple) else f"in {allowed}"
                raise ValueError(f"NanoGPTConfig.{f.name} must be {allowed}, got {getattr(self, f.name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"NanoGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"NanoGPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.position_embedding == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError("NanoGPTConfig: rotary embeddings need an even head size (n_embd // n_head)")
        super().__post_init__(**kwargs)


# the fields a user sets (train.py's model settings), in their order
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(NanoGPTConfig) if "allowed" in f.metadata)

__all__ = ["NanoGPTConfig"]
