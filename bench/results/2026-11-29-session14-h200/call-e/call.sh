# Session 14, call E: the GPU tests after the review fixes (flex through the attention interface, windows, autocast, small backward blocks), Gemma-2 ours once more
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call14e.tgz -C /tmp/o .; }
mkdir -p /tmp/o/ours
timeout -s KILL 110 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py > /tmp/o/pytest.log 2>&1; tail -15 /tmp/o/pytest.log | cut -c1-400; save
OUT=/tmp/o/ours TORCH_LOGS=recompiles timeout -s KILL 165 bash bench/families_gpu.sh "gemma2-9b" ""; save
grep -c "Recompiling" /tmp/o/ours/*.log
