#!/usr/bin/env bash
# The memory plan on the GPU: train.py on the real job's config (random weights) with
# train.memory_budget_gib=B for each budget given, one after the other; tokens/s over steps 3-STEPS
# and the peak reserved memory (bench/scaling.py), and the plan train.py printed.
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json bash bench/budget_gpu.sh STEPS B [B ...]
set -u
steps=$1; shift
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps"
for b in "$@"; do
  s=$(date +%s)
  python3 train.py --config $C $D train.memory_budget_gib=$b train.output_dir=/tmp/budget-$b > "$OUT/budget-$b.log" 2>&1
  echo "budget $b rc=$? $(( $(date +%s) - s )) s"; grep "^memory plan" "$OUT/budget-$b.log"
  cp /tmp/budget-$b/metrics.jsonl "$OUT/budget-$b.metrics.jsonl"
  python3 bench/scaling.py /tmp/budget-$b/metrics.jsonl budget-$b | tee -a "$OUT/budget.jsonl" | cut -c1-300
done
