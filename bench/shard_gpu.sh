#!/usr/bin/env bash
# Sharded (model.shard=true, FSDP) against DDP on N GPUs of one machine: the real job's config (random
# weights; torch's AdamW; every layer recomputed, no memory plan), STEPS steps each,
# then the sharded run resumed from its checkpoint at STEPS/2. Prints each run's tokens/s over steps 3-STEPS
# and peak reserved memory per rank (bench/scaling.py), and the loss gaps (bench/compare_losses.py).
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json bash bench/shard_gpu.sh N STEPS [override ...]
set -u
n=$1; steps=$2; shift; shift
half=$((steps / 2))
C=configs/llama2-7b-korquad.yaml
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA train.progress_bar=false train.max_steps=$steps
   train.memory_budget_gib=null train.optimizer=adamw train.save_every=$half"
run() {
  name=$1; shift; s=$(date +%s)
  torchrun --nproc-per-node $n train.py --config $C $D "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s"; grep -E "^done|^memory: peak" "$OUT/$name.log"
  cp /tmp/shard-$name/metrics.jsonl "$OUT/$name.metrics.jsonl"
  python3 bench/scaling.py /tmp/shard-$name/metrics.jsonl $name | tee -a "$OUT/shard.jsonl" | cut -c1-300
}
run sharded model.shard=true train.output_dir=/tmp/shard-sharded "$@"
run ddp train.output_dir=/tmp/shard-ddp "$@"
run resumed model.shard=true train.output_dir=/tmp/shard-resumed "$@" \
  --resume-from /tmp/shard-sharded/checkpoints/step-$(printf %08d $half)
python3 bench/compare_losses.py "$OUT/ddp.metrics.jsonl" "$OUT/sharded.metrics.jsonl" | tee -a "$OUT/shard.jsonl"
python3 bench/compare_losses.py "$OUT/sharded.metrics.jsonl" "$OUT/resumed.metrics.jsonl" | tee -a "$OUT/shard.jsonl"
