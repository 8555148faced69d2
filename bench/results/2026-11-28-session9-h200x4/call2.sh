set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export OUT TOKENIZER=.devdata/tokenizer DATA=.devdata/KorQuAD_v1.0_dev.json
mkdir -p $OUT/shard7b $OUT/big34b $OUT/reentrant
(CUDA_VISIBLE_DEVICES=0,1 PET_MASTER_PORT=29511 OUT=$OUT/shard7b timeout 330 bash bench/shard_gpu.sh 2 10 model.compile_layers=false > $OUT/shard7b/console.txt 2>&1) &
(CUDA_VISIBLE_DEVICES=2,3 PET_MASTER_PORT=29522 OUT=$OUT/big34b timeout 330 bash bench/big_gpu.sh 2 codellama-34b 6 24 data.pack_length=4096 model.compile_layers=false > $OUT/big34b/console.txt 2>&1) &
wait
cat $OUT/shard7b/console.txt $OUT/big34b/console.txt | cut -c1-600
OUT=$OUT/reentrant NAME=reentrant timeout 200 bash bench/big_gpu.sh 4 llama-2-70b 4 24 data.pack_length=4096 data.pack_rows_multiple=4 train.grad_accum=16 model.compile_layers=false model.recompute_reentrant=true 2>&1 | tee $OUT/reentrant/console.txt | cut -c1-600
