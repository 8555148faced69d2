"""bench/compare_trl.py runs our side on the CPU too: its levers, given as config overrides, reach
the loaded model, and its steps are train.py's train_step. A check that the GPU script works, not
a measurement."""

import importlib.util

import pytest

from tests.conftest import ROOT, TINY_YAML


@pytest.fixture(scope="module")
def compare_trl():
    spec = importlib.util.spec_from_file_location("compare_trl", ROOT / "bench" / "compare_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_lever_reaches_the_model_and_the_step_runs(compare_trl, tiny_run):
    _, cache = tiny_run
    (row,) = compare_trl.run_ours(str(TINY_YAML), "extractive_1024",
                                  ["train.device=cpu", "train.precision=fp32", "data.max_length=128",
                                   f"model.random_init_cache={cache}"],
                                  steps=1, only_last=True, skip=("+compiled decoder layers",), budget=1)
    # then the memory plan for 1 GiB (on the CPU: recompute and dequantized layers only)
    assert row["variant"] == "+memory plan for 1 GiB: recompute 0 of 2 layers, 2 dequantized" and row["tokens_per_s"] > 0
    assert row["peak_allocated_gib"] is None  # CUDA's allocator only
    assert row["step0_loss_relative_to_sdpa"] < 1e-3  # varlen over packed rows against SDPA, fp32


def test_a_value_the_architecture_refuses_becomes_the_nearest_it_allows(compare_trl):
    """Gemma-2 soft-caps its attention logits: TRL's side (and our plain variant) runs eager attention
    where the others run SDPA, and our varlen lever runs flex."""
    gemma = str(ROOT / "configs" / "gemma2-9b-korquad.yaml")
    plain = compare_trl.job_config(gemma, "extractive_2048", [], compare_trl.PLAIN)
    assert plain.model.attn_implementation == "eager" and not plain.data.packing
    every = compare_trl.with_every_lever(gemma, "extractive_2048", [])
    assert every.model.attn_implementation == "flex" and every.data.packing and every.model.compile_layers
    llama = compare_trl.with_every_lever(str(ROOT / "configs" / "llama3.1-8b-korquad.yaml"), "extractive_2048", [])
    assert llama.model.attn_implementation == "varlen"
    assert compare_trl.ran_instead(["model.attn_implementation=varlen", "data.packing=true"], every) == \
        " (ran model.attn_implementation=flex: the nearest this model allows)"  # the lever's name says so
    assert compare_trl.ran_instead(["model.attn_implementation=varlen"], llama) == ""
