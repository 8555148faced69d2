# Session 15, call A: saved-activation budget of the compiled layers vs whole-layer recompute (Llama-2-7B job, random weights)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
mkdir -p /tmp/o
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $OUT/call15a.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/gpu.txt
timeout -s KILL 480 python3 .devdata/sac_curve.py extractive_2048 3 "" none:1.0 none:0.6 none:0.4 none:0.25 24:1.0 24:0.5 all:1.0 > /tmp/o/curve.log 2>&1
grep '^{' /tmp/o/curve.log | cut -c1-400; tail -3 /tmp/o/curve.log | cut -c1-300; save
