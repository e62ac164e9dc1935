"""nanogpt_hf: nanoGPT's clarity and speed as a native HuggingFace model.

Importing the package registers the model with the Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` and
`pipeline("text-generation", model=dir)` work for our checkpoints without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nanogpt import NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM, NanoGPTModel

__version__ = "0.1.0"

AutoConfig.register("nanogpt", NanoGPTConfig, exist_ok=True)
AutoModel.register(NanoGPTConfig, NanoGPTModel, exist_ok=True)
AutoModelForCausalLM.register(NanoGPTConfig, NanoGPTForCausalLM, exist_ok=True)
# save_pretrained copies the two model files and writes auto_map, so checkpoints also load without this package
NanoGPTConfig.register_for_auto_class()
NanoGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["NanoGPTConfig", "NanoGPTForCausalLM", "NanoGPTModel", "__version__"]
