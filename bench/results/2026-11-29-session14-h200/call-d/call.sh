# Session 14, call D: a second machine: Gemma-2 ours (flex) and TRL eager 2x8; Mistral-7B planned for 8 GiB and TRL
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
export TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
T0=$(date +%s)
O=$OUT
save() { echo "elapsed $(( $(date +%s) - T0 ))"; tar czf $O/call14d.tgz -C /tmp/o .; }
mkdir -p /tmp/o/gemma-ours /tmp/o/gemma-trl /tmp/o/mistral-plan8 /tmp/o/mistral-trl
OUT=/tmp/o/gemma-ours timeout -s KILL 190 bash bench/families_gpu.sh "gemma2-9b" ""; save
OUT=/tmp/o/gemma-trl EXTRA="train.batch_size=2 train.grad_accum=8" timeout -s KILL 110 bash bench/families_gpu.sh "" "gemma2-9b"; save
OUT=/tmp/o/mistral-plan8 BUDGET=8 timeout -s KILL 150 bash bench/families_gpu.sh "mistral-7b" ""; save
OUT=/tmp/o/mistral-trl timeout -s KILL 100 bash bench/families_gpu.sh "" "mistral-7b"; save
