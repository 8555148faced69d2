# Session 14, call B: why Gemma-2 on flex is slow: flex kernels alone, then a profiled step
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call14b.tgz -C /tmp/o .; }
mkdir -p /tmp/o
timeout -s KILL 120 python3 .devdata/flexbench.py > /tmp/o/flexbench.log 2>&1; grep -v Warn /tmp/o/flexbench.log | tail -8; save
D="model.random_init=true model.tokenizer=$TOKENIZER data.source=$DATA"
TORCH_LOGS=recompiles PYTHONPATH=$PYTHONPATH:bench timeout -s KILL 300 python3 bench/profile_step.py --config configs/gemma2-9b-korquad.yaml --shape extractive_2048 $D > /tmp/o/profile.log 2>&1; save
grep -A40 "step wall" /tmp/o/profile.log | cut -c1-250 | head -80
grep -c -i recompil /tmp/o/profile.log
