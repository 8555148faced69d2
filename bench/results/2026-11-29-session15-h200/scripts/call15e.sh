# Session 15, call E: lean layers as shipped (masks replayed on CUDA): gradient vs finite differences; the plan for 15.5 and 16 GiB (lean), and 15.5 with lean layers off (the session-13 plan), one machine
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
mkdir -p /tmp/o/budget
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call15e.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o/gpu.txt
timeout -s KILL 200 python3 .devdata/lean_fd_check.py > /tmp/o/fd.log 2>&1; grep lean= /tmp/o/fd.log; save
OUT=/tmp/o/budget timeout -s KILL 170 bash bench/budget_gpu.sh 14 15.5 16; save
OUT=/tmp/o/budget EXTRA="model.lean_layers=false" TAG=kept timeout -s KILL 110 bash bench/budget_gpu.sh 14 15.5; save
grep -h "peak allocated\|^memory plan\|Error\|compile\|first step" /tmp/o/budget/*.log | cut -c1-250 | tail -12
