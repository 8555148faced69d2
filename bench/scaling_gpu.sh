#!/usr/bin/env bash
# Many GPUs of one machine: train.py on the real job's config (random weights) with 1 process, then
# with torchrun on N GPUs, the global batch grown N times (train.grad_accum x N) and kept, every layer
# recomputed (train.memory_budget_gib=null: no plan on any run). Overrides
# after STEPS go to the torchrun runs only (the one-GPU baseline is the shipped config):
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json bash bench/scaling_gpu.sh N [STEPS [override ...]]
set -u
n=$1; steps=${2:-10}; shift; shift
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps
   train.memory_budget_gib=null"
run() {
  name=$1; shift; s=$(date +%s)
  "$@" --config $C $D train.output_dir=/tmp/scale-$name > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s"
  cp /tmp/scale-$name/metrics.jsonl "$OUT/$name.metrics.jsonl"
  python3 bench/scaling.py /tmp/scale-$name/metrics.jsonl $name | tee -a "$OUT/scaling.jsonl"
}
run gpu1 python3 train.py
run gpu$n-grown torchrun --nproc-per-node $n train.py train.grad_accum=$((4 * n)) "$@"
run gpu$n-kept torchrun --nproc-per-node $n train.py "$@"
