# Session 14, call C: flex kernel compile modes; Gemma-2 ours (flex padded to one length) and TRL eager 2x8, one machine
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call14c.tgz -C /tmp/o .; }
mkdir -p /tmp/o/ours /tmp/o/trl
OUT=/tmp/o/ours TORCH_LOGS=recompiles timeout -s KILL 240 bash bench/families_gpu.sh "gemma2-9b" ""; save
grep -c "Recompiling" /tmp/o/ours/*.log
OUT=/tmp/o/trl EXTRA="train.batch_size=2 train.grad_accum=8" timeout -s KILL 150 bash bench/families_gpu.sh "" "gemma2-9b"; save
timeout -s KILL 150 python3 .devdata/flexbench2.py > /tmp/o/flexbench2.log 2>&1; grep -v -i "warn" /tmp/o/flexbench2.log | tail -4; save
