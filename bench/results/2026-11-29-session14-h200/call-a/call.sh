# Session 14, call A: the GPU tests (flex kernels, offload streams), Gemma-2-9B on flex attention (ours, every lever), TRL eager 2x8
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call14a.tgz -C /tmp/o .; }
mkdir -p /tmp/o/ours /tmp/o/trl
timeout -s KILL 100 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_loop.py -k "gpu or offloaded" > /tmp/o/pytest.log 2>&1; tail -3 /tmp/o/pytest.log; save
OUT=/tmp/o/ours timeout -s KILL 300 bash bench/families_gpu.sh "gemma2-9b" ""; save
grep -i "error\|recompil" /tmp/o/ours/*.log | head -5
OUT=/tmp/o/trl EXTRA="train.batch_size=2 train.grad_accum=8" timeout -s KILL 170 bash bench/families_gpu.sh "" "gemma2-9b"; save
