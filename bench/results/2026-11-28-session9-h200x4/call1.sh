set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export OUT TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json TORCH_LOGS=graph_breaks,recompiles
G="data.pack_length=4096 data.pack_rows_multiple=4 train.grad_accum=16"
NAME=compiled timeout 365 bash bench/big_gpu.sh 4 llama-2-70b 8 24 $G 2>&1 | tee -a $OUT/console.txt
[ -f $OUT/compiled.metrics.jsonl ] || cp /tmp/big-llama-2-70b-4/metrics.jsonl $OUT/compiled.partial.metrics.jsonl
grep -c "Graph break" $OUT/compiled.log | sed 's/^/graph breaks: /' | tee -a $OUT/console.txt
NAME=eager timeout 185 bash bench/big_gpu.sh 4 llama-2-70b 4 24 $G model.compile_layers=false 2>&1 | tee -a $OUT/console.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/console.txt
