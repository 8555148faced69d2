#!/usr/bin/env bash
# A large Llama-2 architecture sharded (model.shard=true, FSDP) over N GPUs of one machine, each GPU
# capped at CAP GiB (train.memory_cap_gib: an 80-141 GB GPU acting as a 24 GB card): the real job's
# config with random weights, torch's AdamW, every layer recomputed, compiled layers (the 7B config's;
# model.compile_layers=false to turn them off). First the 4-bit random weights
# are written (once per machine, one layer at a time, timed), then STEPS steps with --estimate-memory.
# Prints tokens/s over steps 3-STEPS and the peak reserved memory per rank (bench/scaling.py).
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json [NAME=RUN] bash bench/big_gpu.sh N ARCH STEPS CAP [override ...]
# e.g. bash bench/big_gpu.sh 4 llama-2-70b 8 24 data.pack_length=4096
# (NAME: the run's log and metrics file names; ARCH-N by default)
set -u
n=$1; arch=$2; steps=$3; cap=$4; shift 4
name=${NAME:-$arch-$n}
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps
   model.arch=configs/models/$arch model.shard=true train.optimizer=adamw
   train.memory_budget_gib=null train.memory_cap_gib=$cap train.output_dir=/tmp/big-$arch-$n"
s=$(date +%s)
python3 -c "import sys, torch; from qlora.config import load_config; from qlora.model import base_weights
cfg = load_config('$C', sys.argv[1:]); print(base_weights(cfg.model, 'bf16', cfg.train.seed, torch.device('cuda')))" $D "$@"
echo "random 4-bit weights of $arch: $(( $(date +%s) - s )) s"
s=$(date +%s)
torchrun --nproc-per-node $n train.py --config $C $D "$@" --estimate-memory --overwrite > "$OUT/$name.log" 2>&1
echo "$name: $arch on $n GPUs rc=$? $(( $(date +%s) - s )) s"
grep -E "^model:|^memory|^done|Error|error" "$OUT/$name.log" | head -20
cp /tmp/big-$arch-$n/metrics.jsonl "$OUT/$name.metrics.jsonl" &&
  python3 bench/scaling.py "$OUT/$name.metrics.jsonl" "$name" | tee -a "$OUT/big.jsonl" | cut -c1-400
