"""nanogpt_hf: nanoGPT's clarity and speed as a native HuggingFace model.

Importing the package registers the model with the Auto classes (AutoModelForCausalLM, pipeline) for our checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nanogpt import NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM, NanoGPTModel

__version__ = "0.1.0"
__all__ = ["NanoGPTConfig", "NanoGPTForCausalLM", "NanoGPTModel", "__version__"]

AutoConfig.register("nanogpt", NanoGPTConfig, exist_ok=True)
AutoModel.register(NanoGPTConfig, NanoGPTModel, exist_ok=True)
AutoModelForCausalLM.register(NanoGPTConfig, NanoGPTForCausalLM, exist_ok=True)
# save_pretrained then copies the two model files and writes auto_map: checkpoints load without this package too
NanoGPTConfig.register_for_auto_class()
NanoGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
