"""model.random_init (qlora/random_init.py): a random model written one layer at a time, as bf16 or as
a pre-quantized 4-bit checkpoint (sharded runs), the same weights either way and on every run."""

import filecmp
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.config import ModelConfig
from qlora.families import FAMILIES
from qlora.model import quant_config, read_architecture
from qlora.random_init import cached_random_model, module_groups, quantized_linears
from tests.conftest import ROOT

CPU = torch.device("cpu")


def model_config(families, name):
    return ModelConfig(name=str(families[name][0]), shard=True, upcast_non_quantized=False)


def load(path, quant):
    """The model, after checking that the checkpoint holds every weight it needs and no other."""
    model, info = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                       device_map={"": CPU}, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bfloat16 else t


@pytest.mark.parametrize("name", FAMILIES)
def test_the_4bit_form_loads_to_the_bytes_the_bf16_form_quantizes_to(families, name, tmp_path):
    """Every family (tied embeddings, biases, Gemma's norms): the pre-quantized checkpoint that a
    sharded run loads holds exactly what loading the bf16 form with the same 4-bit config makes."""
    cfg = model_config(families, name)
    arch, quant = read_architecture(cfg), quant_config(cfg, "bf16")
    four_bit = load(cached_random_model(arch, 0, CPU, str(tmp_path), quant, False), quant)
    on_load = load(cached_random_model(arch, 0, CPU, str(tmp_path), None, False), quant)
    ours, theirs = four_bit.state_dict(), on_load.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(as_bytes(ours[k]), as_bytes(theirs[k])) for k in theirs)
    ids = torch.randint(0, arch.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(four_bit(ids).logits, on_load(ids).logits)


def test_the_same_seed_writes_the_same_files_one_per_layer(families, tmp_path):
    cfg = model_config(families, "llama3")
    arch, quant = read_architecture(cfg), quant_config(cfg, "bf16")
    a, b = (cached_random_model(arch, 7, CPU, str(tmp_path / d), quant, False) for d in "ab")
    files = sorted(p.name for p in a.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert len(match) == len(files) and not mismatch and not errors
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == arch.num_hidden_layers + 1  # a file per layer, one for the rest
    other = cached_random_model(arch, 8, CPU, str(tmp_path / "c"), quant, False)
    assert not filecmp.cmp(a / "model-00001.safetensors", other / "model-00001.safetensors", shallow=False)


def test_llama2_70b_is_written_one_layer_of_1_7_gb_at_a_time():
    """The 70B's plan, from its config on the meta device: 81 groups (80 layers, then embeddings,
    norm and head), none above 1.75 GB of bf16 (the whole model is 138 GB), 7 Linear layers of
    each decoder layer quantized, the head not."""
    cfg = ModelConfig(name="70b", arch=str(ROOT / "configs" / "models" / "llama-2-70b"), shard=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_architecture(cfg), dtype=torch.bfloat16)
        quantized = quantized_linears(AutoModelForCausalLM.from_config(read_architecture(cfg)),
                                      quant_config(cfg, "bf16"))
    groups = module_groups(model)
    sizes = [sum(p.numel() * 2 for _, m in group for p in m.parameters(recurse=False)) for group in groups]
    assert len(groups) == 81 and max(sizes) < 1.75e9 and sum(sizes) > 137e9
    assert len(quantized) == 80 * 7 and "lm_head" not in quantized
