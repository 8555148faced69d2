# Session 15, call F (same machine as E, warm): TRL on the same job; the plan for 12 GiB (lean layers with offloaded ones); the GPU tests of attention and lean layers
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
mkdir -p /tmp/o/budget /tmp/o/trl
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call15f.tgz -C /tmp/o .; }
nvidia-smi --query-gpu=name,memory.total,driver_version,pci.bus_id --format=csv > /tmp/o/gpu.txt
OUT=/tmp/o/trl timeout -s KILL 130 bash bench/families_gpu.sh "" "llama2-7b"; save
OUT=/tmp/o/budget timeout -s KILL 130 bash bench/budget_gpu.sh 14 12; save
timeout -s KILL 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_loop.py -k "compiled_flex or lean or offload" > /tmp/o/pytest.log 2>&1; tail -5 /tmp/o/pytest.log | cut -c1-300; save
grep -h "peak allocated\|^memory plan\|Error" /tmp/o/budget/*.log | cut -c1-250 | tail -6
