#!/usr/bin/env bash
# The memory plan on the GPU: train.py on the real job's config (random weights) with
# train.memory_budget_gib=B for each budget given, one after the other; tokens/s over steps 3-STEPS
# and the peak reserved memory (bench/scaling.py), and the plan train.py printed. EXTRA: more
# overrides for every run (e.g. "data.pack_length=2048": the plan then picks the recompute setting
# for those rows), TAG: a suffix for the runs' file names.
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json [EXTRA="overrides"] [TAG=NAME] bash bench/budget_gpu.sh STEPS B [B ...]
set -u
steps=$1; shift
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps"
for b in "$@"; do
  name=budget-$b${TAG:+-$TAG}; s=$(date +%s)
  python3 train.py --config $C $D ${EXTRA:-} train.memory_budget_gib=$b train.output_dir=/tmp/$name > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s"; grep "^memory plan" "$OUT/$name.log"
  cp /tmp/$name/metrics.jsonl "$OUT/$name.metrics.jsonl"
  python3 bench/scaling.py /tmp/$name/metrics.jsonl $name | tee -a "$OUT/budget.jsonl" | cut -c1-300
done
