# Session 15, call B: lean layers (model.lean_layers) on CUDA: the same gradient; speed and peak against recompute (Llama-2-7B job, random weights)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
mkdir -p /tmp/o
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $OUT/call15b.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/gpu.txt
timeout -s KILL 100 python3 .devdata/lean_gpu_check.py > /tmp/o/lean_check.log 2>&1; grep -E "lean on|LEAN_GPU" /tmp/o/lean_check.log; tail -2 /tmp/o/lean_check.log | cut -c1-300; save
timeout -s KILL 420 python3 .devdata/sac_curve.py extractive_2048 5 "" std:24 lean:0 lean:4 lean:8 lean:12 std:none std:all > /tmp/o/curve.log 2>&1
grep '^{' /tmp/o/curve.log | cut -c1-420; tail -3 /tmp/o/curve.log | cut -c1-300; save
