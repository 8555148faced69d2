#!/usr/bin/env bash
# train.memory_budget_gib=auto on GPUs with only FREE GiB free (the rest held by bench/hold_memory.py,
# as another process's memory would be): the real job's config (random weights) on one GPU, then under
# torchrun on N; each run's plan, peak memory per rank, and tokens/s over steps 3-STEPS.
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json bash bench/auto_gpu.sh STEPS FREE_GIB N
set -u
steps=$1; free=$2; n=$3
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps
   train.memory_budget_gib=auto"
python3 bench/hold_memory.py "$free" > "$OUT/hold.log" 2>&1 &
holder=$!
until [ "$(grep -c '^hold:' "$OUT/hold.log")" -ge "$(nvidia-smi -L | wc -l)" ]; do
  kill -0 $holder 2>/dev/null || { cat "$OUT/hold.log"; exit 1; }  # it died before holding the memory
  sleep 1
done
cat "$OUT/hold.log"
run() {
  name=$1; shift; s=$(date +%s)
  "$@" --config $C $D train.output_dir=/tmp/auto-$name > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s"; grep -E "^memory|^done" "$OUT/$name.log"
  cp /tmp/auto-$name/metrics.jsonl "$OUT/$name.metrics.jsonl"
  python3 bench/scaling.py /tmp/auto-$name/metrics.jsonl $name | tee -a "$OUT/auto.jsonl" | cut -c1-300
}
CUDA_VISIBLE_DEVICES=0 run auto-gpu1 python3 train.py
run auto-gpu$n torchrun --nproc-per-node $n train.py
kill $holder
