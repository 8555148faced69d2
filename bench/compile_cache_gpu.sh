#!/usr/bin/env bash
# The tutorial's whole run (configs/tutorial.yaml: 200 steps, closed-book, fp16; random weights; every
# layer recomputed, no memory plan), RUNS times one after the other on one machine: the first compiles
# the decoder layer cold, the later ones find torch.compile's caches (inductor's FX graph cache, under
# TORCHINDUCTOR_CACHE_DIR). Prints each run's wall time, step 1's seconds and tokens/s over steps 3-200.
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json bash bench/compile_cache_gpu.sh RUNS
set -u
C=configs/tutorial.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false
   train.memory_budget_gib=null"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/qlora-compile-cache}
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
for i in $(seq 1 "$1"); do
  s=$(date +%s%N)
  python3 train.py --config $C $D train.output_dir=/tmp/tutorial-$i > "$OUT/tutorial-$i.log" 2>&1
  rc=$?; wall=$(( ($(date +%s%N) - s) / 1000000 ))
  cp /tmp/tutorial-$i/metrics.jsonl "$OUT/tutorial-$i.metrics.jsonl"
  python3 - "$i" "$rc" "$wall" /tmp/tutorial-$i/metrics.jsonl <<'PY' | tee -a "$OUT/compile_cache.jsonl"
import json, sys
from pathlib import Path
from qlora.logs import read_metrics
lines = read_metrics(Path(sys.argv[4]))
timed = lines[2:]
print(json.dumps({"run": int(sys.argv[1]), "rc": int(sys.argv[2]), "wall_s": int(sys.argv[3]) / 1000,
                  "steps": len(lines), "step1_s": round(lines[0]["step_s"], 2),
                  "train_s": round(sum(l["step_s"] for l in lines), 1),
                  "tokens_per_s_after_2": round(sum(l["tokens"] for l in timed) / sum(l["step_s"] for l in timed)),
                  "final_loss": lines[-1]["loss"]}))
PY
done
