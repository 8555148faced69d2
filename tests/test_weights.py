"""qlora/weights.py: a random model written one layer at a time, as bf16 or as a pre-quantized 4-bit
checkpoint (sharded runs), the same weights either way and on every run; and a real bf16 checkpoint
copied pre-quantized for a sharded run, loading to the bytes that quantizing it on load gives."""

import filecmp
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.config import ModelConfig
from qlora.errors import UserError
from qlora.families import FAMILIES
from qlora.model import base_weights, quant_config, read_architecture
from qlora.weights import cached_4bit_copy, cached_random_model, module_groups, quantized_linears
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


@pytest.mark.parametrize("name", FAMILIES)
def test_a_bf16_checkpoint_copied_4bit_loads_to_the_bytes_quantizing_it_on_load_gives(families, name, tmp_path):
    """A sharded run of a real checkpoint: save_pretrained's single file (and a sharded index, the
    random bf16 form), copied pre-quantized one tensor at a time, loads as the checkpoint would."""
    cfg = model_config(families, name)
    arch, quant = read_architecture(cfg), quant_config(cfg, "bf16")
    indexed = cached_random_model(arch, 0, CPU, str(tmp_path / "cache"), None, False)
    single = tmp_path / "single"
    load(indexed, None).save_pretrained(single)
    for source in (single, indexed):
        copy = cached_4bit_copy(str(source), arch, CPU, str(tmp_path / "copies"), quant, False)
        ours, theirs = load(copy, quant).state_dict(), load(source, quant).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(as_bytes(ours[k]), as_bytes(theirs[k])) for k in theirs)


def test_a_sharded_4bit_run_reads_a_copy_and_every_other_run_the_checkpoint(families, tmp_path):
    source = cached_random_model(read_architecture(model_config(families, "llama3")), 0, CPU, str(tmp_path), None,
                                 False)
    cfg = ModelConfig(name=str(source), shard=True, upcast_non_quantized=False, random_init_cache=str(tmp_path))
    copy = base_weights(cfg, "bf16", 0, CPU)
    assert copy != source and copy.parent == tmp_path
    assert json.loads((copy / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    assert base_weights(cfg, "bf16", 0, CPU, quantized=False) == str(source)  # merging reads the bf16 weights
    assert base_weights(ModelConfig(name=str(source)), "bf16", 0, CPU) == str(source)
    with pytest.raises(UserError, match="is quantized already"):
        base_weights(ModelConfig(name=str(copy), shard=True, upcast_non_quantized=False,
                                 random_init_cache=str(tmp_path)), "bf16", 0, CPU)


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
