import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora.config import config_from_dict, key_fields, load_config, peak_lowering_hints, resume_safe_keys
from qlora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
model: {name: m}
data: {source: d.json}
train: {output_dir: out}
"""


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-4", "lora.target_modules=[q_proj]",
                                              "data.limit=20", "train.max_steps=null"])
    assert cfg.train.lr == 1e-4 and cfg.lora.target_modules == ("q_proj",)
    assert cfg.data.limit == 20 and cfg.train.max_steps is None
    assert cfg.train.precision == "fp16" and cfg.lora.r == 16


def test_frozen(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", "train.learning_rate: unknown key (allowed: output_dir, seed"),
    ("train.batch_size=four", "train.batch_size: expected int, got 'four'"),
    ("train.batch_size=true", "train.batch_size: expected int"),
    ("train.precision=fp8", "train.precision: 'fp8' is not allowed (allowed: fp16, bf16, fp32)"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: must be in [0, 1) (warmup cannot be as long as training)"),
    ("lora.dropout=1", "lora.dropout: must be in [0, 1)"),
    ("optim.lr=1", "optim: unknown section"),
    ("trainlr=1", "must look like section.key=value"),
    ("train.lr=inf", "train.lr: must be a finite number, got inf"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm: must be a finite number"),
    ("model.gradient_checkpointing=false", "model.gradient_checkpointing: renamed to model.recompute_activations"),
    ("log.progress=false", "log.progress: renamed to train.progress_bar"),
    ("model.load_in_4bit=false", "model.load_in_4bit: removed"),
    ("train.memory_budget_gib=lots", "train.memory_budget_gib: expected a number or auto or null, got 'lots'"),
    ("train.memory_budget_gib=-1", "train.memory_budget_gib: must be > 0, auto or null"),
    ("train.memory_cap_gib=0", "train.memory_cap_gib: must be > 0 or null"),
])
def test_errors_name_the_key_and_what_is_allowed(tmp_path, override, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(e.value)


def test_offloading_and_lean_layers_are_refused_without_what_they_build_on(tmp_path):
    for overrides, message in ((["model.recompute_layers=6", "model.offload_layers=3"],
                                "model.offload_layers: at most a third of model.recompute_layers"),
                               (["model.recompute_activations=false", "model.offload_layers=1"],
                                "needs model.recompute_activations=true"),
                               (["model.recompute_activations=false", "model.offload_inputs=true"],
                                "model.offload_inputs: offloads the recomputing layers' inputs; needs"),
                               (["model.recompute_reentrant=true", "model.offload_inputs=true"],
                                "model.offload_inputs: needs model.recompute_reentrant=false"),
                               (["model.compile_layers=false", "model.lean_layers=true"],
                                "model.lean_layers: the compiler plans what lean layers save; needs"),
                               (["model.shard=true", "model.lean_layers=true", "model.compile_layers=true"],
                                "model.shard=true: needs model.lean_layers=false")):
        with pytest.raises(UserError, match=message):
            load_config(write(tmp_path, BASE), overrides)
    assert load_config(write(tmp_path, BASE), ["model.recompute_layers=6", "model.offload_layers=2"])


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model: {}\ndata: {source: x, colour: red}\ntrain: {output_dir: o, epochs: 0}"))
    text = str(e.value)
    assert "model.name: required" in text and "data.colour: unknown key" in text
    assert "\n" not in text


def test_range_checks_after_types(tmp_path):
    with pytest.raises(UserError, match="train.epochs: must be >= 1"):
        load_config(write(tmp_path, BASE), ["train.epochs=0"])


def test_yaml_errors_name_the_line_and_column(tmp_path):
    with pytest.raises(UserError, match=r"is not valid YAML at line 3, column 1"):
        load_config(write(tmp_path, "model: {name: m}\ndata: {source: d.json}\n\tbad: [\ntrain: {}"))


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(ROOT / "configs" / name)
    again = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert config_from_dict(again) == cfg


def test_each_key_carries_its_facts():
    """A key's doc, whether it may change on resume and whether it lowers the peak live on its
    field; the resume check, the OOM message and `python -m qlora.config` all read them there."""
    fields = key_fields()
    assert all(f.metadata["doc"] for f in fields.values())
    safe = resume_safe_keys()
    assert {"train.output_dir", "train.progress_bar", "model.recompute_layers", "data.packing",
            "model.compile_layers", "eval.batch_size"} <= safe
    assert not {"lora.r", "train.lr", "data.max_length", "train.seed", "data.group_by_length"} & safe
    hints = peak_lowering_hints()
    assert "train.batch_size lower" in hints and "model.recompute_activations=true" in hints
    # a config's own settings: only the keys it has not already turned
    shipped = load_config(ROOT / "configs" / "llama2-7b-korquad.yaml", ["model.dequantized_layers=4"])
    turned = peak_lowering_hints(cfg=shipped)
    assert "train.batch_size lower" in turned and "model.dequantized_layers=0" in turned
    assert not any(f"{k}=" in turned for k in ("model.recompute_activations", "model.recompute_layers",
                                                 "model.upcast_non_quantized", "train.optimizer"))
    listing = subprocess.run([sys.executable, "-m", "qlora.config"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stdout
    assert all(f"{name}:" in listing for name in fields)
    assert "train.output_dir: (required)  [may change on resume]" in listing


def test_tutorial_config_is_the_tutorial():
    cfg = load_config(ROOT / "configs" / "tutorial.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (4, 4, 2e-4)
    assert (cfg.train.epochs, cfg.train.warmup_ratio, cfg.train.precision) == (100, 0.03, "fp16")
    assert (cfg.train.optimizer, cfg.data.max_length, cfg.data.limit) == ("paged_adamw_8bit", 512, 20)
    assert cfg.data.format == "closed_book" and cfg.model.quant_type == "nf4" and cfg.model.double_quant


def test_varlen_attention_needs_half_precision_on_a_gpu(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(UserError, match="varlen: flash attention needs train.precision bf16 or fp16"):
        load_config(path, ["model.attn_implementation=varlen", "train.precision=fp32"])
    cfg = load_config(path, ["model.attn_implementation=varlen", "train.precision=fp32", "train.device=cpu"])
    assert cfg.model.attn_implementation == "varlen"  # the CPU runs it as one SDPA call per sequence
