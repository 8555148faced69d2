# Session 15, call D: lean layers with torch's RNG functionalization on CUDA (masks regenerated in the backward, not saved): gradient vs finite differences; speed and peak
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
mkdir -p /tmp/o
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $OUT/call15d.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/gpu.txt
(timeout -s KILL 80 python3 .devdata/lean_fd_check.py; QLORA_LEAN_RNG=1 timeout -s KILL 80 python3 .devdata/lean_fd_check.py) > /tmp/o/fd.log 2>&1; grep lean= /tmp/o/fd.log; tail -3 /tmp/o/fd.log | cut -c1-300; save
TORCH_LOGS=recompiles timeout -s KILL 300 python3 .devdata/sac_curve.py extractive_2048 5 "" std:all lean:8 leanrng:0 leanrng:4 leanrng:8 > /tmp/o/curve.log 2>&1
grep '^{' /tmp/o/curve.log | cut -c1-330; grep -c Recompiling /tmp/o/curve.log; tail -3 /tmp/o/curve.log | cut -c1-300; save
