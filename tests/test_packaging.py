"""Packaging and third-party tools: the installed package imports from any working directory; peft's LoRA."""

import subprocess
import sys

import pytest
import torch

import nanogpt_hf
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM


def test_import_from_a_folder_holding_a_nanogpt_hf_folder(tmp_path):
    # `git clone` names the clone nanogpt_hf: from its parent folder, that folder must not shadow the package
    (tmp_path / "nanogpt_hf").mkdir()
    code = "import nanogpt_hf; print(nanogpt_hf.__file__); print(nanogpt_hf.NanoGPTConfig.model_type)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [nanogpt_hf.__file__, "nanogpt"]


@pytest.mark.parametrize("targets", [["c_attn", "c_proj", "c_fc"], "all-linear"])
def test_peft_lora_wraps_the_model(targets):
    # the README's LoRA recipe: peft finds the model's Linear layers by these names
    from peft import LoraConfig, get_peft_model

    config = NanoGPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = get_peft_model(NanoGPTForCausalLM(config), LoraConfig(r=4, target_modules=targets))
    wrapped = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert len(wrapped) == 4 * config.n_layer  # attention c_attn and c_proj, MLP c_fc and c_proj; not lm_head
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)
