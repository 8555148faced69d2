set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
C=configs/llama2-70b-korquad.yaml
D="model.random_init=true model.tokenizer=.devdata/tokenizer data.source=.devdata/KorQuAD_v1.0_dev.json train.progress_bar=false
   train.max_steps=6 train.memory_cap_gib=19.8 train.output_dir=/tmp/card24"
s=$(date +%s)
python3 -c "import sys, torch; from qlora.config import load_config; from qlora.model import base_weights
cfg = load_config('$C', sys.argv[1:]); print(base_weights(cfg.model, 'bf16', cfg.train.seed, torch.device('cuda')))" $D
echo "random 4-bit weights: $(( $(date +%s) - s )) s" | tee $OUT/console.txt
s=$(date +%s)
timeout 420 torchrun --nproc-per-node 4 train.py --config $C $D --estimate-memory --overwrite > $OUT/card24.log 2>&1
echo "card24 rc=$? $(( $(date +%s) - s )) s" | tee -a $OUT/console.txt
grep -E "^memory|^plan|^done|Error|error|budget" $OUT/card24.log | grep -v "^\[rank" | head -20 | tee -a $OUT/console.txt
cp /tmp/card24/metrics.jsonl $OUT/card24.metrics.jsonl && python3 bench/scaling.py $OUT/card24.metrics.jsonl card24 | tee -a $OUT/console.txt | cut -c1-500
