#!/usr/bin/env bash
# Resume on the GPU: an unbroken 20-step run (checkpoint at step 10) against a copy resumed from
# that step-10 checkpoint. Prints the adapters' largest difference and both runs' losses.
#   bash bench/resume_gpu.sh OUT_DIR CONFIG [overrides...]
set -euo pipefail
out=$1; config=$2; shift 2
common=(--config "$config" model.random_init=true train.max_steps=20
        train.save_every=10 train.keep_last=3 train.progress_bar=false "$@")
python train.py "${common[@]}" train.output_dir="$out/unbroken" --overwrite
mkdir -p "$out/resumed"
cp -r "$out/unbroken/checkpoints/step-00000010" "$out/resumed/step10"
python train.py "${common[@]}" train.output_dir="$out/resumed" --resume-from "$out/resumed/step10"
python bench/compare_adapters.py "$out/unbroken/final" "$out/resumed/final"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
from qlora.logs import read_metrics
read = lambda p: {r["step"]: r["loss"] for r in read_metrics(Path(p))}
a, b = read(f"{sys.argv[1]}/unbroken/metrics.jsonl"), read(f"{sys.argv[1]}/resumed/metrics.jsonl")
print(json.dumps({"steps": sorted(b), "max_loss_diff_steps_11_20": max(abs(a[s] - b[s]) for s in range(11, 21))}))
PY
