"""The memory plan (qlora/plan.py): the fastest recompute setting the estimate says fits
train.memory_budget_gib, explicit values winning, and a refusal that names the smallest budget."""

import pytest
import torch

import train
from qlora.config import given_keys, load_config
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB
from qlora.model import build_model, decoder_layers, read_architecture
from qlora.plan import candidates, choose
from tests.conftest import ROOT, TINY_YAML

LLAMA2 = ROOT / "configs" / "llama2-7b-korquad.yaml"
BUDGETS = (9, 12, 16, 24, 80)


def plan_for(budget, *overrides, path=LLAMA2, seq=2048):
    items = [f"train.memory_budget_gib={budget}", *overrides]
    cfg = load_config(path, items)
    arch = read_architecture(cfg.model)
    return choose(cfg, arch, seq, given_keys(path, items)), arch


@pytest.mark.parametrize("budget", BUDGETS)
def test_the_plan_is_the_fastest_candidate_within_the_budget(budget):
    (planned, plans, chosen), arch = plan_for(budget)
    assert estimate_for_config(planned, arch, 2048)["total"] <= budget * GIB
    assert all(p.peak_bytes > budget * GIB for p in plans if p.speed > chosen.speed)
    assert [p.speed for p in plans] == sorted((p.speed for p in plans), reverse=True)
    assert plans[0].peak_bytes > plans[arch.num_hidden_layers // 2].peak_bytes > plans[-1].peak_bytes


def test_a_larger_budget_never_plans_a_slower_step():
    speeds = [plan_for(b)[0][2].speed for b in BUDGETS]
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]
    (planned, _, chosen), _ = plan_for(80)  # the whole card: nothing recomputed
    assert chosen.recomputed == 0 and not planned.model.recompute_activations


def test_the_planned_layers_are_the_ones_that_recompute(tmp_path):
    """The tiny model: a budget between the estimates of 1 and 0 recomputed layers of 2 plans 1, and
    the built model recomputes its first layer only."""
    cfg = load_config(TINY_YAML, [f"model.random_init_cache={tmp_path}"])
    plans = candidates(cfg, read_architecture(cfg.model), 128)
    assert [p.recomputed for p in plans] == [0, 1, 2] and plans[0].peak_bytes > plans[1].peak_bytes
    budget = (plans[0].peak_bytes + plans[1].peak_bytes) / 2 / GIB
    items = [f"model.random_init_cache={tmp_path}", f"train.memory_budget_gib={budget}"]
    planned, _, chosen = choose(load_config(TINY_YAML, items), read_architecture(cfg.model), 128,
                                given_keys(TINY_YAML, items))
    assert chosen.recomputed == 1 and planned.model.recompute_layers == 1
    model = build_model(planned.model, planned.lora, "fp32", torch.device("cpu"), 0)
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False]


def test_no_plan_fits_names_the_smallest_budget_and_eager_attention_is_not_planned():
    with pytest.raises(UserError, match=r"no plan fits; the smallest \(recompute 32 of 32 layers\) needs [0-9.]+ GiB"
                                         r"\. Also lowers the peak: model.upcast_non_quantized=false, data.max_length"):
        plan_for(2)
    with pytest.raises(UserError, match="does not price eager attention"):
        plan_for(13, path=ROOT / "configs" / "gemma2-9b-korquad.yaml")


def test_explicit_recompute_settings_win_and_the_run_says_so(tmp_path, capsys):
    (planned, plans, chosen), _ = plan_for(16, "model.recompute_layers=8")
    assert chosen is None and planned.model.recompute_layers == 8
    common = ["--config", str(TINY_YAML), "--dry-run", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main([*common, "train.memory_budget_gib=0.0001", "model.recompute_activations=true"]) == 0
    assert ("memory plan: none, the config sets model.recompute_activations itself; estimated peak"
            in capsys.readouterr().out)


def test_train_prints_the_plan_and_the_candidates_and_data_commands_plan_nothing(tmp_path, capsys):
    common = ["--config", str(TINY_YAML), f"train.output_dir={tmp_path / 'run'}"]
    assert train.main([*common, "train.memory_budget_gib=0.5", "--estimate-memory", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: recompute 0 of 2 layers" in out and "<- chosen" in out
    assert train.main([*common, "train.memory_budget_gib=0.0001", "--dry-run"]) == 2
    assert "no plan fits" in capsys.readouterr().err
    assert train.main([*common, "train.memory_budget_gib=0.0001", "--inspect-data", "1", "--json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("[")
