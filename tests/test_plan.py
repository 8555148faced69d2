"""The memory plan (qlora/plan.py): the fastest recompute setting the estimate says fits
train.memory_budget_gib (a number, or `auto` from the GPU's free memory), explicit values winning,
and a refusal that names the smallest budget."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import train
from qlora.config import check_values, given_keys, load_config
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB, cap_memory
from qlora.model import build_model, decoder_layers, read_architecture
from qlora.offload import offloaded_layers
from qlora.plan import (EAGER, OFFLOAD_EVERY, Budget, auto_budget_gib, candidates, choose, format_plans, resolve_budget,
                        row_lengths)
from tests.conftest import ROOT, TINY_YAML

LLAMA2 = ROOT / "configs" / "llama2-7b-korquad.yaml"
BUDGETS = (9, 12, 16, 24, 80)
KEPT = "model.lean_layers=false"  # the config's own value: lean layers not planned


def plan_for(budget, *overrides, path=LLAMA2, seq=2048, gpu=False):
    items = [f"train.memory_budget_gib={budget}", *overrides]
    cfg = load_config(path, items)
    arch = read_architecture(cfg.model)
    return choose(cfg, arch, seq, given_keys(path, items), resolve_budget(cfg), gpu=gpu), arch


@pytest.mark.parametrize("budget", BUDGETS)
def test_the_plan_is_the_fastest_candidate_within_the_budget(budget):
    choice, arch = plan_for(budget)
    assert estimate_for_config(choice.config, arch, 2048)["total"] <= budget * GIB
    assert all(p.peak_bytes > budget * GIB for p in choice.plans if p.speed > choice.chosen.speed)
    for lean in (False, True):  # each of kept and lean: fewer recomputed layers, faster
        speeds = [p.speed for p in choice.plans if p.lean == lean]
        assert speeds == sorted(speeds, reverse=True)
    half = next(p for p in choice.plans if p.recomputed == arch.num_hidden_layers // 2)
    assert choice.plans[0].peak_bytes > half.peak_bytes > choice.plans[-1].peak_bytes


@pytest.mark.parametrize("gpu", [False, True])
def test_a_larger_budget_never_plans_a_slower_step(gpu):
    """Each recompute count is priced with the offloaded and dequantized layers the memory it leaves
    buys: a count that recomputes one more layer may offload one more and come out faster."""
    speeds = [plan_for(budget / 2, gpu=gpu)[0].chosen.speed for budget in range(16, 100, 3)]
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]
    choice, _ = plan_for(80, gpu=gpu)  # the whole card: nothing recomputed
    assert choice.chosen.recomputed == 0 and not choice.config.model.recompute_activations


def test_memory_left_beside_the_fastest_recompute_plan_goes_to_dequantized_layers():
    """One more dequantized layer than planned would not fit; the whole card dequantizes every
    layer; a config's own count wins; a sharded model dequantizes none."""
    for budget in BUDGETS:
        choice, arch = plan_for(budget)
        chosen = choice.chosen
        assert choice.config.model.dequantized_layers == chosen.dequantized
        if chosen.dequantized < chosen.layers:
            more = dataclasses.replace(chosen, dequantized=chosen.dequantized + 1)
            assert estimate_for_config(more.apply(choice.config), arch, 2048)["total"] > budget * GIB
    whole, _ = plan_for(80)
    assert (whole.chosen.recomputed, whole.chosen.dequantized) == (0, 32)
    assert "recompute 0 of 32 layers, 32 dequantized" in format_plans(whole.plans, whole.chosen, Budget(80, False))
    own, _ = plan_for(80, "model.dequantized_layers=4")
    assert own.chosen.dequantized == 0 and own.config.model.dequantized_layers == 4
    sharded, _ = plan_for(80, "model.shard=true")
    assert sharded.config.model.dequantized_layers == 0


def test_on_a_gpu_one_recomputing_layer_in_six_offloads_instead_and_the_inputs_go_to_the_host():
    """The same layers keep no activations on the GPU, at the same estimated peak; with the
    recomputing layers' inputs in host memory too, fewer layers recompute; a config's own settings
    win, and a run on the CPU offloads nothing. (Kept layers, not lean: with lean ones the plan
    for 16 GiB recomputes nothing.)"""
    on_cpu = plan_for(16, KEPT)[0].chosen
    kept, arch = plan_for(16, KEPT, "model.offload_inputs=false", gpu=True)
    chosen = kept.chosen
    assert chosen.offloaded == chosen.recomputed // OFFLOAD_EVERY > 0 and on_cpu.offloaded == 0
    assert kept.config.model.offload_layers == chosen.offloaded and not kept.config.model.offload_inputs
    assert dataclasses.replace(chosen, offloaded=0) == on_cpu and chosen.speed > on_cpu.speed
    assert estimate_for_config(kept.config, arch, 2048)["total"] == chosen.peak_bytes == on_cpu.peak_bytes
    assert f"recompute {chosen.recomputed} of 32 layers ({chosen.offloaded} of them offload instead)" in chosen.describe()
    on_gpu = plan_for(16, KEPT, gpu=True)[0]  # the memory the inputs leave goes to dequantized layers
    assert on_gpu.chosen.inputs and on_gpu.config.model.offload_inputs and not on_cpu.inputs
    assert on_gpu.chosen.speed > chosen.speed and on_gpu.chosen.peak_bytes <= 16 * GIB
    assert "24 of 32 layers (inputs in host memory, 4 of them offload instead), 7 dequantized" in on_gpu.chosen.describe()
    own, _ = plan_for(16, KEPT, "model.offload_layers=0", gpu=True)
    assert own.chosen.offloaded == 0 and own.config.model.offload_layers == 0
    for budget in BUDGETS:  # where offloading adds to the peak (few layers kept), only if it fits
        choice, _ = plan_for(budget, KEPT, gpu=True)
        assert estimate_for_config(choice.config, arch, 2048)["total"] == choice.chosen.peak_bytes <= budget * GIB
    # recompute 30 (2 kept) leaves no room for the layer offloading brings back early; 31 does, and
    # with 5 of them offloading it is the faster plan
    few, _ = plan_for(9, KEPT, "model.offload_inputs=false", gpu=True)
    assert (few.chosen.recomputed, few.chosen.offloaded) == (31, 5)
    assert [p.recomputed for p in few.plans if p.peak_bytes <= 9 * GIB][0] == 30
    cfg = load_config(LLAMA2, ["train.memory_budget_gib=16", KEPT])
    arch = read_architecture(cfg.model)
    torchrun = choose(cfg, arch, 2048, set(), Budget(16, False), ranks=2, gpu=True).chosen
    assert torchrun.offloaded == 0 and not torchrun.inputs
    many, _ = plan_for(16, KEPT, "model.offload_layers=20", gpu=True)  # the config's own count, as many as 24 allow
    assert (many.chosen.recomputed, many.chosen.offloaded, many.config.model.offload_layers) == (24, 8, 8)
    assert not check_values(many.config)


def test_lean_layers_are_planned_where_they_are_faster_and_a_config_s_own_value_wins():
    """With compiled layers, 16 GiB: every layer lean beats recomputing 24 kept ones (and offloading
    4 of them); the whole card keeps every layer; the config's own model.lean_layers, uncompiled
    layers, flex attention, offloading, torchrun and other families than Llama leave them unplanned."""
    lean, _ = plan_for(16, gpu=True)
    assert lean.chosen.lean and lean.chosen.recomputed == 0 and lean.config.model.lean_layers
    assert "recompute 0 of 32 layers, the rest lean" in lean.chosen.describe()
    kept, _ = plan_for(16, KEPT, gpu=True)
    assert kept.chosen.recomputed == 24 and lean.chosen.speed > kept.chosen.speed
    assert not kept.config.model.lean_layers and not any(p.lean for p in kept.plans)
    assert not plan_for(80, gpu=True)[0].chosen.lean
    for budget in (12, 13):  # lean layers beside offloaded layers or inputs: not measured, not planned
        small, _ = plan_for(budget, gpu=True)
        assert any(p.lean for p in small.plans) and not (small.chosen.lean and small.chosen.offloaded)
        assert not any(p.lean and p.inputs for p in small.plans)
    assert plan_for(13, gpu=True)[0].chosen.lean
    for own_offload in ("model.offload_layers=2", "model.offload_inputs=true"):  # the config's own
        assert not any(p.lean for p in plan_for(13, own_offload, gpu=True)[0].plans)
    cfg = load_config(LLAMA2, ["train.memory_budget_gib=16"])  # measured in one process only
    assert not choose(cfg, read_architecture(cfg.model), 2048, set(), Budget(16, False), ranks=2).chosen.lean
    qwen, _ = plan_for(16, path=ROOT / "configs" / "qwen2.5-7b-korquad.yaml")  # measured on Llama only
    assert not any(p.lean for p in qwen.plans)
    assert not any(p.lean for p in plan_for(16, "model.compile_layers=false")[0].plans)
    flex, _ = plan_for(16, path=ROOT / "configs" / "gemma2-9b-korquad.yaml")  # flex attention: not tried
    assert flex.config.model.attn_implementation == "flex" and not any(p.lean for p in flex.plans)
    own = plan_for(16, "model.lean_layers=true")[0]
    assert all(p.lean for p in own.plans) and own.config.model.lean_layers


def test_offloaded_layers_are_spread_below_the_last_layer_three_apart_or_more():
    assert offloaded_layers(24, 32, 4) == [3, 9, 15, 21]
    for layers in range(2, 40):
        for recomputed in range(1, layers + 1):
            for n in range(1, min(recomputed, layers - 1) // 3 + 1):
                picked = offloaded_layers(recomputed, layers, n)
                assert len(picked) == n and picked[-1] < min(recomputed, layers - 1)
                assert all(b - a >= 3 for a, b in zip(picked, picked[1:]))
    with pytest.raises(UserError, match="at most a third of the recomputing layers below the last"):
        offloaded_layers(32, 32, 11)
    cfg = load_config(LLAMA2, ["model.offload_layers=32"])  # the estimate refuses too (before any model loads)
    with pytest.raises(UserError, match="at most a third"):
        estimate_for_config(cfg, read_architecture(cfg.model), 2048)


def test_the_planned_layers_are_the_ones_that_recompute(tmp_path):
    """The tiny model: a budget between the estimates of 1 and 0 recomputed layers of 2 plans 1, and
    the built model recomputes its first layer only."""
    cfg = load_config(TINY_YAML, [f"model.random_init_cache={tmp_path}"])
    plans = candidates(cfg, read_architecture(cfg.model), 128)
    assert [p.recomputed for p in plans] == [0, 1, 2] and plans[0].peak_bytes > plans[1].peak_bytes
    budget = (plans[0].peak_bytes + plans[1].peak_bytes) / 2 / GIB
    items = [f"model.random_init_cache={tmp_path}", f"train.memory_budget_gib={budget}"]
    choice = choose(load_config(TINY_YAML, items), read_architecture(cfg.model), 128,
                    given_keys(TINY_YAML, items), Budget(budget, automatic=False))
    planned, chosen = choice.config, choice.chosen
    assert chosen.recomputed == 1 and planned.model.recompute_layers == 1
    model = build_model(planned.model, planned.lora, "fp32", torch.device("cpu"), 0)
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False]


def test_no_plan_fits_names_the_smallest_budget_and_eager_attention_is_not_planned():
    with pytest.raises(UserError, match=r"no plan fits; the smallest plan \(recompute 31 of 32 layers, the rest "
                                         r"lean, rows of 2048 tokens\) needs [0-9.]+ GiB\. Also lowers the peak: "
                                         r"data.max_length lower, train.batch_size lower"):  # the config's own levers are on
        plan_for(2)
    with pytest.raises(UserError, match="does not price eager attention"):
        plan_for(13, "model.attn_implementation=eager", path=ROOT / "configs" / "gemma2-9b-korquad.yaml")


def test_explicit_recompute_settings_win_and_the_run_says_so(tmp_path, capsys):
    choice, _ = plan_for(40, "model.recompute_layers=8")
    assert choice.chosen is None and choice.config.model.recompute_layers == 8
    assert choice.reason == "the config sets model.recompute_layers itself"
    shorter, _ = plan_for(16, "model.recompute_layers=8")  # its rows do not fit: they shorten, its recompute stays
    assert shorter.chosen.recomputed == 8 and shorter.config.model.recompute_layers == 8
    assert shorter.chosen.rows < 8192 and shorter.config.data.pack_length == shorter.chosen.rows
    assert all(p.recomputed == 8 for p in shorter.plans)  # the longer rows: over the budget
    assert all(p.peak_bytes > 16 * GIB for p in shorter.plans if p.rows != shorter.chosen.rows)
    # on a GPU too: its rows fit only with the inputs in host memory, which it does not set, so they shorten
    on_gpu, _ = plan_for(15, "model.recompute_layers=24", gpu=True)
    assert not any(p.inputs for p in on_gpu.plans) and not on_gpu.config.model.offload_inputs
    assert on_gpu.chosen.rows < 8192 and plan_for(15, "model.recompute_layers=24", "model.offload_inputs=true",
                                                  gpu=True)[0].chosen is None  # fits at its rows with them
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


def test_train_plans_shorter_rows_where_its_own_do_not_fit(tmp_path, capsys):
    """The tiny job packed (rows of 4 x 128 tokens): a budget under every recompute setting of those
    rows but over one of half of them plans rows of 256, and the run says so."""
    items = ["data.packing=true", f"train.output_dir={tmp_path / 'run'}"]
    cfg = load_config(TINY_YAML, items)
    arch = read_architecture(cfg.model)
    full, half = candidates(cfg, arch, 128), candidates(cfg, arch, 128, rows=256)
    budget = (min(p.peak_bytes for p in full) + min(p.peak_bytes for p in half)) / 2 / GIB
    assert train.main(["--config", str(TINY_YAML), *items, f"train.memory_budget_gib={budget}", "--dry-run"]) == 0
    assert ", rows of 256 tokens, 2 dequantized, estimated peak" in capsys.readouterr().out  # the tiny weights are small


def test_auto_plans_for_this_ranks_free_gpu_memory_less_a_margin(monkeypatch):
    auto_cfg = load_config(LLAMA2, ["train.memory_budget_gib=auto"])
    assert load_config(LLAMA2).train.memory_budget_gib == "auto"  # the default
    assert auto_budget_gib(int(14.3 * GIB)) == pytest.approx(13.16)  # a 16 GB card: 8% left
    assert auto_budget_gib(int(8 * GIB)) == pytest.approx(7.0)  # at least 1 GiB left
    assert auto_budget_gib(int(14.3 * GIB), ranks=2) == pytest.approx(11.91)  # and NCCL's buffers under torchrun
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_budget(auto_cfg) is None  # the CPU plans nothing
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: asked.append(i) or (int(14.3 * GIB), 16 * GIB))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_budget(auto_cfg) == Budget(11.91, automatic=True) and asked == [torch.device("cuda", 1)]  # rank 1 asks its own GPU
    capped = load_config(LLAMA2, ["train.memory_cap_gib=10"])  # an H200 acting as a smaller card
    assert resolve_budget(capped) == Budget(auto_budget_gib(10 * GIB), automatic=True,  # NCCL is outside the cap
                                            limit="train.memory_cap_gib=10")
    roomy = load_config(LLAMA2, ["train.memory_cap_gib=14"])  # more than the free memory leaves
    assert resolve_budget(roomy) == Budget(11.91, automatic=True)
    assert resolve_budget(load_config(LLAMA2, ["train.memory_budget_gib=null"])) is None
    assert resolve_budget(load_config(LLAMA2, ["train.memory_budget_gib=13"])) == Budget(13, automatic=False)


def test_auto_goes_on_unplanned_where_a_number_is_refused():
    cfg = load_config(LLAMA2)
    gemma = load_config(ROOT / "configs" / "gemma2-9b-korquad.yaml", ["model.attn_implementation=eager"])
    arch = read_architecture(cfg.model)
    nothing = choose(cfg, arch, 2048, set(), Budget(-0.5, automatic=True))  # under 1 GiB was free
    assert nothing.chosen is None and "nothing fits the free GPU memory" in nothing.reason
    assert nothing.config.data.pack_length == 2048 and nothing.config.model.recompute_activations  # the least
    eager = choose(gemma, read_architecture(gemma.model), 2048, set(), Budget(13, automatic=True))
    assert eager.chosen is None and eager.config == gemma and eager.reason == EAGER
    with pytest.raises(UserError, match="does not price eager attention"):
        choose(gemma, read_architecture(gemma.model), 2048, set(), Budget(13, automatic=False))


SHARDED_70B = ["model.shard=true", "train.optimizer=adamw", "model.compile_layers=false",
               "model.arch=configs/models/llama-2-70b"]


def test_a_sharded_70b_capped_at_24_gib_plans_shorter_rows_with_every_layer_recomputed():
    """The 7B job as Llama-2-70B on 4 ranks: what bench/big_gpu.sh set by hand under
    train.memory_cap_gib=24 (data.pack_length=4096, measured 18.76-18.90 GiB allocated on rank 0) is
    what `auto` plans there; the config's rows where they fit; a refusal naming the smallest plan
    (rows of 2,048) where nothing does."""
    cfg = load_config(LLAMA2, SHARDED_70B)
    cap = "train.memory_cap_gib=24"
    arch, auto = read_architecture(cfg.model), Budget(auto_budget_gib(24 * GIB), automatic=True, limit=cap)
    assert row_lengths(cfg, set()) == [None, 4096, 2048]
    choice = choose(cfg, arch, 2048, set(), auto, ranks=4)
    assert choice.chosen.rows == 4096 and choice.config.data.pack_length == 4096
    assert choice.chosen.recomputed == arch.num_hidden_layers and choice.config.model.recompute_activations
    assert [p.rows for p in choice.plans] == [None, 4096]  # every layer recomputed: one plan per row length
    assert choice.plans[0].peak_bytes > auto.gib * GIB >= choice.chosen.peak_bytes
    assert choose(cfg, arch, 2048, set(), Budget(30, automatic=False), ranks=4).chosen.rows is None
    with pytest.raises(UserError, match=r"no plan fits; the smallest plan \(recompute 80 of 80 layers, rows of 2048 "
                                        r"tokens\) needs 16.48 GiB"):
        choose(cfg, arch, 2048, set(), Budget(12, automatic=False), ranks=4)
    on_two = choose(cfg, arch, 2048, set(), auto, ranks=2)
    assert on_two.chosen is None and f"nothing fits {cap}" in on_two.reason  # 70B needs 4 such cards


def test_rows_shorten_only_where_no_recompute_setting_fits_and_a_set_row_length_stays():
    cfg = load_config(LLAMA2)
    arch = read_architecture(cfg.model)
    config_rows = candidates(cfg, arch, 2048, leans=(False, True))
    budget = min(p.peak_bytes for p in config_rows) / GIB - 0.01  # just under the least at the config's rows
    choice = choose(cfg, arch, 2048, set(), Budget(budget, automatic=False))
    assert choice.chosen.rows == 4096 and choice.config.data.pack_length == 4096
    shorter = [p for p in choice.plans if p.rows == 4096]
    assert choice.chosen == next(p for p in shorter if p.peak_bytes <= budget * GIB)  # the fastest there
    assert choice.chosen.recomputed < arch.num_hidden_layers  # shorter rows leave room to recompute fewer
    given = {"data.pack_length"}
    assert row_lengths(cfg, given) == [None]
    with pytest.raises(UserError, match="no plan fits"):
        choose(cfg, arch, 2048, given, Budget(budget, automatic=False))


def test_a_memory_cap_is_refused_off_cuda_and_above_it_no_budget(tmp_path, capsys):
    common = ["--config", str(TINY_YAML), f"train.output_dir={tmp_path}", "--dry-run"]
    assert train.main([*common, "train.memory_cap_gib=8"]) == 2
    assert "train.memory_cap_gib=8 caps CUDA memory; this run is on the cpu" in capsys.readouterr().err
    assert train.main([*common, "train.memory_cap_gib=8", "train.memory_budget_gib=7.5"]) == 2
    assert "leaves no room under train.memory_cap_gib=8 for the allocator's slack: at most 7" in capsys.readouterr().err


def test_a_memory_cap_bounds_the_allocator_by_its_share_of_the_gpu(monkeypatch):
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: fractions.append((f, d)))
    cap_memory(torch.device("cuda", 1), 24)
    cap_memory(torch.device("cuda", 1), 100)  # more than the GPU has: no cap
    assert fractions == [(0.3, torch.device("cuda", 1)), (1.0, torch.device("cuda", 1))]
