# Session 15, call C: lean layers: which activation memory budget; std 24 measured after a warm-up variant
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
mkdir -p /tmp/o
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $OUT/call15c.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/gpu.txt
TORCH_LOGS=recompiles timeout -s KILL 420 python3 .devdata/sac_curve.py extractive_2048 5 "" std:all std:24 lean@0.5:8 lean@0.7:8 lean@0.8:8 lean@0.9:8 lean@0.5:0 > /tmp/o/curve.log 2>&1
grep '^{' /tmp/o/curve.log | cut -c1-520; grep -c Recompiling /tmp/o/curve.log; tail -3 /tmp/o/curve.log | cut -c1-300; save
