"""NanoGPTConfig: nanoGPT's GPTConfig as a transformers configuration.

The field names and defaults are nanoGPT's (block_size, vocab_size, n_layer, n_head, n_embd, dropout, bias);
`attribute_map` exposes them under the names HF tooling reads (hidden_size, num_hidden_layers, ...).
This file imports only transformers: save_pretrained copies it next to the weights for trust_remote_code.
"""

from transformers import PreTrainedConfig

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


class NanoGPTConfig(PreTrainedConfig):
    r"""
    block_size (`int`, defaults to 1024): maximum sequence length (number of position embeddings).
    vocab_size (`int`, defaults to 50304): GPT-2's 50257 padded up to a multiple of 64 (faster matmuls).
    n_layer / n_head / n_embd: depth, attention heads, width.
    dropout (`float`, defaults to 0.0): embedding, attention and residual dropout (nanoGPT uses one value).
    bias (`bool`, defaults to True): biases in Linear and LayerNorm layers, as GPT-2; False is a bit better and faster.
    activation_function (`str`, defaults to "gelu"): exact GELU as nanoGPT trains; "gelu_new" (tanh approximation)
        reproduces OpenAI's GPT-2 weights exactly.
    """

    model_type = "nanogpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float | int = 0.0
    bias: bool = True
    activation_function: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # transformers 5 no longer declares these in the base class: without tie_word_embeddings the head silently unties.
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.check_settings()
        super().__post_init__(**kwargs)

    def check_settings(self):
        """Impossible shapes fail here with a ValueError naming the setting, not deep inside torch."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NanoGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"NanoGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NanoGPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"NanoGPTConfig.activation_function must be one of {', '.join(_ACTIVATIONS)}, "
                f"got {self.activation_function!r}"
            )


__all__ = ["NanoGPTConfig"]
