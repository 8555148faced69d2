"""The memory plan (qlora/plan.py): the fastest recompute setting the estimate says fits
train.memory_budget_gib, explicit values winning, and a refusal that names the smallest budget."""

import pytest

import train
from qlora.config import given_keys, load_config
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB
from qlora.model import read_architecture
from qlora.plan import choose
from tests.conftest import ROOT, TINY_YAML

LLAMA2 = ROOT / "configs" / "llama2-7b-korquad.yaml"


def plan_for(budget, *overrides, seq=2048):
    items = [f"train.memory_budget_gib={budget}", *overrides]
    cfg = load_config(LLAMA2, items)
    arch = read_architecture(cfg.model)
    return choose(cfg, arch, seq, given_keys(LLAMA2, items)), arch


@pytest.mark.parametrize("budget", [9, 12, 16, 24, 80])
def test_the_plan_is_the_fastest_candidate_within_the_budget(budget):
    (planned, plans, chosen), arch = plan_for(budget)
    peak = estimate_for_config(planned, arch, 2048)["total"]
    assert peak == chosen.peak_bytes <= budget * GIB
    faster = [p for p in plans if p.speed > chosen.speed]
    assert all(p.peak_bytes > budget * GIB for p in faster)
    n = chosen.recompute_layers
    assert planned.model.recompute_activations == (n > 0)
    assert planned.model.recompute_layers == (None if n == arch.num_hidden_layers else (n or None))


def test_a_larger_budget_never_plans_a_slower_step():
    speeds = [plan_for(b)[0][2].speed for b in (9, 12, 16, 24, 80)]
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]
    assert plan_for(80)[0][2].recompute_layers == 0  # the whole card: nothing recomputed


def test_no_plan_fits_names_the_smallest_budget():
    with pytest.raises(UserError, match=r"no plan fits; the smallest \(every layer recomputed\) needs [0-9.]+ GiB"):
        plan_for(2)


def test_explicit_recompute_settings_win_and_no_budget_plans_nothing():
    (planned, plans, chosen), _ = plan_for(16, "model.recompute_layers=8")
    assert chosen is None and planned.model.recompute_layers == 8
    cfg = load_config(LLAMA2)
    assert choose(cfg, read_architecture(cfg.model), 2048, given_keys(LLAMA2)) == (cfg, [], None)


def test_train_prints_the_plan_and_the_candidates(tmp_path, capsys):
    code = train.main(["--config", str(TINY_YAML), "train.memory_budget_gib=0.5", "--estimate-memory", "--dry-run",
                       f"train.output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0 and "memory plan: recompute 0 of 2 layers" in out and "<- chosen" in out
    assert train.main(["--config", str(TINY_YAML), "train.memory_budget_gib=0.0001", "--dry-run"]) == 2
    assert "no plan fits" in capsys.readouterr().err
