"""torchrun with gloo on the CPU: two processes train exactly what one does (fp16 autocast, LoRA
dropout, 8-bit optimizer states), a checkpoint resumes on another number of processes, SIGTERM
saves, and a killed worker is restarted by torchrun and the run ends as the unbroken one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from qlora.checkpoint import list_checkpoints
from qlora.distributed import World, idle_batch, share, split_hint
from qlora.logs import read_metrics
from qlora.loop import accumulate_gradients
from qlora.memory import MemoryMeter
from tests.conftest import FIXTURE, REFERENCE, ROOT, TINY_YAML, assert_same_run

WAIT_S = 180  # the longest any test waits on torchrun


def torchrun(out: Path, cache: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a 2-core machine
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         f"--max-restarts={restarts}", "train.py", "--config", str(TINY_YAML), *REFERENCE,
         f"train.output_dir={out}", f"model.random_init_cache={cache}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(ready, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"gave up after {WAIT_S} s"
        time.sleep(0.005)


def workers(proc: subprocess.Popen) -> list[int]:
    """The pids torchrun started (its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:
            found.append(int(stat.parent.name))
    return found


def test_two_processes_train_what_one_does_and_resume_across_world_sizes(reference_run, tmp_path, capsys):
    reference, cache = reference_run
    two = tmp_path / "two"
    proc = torchrun(two, cache, "train.save_every=4", "train.keep_last=3")
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 0, output[-3000:]
    assert_same_run(two, reference)
    lines = read_metrics(two / "metrics.jsonl")
    assert {line["world_size"] for line in lines} == {2} and [r["rank"] for r in lines[0]["ranks"]] == [0, 1]
    assert output.count("done: step 12") == 1  # rank 0 alone prints: the summary ...
    assert output.count("data: tokens per example") == 1  # ... and the data report, made before the group forms
    # a checkpoint of 2 processes resumed by 1 ...
    one = tmp_path / "one"
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, f"train.output_dir={one}", f"model.random_init_cache={cache}",
                       "--resume-from", str(list_checkpoints(two)[0])]) == 0
    assert "resume: allowed change world size: 2 -> 1" in capsys.readouterr().out
    assert_same_run(one, reference)
    # ... and one of 1 process by 2
    again = tmp_path / "again"
    proc = torchrun(again, cache, "--resume-from", str(list_checkpoints(reference)[1]))
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 0 and "resume: allowed change world size: 1 -> 2" in output, output[-3000:]
    assert_same_run(again, reference)


@pytest.mark.parametrize("rows", [[], ["data.packing=true", "data.pack_rows_multiple=2"]], ids=["padded", "packed-even"])
def test_ranks_with_unequal_shares_still_train_what_one_process_does(reference_run, tmp_path, rows):
    """3 micro-batches a step on 2 ranks: one runs 2, the other 1. DDP must all-reduce once per
    step on each (at its last micro-batch), or the ranks' collectives no longer pair up. Packed
    rows made a multiple of 2 are the same rows in one process as in two."""
    _, cache = reference_run
    uneven = ["train.grad_accum=3", "train.max_steps=6", *rows]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, *uneven, f"train.output_dir={one}",
                       f"model.random_init_cache={cache}"]) == 0
    proc = torchrun(two, cache, *uneven)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 0 and "pack_rows_multiple=2 (or" not in output, output[-3000:]
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (one, two))
    assert max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a) < 1e-6  # sums in another order
    losses = [[line["loss"] for line in read_metrics(d / "metrics.jsonl")] for d in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_sigterm_to_torchrun_saves_one_checkpoint_and_resumes(reference_run, tmp_path):
    reference, cache = reference_run
    out = tmp_path / "run"
    proc = torchrun(out, cache)
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to every worker
    output = proc.communicate(timeout=WAIT_S)[0]
    assert "SIGTERM: stopped after step" in output and "resume with: torchrun --nproc-per-node=2" in output
    (checkpoint,) = list_checkpoints(out)
    assert not (out / "final").exists() and "ChildFailedError" not in output  # the workers exited 0
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, f"train.output_dir={out}",
                       f"model.random_init_cache={cache}", "--resume"]) == 0
    assert_same_run(out, reference)


def test_a_killed_worker_is_restarted_and_the_run_ends_as_the_unbroken_one(reference_run, tmp_path):
    reference, cache = reference_run
    out = tmp_path / "run"
    proc = torchrun(out, cache, "train.save_every=2", "train.keep_last=20", "--auto-resume", restarts=1)
    wait_until(lambda: (out / "checkpoints" / "step-00000004").exists(), proc)
    os.kill(max(workers(proc)), signal.SIGKILL)
    output = proc.communicate(timeout=WAIT_S)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "resume: from" in output  # the restarted workers continued from a checkpoint
    assert_same_run(out, reference)


def test_a_dead_worker_stops_the_job_at_once(reference_run, tmp_path):
    _, cache = reference_run
    out = tmp_path / "run"
    proc = torchrun(out, cache, "train.max_steps=100000", "train.save_every=2")
    wait_until(lambda: (out / "checkpoints" / "step-00000002").exists(), proc)
    os.kill(max(workers(proc)), signal.SIGKILL)
    output = proc.communicate(timeout=WAIT_S)[0]  # not a collective's 30-minute timeout
    assert proc.returncode != 0 and "exitcode  : -9" in output, output[-3000:]
    assert list_checkpoints(out)  # what was saved stays


def test_share_balances_tokens_and_an_idle_batch_adds_nothing(tiny_model_factory):
    batches = [{"n_tokens": n} for n in (50, 10, 40, 30)]
    shares = [share(batches, World(rank=r, size=2)) for r in (0, 1)]
    assert [[b["n_tokens"] for b in s] for s in shares] == [[50, 10], [40, 30]]  # 60 and 70 tokens
    assert share(batches[:1], World(rank=1, size=2))[0]["weight"] == 0  # nothing left for rank 1
    # sharded (even): 50 | 10, 40 gives rank 0 an idle micro-batch, so both run two
    uneven = [[(b["n_tokens"], b.get("weight", 1)) for b in share(batches[:3], World(rank=r, size=2), even=True)]
              for r in (0, 1)]
    assert uneven == [[(50, 1), (0, 0.0)], [(10, 1), (40, 1)]]
    assert len(share(batches[:3], World(rank=0, size=2))) == 1  # DDP: no padding
    model = tiny_model_factory("fp32")
    accumulate_gradients(model, [idle_batch()], torch.amp.GradScaler("cpu", enabled=False), "fp32",
                         torch.device("cpu"), True, MemoryMeter(torch.device("cpu")), window_tokens=7)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)  # it joins the all-reduce with zeros


def test_uneven_packed_rows_get_a_hint_on_many_ranks():
    assert split_hint(packing=True, rows_multiple=1, world=World(rank=0, size=2)) is not None
    assert split_hint(packing=True, rows_multiple=3, world=World(rank=0, size=2)) is not None
    assert "pack_rows_multiple=4" in split_hint(packing=True, rows_multiple=2, world=World(rank=0, size=4))
    for packing, multiple, size in ((True, 4, 2), (True, 1, 1), (False, 1, 2)):  # even, one process, padded
        assert split_hint(packing=packing, rows_multiple=multiple, world=World(rank=0, size=size)) is None


def two_machines(out: Path, cache: Path, extra: tuple[list[str], list[str]] = ([], [])) -> list[tuple[int, str]]:
    """Two torchrun agents on localhost, one process each, meeting at a c10d rendezvous, as two
    machines would; (exit code, output) of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-machines", "train.py",
         "--config", str(TINY_YAML), *REFERENCE, f"train.output_dir={out}", f"model.random_init_cache={cache}",
         *extra[node]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    return [(p.wait(timeout=WAIT_S), p.communicate()[0]) for p in nodes]


def test_two_machines_of_one_process_each(reference_run, tmp_path):
    """Several machines are the same code path. Global rank 0 writes the files; each process takes
    its machine's local rank 0."""
    reference, cache = reference_run
    out = tmp_path / "run"
    results = two_machines(out, cache)
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert sum(output.count("done: step 12") for _, output in results) == 1
    assert_same_run(out, reference)


def test_ranks_that_see_other_data_stop_with_one_line(reference_run, tmp_path):
    """A machine whose data file differs would add gradients of other examples: every rank says so
    in one line, before the model loads, and the job ends."""
    _, cache = reference_run
    other = tmp_path / "other.json"
    data = json.loads(FIXTURE.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " 정확히"
    other.write_text(json.dumps(data, ensure_ascii=False))
    results = two_machines(tmp_path / "run", cache, ([], [f"data.source={other}"]))
    assert all(code != 0 for code, _ in results)
    assert all("error: the ranks do not agree on the start (step, data fingerprint, config)" in output for _, output in results)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_evaluate_answers_a_share_on_each_rank_and_rank_0_merges(tiny_run, tmp_path):
    out, cache = tiny_run
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--config", str(TINY_YAML), f"model.random_init_cache={cache}", "train.progress_bar=false",
              "--adapter", str(out / "final")]
    assert evaluate.main([*common, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "evaluate.py", *common, "--out", str(two)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    predictions = [json.loads((d / "predictions.json").read_text()) for d in (one, two)]
    assert len(predictions[0]) == 24 and predictions[1] == predictions[0]  # every question, once
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert metrics[1]["exact_match"] == metrics[0]["exact_match"] and metrics[1]["questions"] == 24
