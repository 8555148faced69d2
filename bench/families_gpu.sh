#!/usr/bin/env bash
# Model families on the GPU: our loop (every lever of the config) and TRL's SFTTrainer on the
# same rows, one config of configs/STEM-korquad.yaml after another, random weights at the real shape.
#   OUT=DIR TOKENIZER=DIR DATA=KorQuAD_v1.0_dev.json [EXTRA="overrides"] [BUDGET=GiB: ours planned for it] \
#     bash bench/families_gpu.sh "OURS_STEMS" "TRL_STEMS"
# e.g. bash bench/families_gpu.sh "llama3.1-8b qwen2.5-7b" "qwen2.5-7b" (TOKENIZER: bench/standin_tokenizer.py)
set -u
D="model.tokenizer=$TOKENIZER data.source=$DATA"
for stem in $1; do
  s=$(date +%s)
  python3 bench/compare_trl.py ours --config "configs/$stem-korquad.yaml" --shape extractive_2048 --steps 6 \
    --only-last ${BUDGET:+--budget $BUDGET} $D ${EXTRA:-} --out "$OUT/ours_${stem}_extractive_2048.json" > "$OUT/ours_$stem.log" 2>&1
  echo "ours $stem rc=$? $(( $(date +%s) - s )) s"; tail -1 "$OUT/ours_$stem.log" | cut -c1-600
done
for stem in $2; do
  s=$(date +%s)
  python3 bench/compare_trl.py trl --config "configs/$stem-korquad.yaml" --shape extractive_2048 --steps 6 \
    $D ${EXTRA:-} --out "$OUT/trl_${stem}_extractive_2048.json" > "$OUT/trl_$stem.log" 2>&1
  echo "trl $stem rc=$? $(( $(date +%s) - s )) s"; tail -1 "$OUT/trl_$stem.log" | cut -c1-600
done
