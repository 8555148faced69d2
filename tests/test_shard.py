"""model.shard=true: FSDP over 2 gloo processes on the CPU trains what one unsharded process does,
its checkpoints resume unsharded and the other way round, evaluate.py reads its adapter, and what
sharding cannot do is refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from qlora.batching import collate
from qlora.checkpoint import list_checkpoints
from qlora.logs import read_metrics
from qlora.loop import micro_batch_loss
from qlora.shard import shard
from tests.conftest import REFERENCE, TINY_YAML
from tests.test_distributed import WAIT_S, torchrun
from tests.test_loop import lora_grads, make_rows

SHARDABLE = ["train.precision=bf16", "train.optimizer=adamw", "model.upcast_non_quantized=false",
             "train.max_steps=6", "train.save_every=3", "train.max_grad_norm=1e9"]
"""The tiny reference job as sharding runs it: bf16, bf16 norms (and torch's AdamW). Nothing clipped:
the clip scales every gradient by max_norm / norm, and the ranks' gradients are sums in another
order, whose norm differs in its last bit, which bf16 training grows to a 0.1% gap in 6 steps."""
CLOSE = 1e-5
"""Relative gap allowed between sharded and unsharded runs: the same sums in another order. A mean
instead of a sum of the ranks' gradients would halve the gradient norms."""


@pytest.fixture(scope="module")
def unsharded(reference_run, tmp_path_factory):
    """The job in one process, unsharded: (run dir, random-init cache)."""
    _, cache = reference_run
    out = tmp_path_factory.mktemp("unsharded") / "run"
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, *SHARDABLE, f"train.output_dir={out}",
                       f"model.random_init_cache={cache}"]) == 0
    return out, cache


def adapter_gap(run: Path, reference: Path) -> float:
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (run, reference))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def sharded(out: Path, cache: Path, *extra: str) -> str:
    proc = torchrun(out, cache, *SHARDABLE, "model.shard=true", *extra)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 0, output[-3000:]
    return output


def test_sharded_run_trains_what_one_process_does_and_resumes_either_way(unsharded, tmp_path, capsys):
    one, cache = unsharded
    two = tmp_path / "two"
    sharded(two, cache)
    losses, norms = ([[line[k] for line in read_metrics(d / "metrics.jsonl")] for d in (two, one)]
                     for k in ("loss", "grad_norm"))
    assert losses[0] == pytest.approx(losses[1], rel=CLOSE) and norms[0] == pytest.approx(norms[1], rel=CLOSE)
    assert adapter_gap(two, one) < CLOSE
    base = [json.loads((d / "memory.json").read_text())["bytes"]["base_weights"] for d in (two, one)]
    assert base[0] < 0.6 * base[1]  # rank 0 holds half the frozen weights (and all their quantization constants)
    # the checkpoint holds the optimizer state in the unsharded layout
    ours, theirs = (torch.load(list_checkpoints(d)[-1] / "optimizer.pt", weights_only=True) for d in (two, one))
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    assert all(float((ours["state"][i][k] - v).norm() / v.norm()) < CLOSE
               for i, s in theirs["state"].items() for k, v in s.items())
    # a sharded checkpoint resumed by one unsharded process ...
    resumed = tmp_path / "resumed"
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, *SHARDABLE, f"train.output_dir={resumed}",
                       f"model.random_init_cache={cache}", "--resume-from", str(list_checkpoints(two)[0])]) == 0
    assert "resume: allowed change model.shard: True -> False" in capsys.readouterr().out
    assert adapter_gap(resumed, one) < CLOSE
    # ... and an unsharded one by two sharded processes
    again = tmp_path / "again"
    output = sharded(again, cache, "--resume-from", str(list_checkpoints(one)[0]))
    assert "resume: allowed change model.shard: False -> True" in output
    assert adapter_gap(again, one) < CLOSE
    # evaluate.py reads the sharded run's adapter as any other
    assert evaluate.main(["--config", str(TINY_YAML), f"model.random_init_cache={cache}", "--adapter",
                          str(two / "final"), "--out", str(tmp_path / "eval"), "--limit", "4"]) == 0


def test_ranks_with_unequal_shares_and_the_8bit_optimizer(reference_run, tmp_path):
    """3 micro-batches a step on 2 ranks: the rank with 1 runs an idle one too, or FSDP's gathers of
    the second forward would wait for it forever. With the paged 8-bit optimizer on the whole
    adapters."""
    _, cache = reference_run
    uneven = ["train.grad_accum=3", "train.max_steps=3", "train.optimizer=paged_adamw_8bit"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, *SHARDABLE, *uneven, f"train.output_dir={one}",
                       f"model.random_init_cache={cache}"]) == 0
    sharded(two, cache, *uneven)
    losses = [[line["loss"] for line in read_metrics(d / "metrics.jsonl")] for d in (two, one)]
    assert losses[0] == pytest.approx(losses[1], rel=CLOSE) and adapter_gap(two, one) < CLOSE


def test_compiled_layers_run_whole_inside_fsdp_units(tiny_model_factory):
    """Compiled decoder layers inside FSDP's units (one gloo rank in this process, which FSDP runs
    unsharded: the gathers are the 2-rank tests', uncompiled, and the GPU runs') are traced whole,
    no graph break (each would leave a layer eager: FSDP's use_orig_params=False, an adapter unit
    inside a layer, bitsandbytes rebuilding a Params4bit around a gathered weight), and give the
    eager sharded model's loss and adapter gradients (fp32, so that fusion changes no rounding)."""
    batch = collate(make_rows([30, 17, 22], [5, 3, 8], seed=6), 0)

    def loss_and_grads(compile_layers):
        model = shard(tiny_model_factory("fp32", compile_layers=compile_layers, shard=True), torch.device("cpu"))
        loss = micro_batch_loss(model, batch, "fp32", torch.device("cpu"), True)
        loss.backward()
        return loss.detach(), lora_grads(model)

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        loss_a, grads_a = loss_and_grads(False)
        torch._dynamo.reset()  # compiled here, not by an earlier test
        counters = torch._dynamo.utils.counters
        counters.clear()
        loss_b, grads_b = loss_and_grads(True)
        assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"] and not counters["unimplemented"]
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        assert (grads_b[name] - grads_a[name]).abs().max() <= 1e-4 * grads_a[name].abs().max()


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp16", "model.shard=true: needs train.precision=bf16"),
    ("model.upcast_non_quantized=true", "model.shard=true: needs model.upcast_non_quantized=false"),
    ("", "model.shard=true splits the model over torchrun's processes"),
])
def test_what_sharding_cannot_do_is_refused_in_one_line(tmp_path, capsys, override, message):
    args = ["--config", str(TINY_YAML), *SHARDABLE, "model.shard=true", *filter(None, [override]),
            f"train.output_dir={tmp_path}", "--dry-run"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
