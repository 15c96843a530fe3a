#!/bin/bash
# lead, session 14: Xeon16 engine steps with the q6 AMX head (8/16 threads), then 1.3b int8 vs none on the H200
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
lscpu | grep -E "Model name|^CPU\(s\)|L2|L3|Flags" | cut -c1-400 > $OUT/machine.txt
cd src
python3 kernels/build_cffi.py > $OUT/cffi.log 2>&1
export PYTHONPATH=$PWD:/tmp/site
T0=$(date +%s)
for T in 8 16; do
  timeout 100 python3 benchmarks/serve_load.py --shape 2b4t --threads $T --embeddings q6 --streams '' --step-repeats 3 --kv-cache f16 --out $OUT/steps$T > $OUT/steps$T.log 2>&1
done
echo "cpu part $(( $(date +%s) - T0 )) s" >> $OUT/timing.txt
for V in int8 none; do
  T1=$(date +%s)
  timeout $([ $V = int8 ] && echo 200 || echo 140) python3 benchmarks/train_gpu.py --recipe recipes/bitnet-b1.58-1.3b.yaml --modes compile --variants $V --steps 12 --set train.grad_accum=2 --set train.batch_size=16 --set train.log_every=2 --out $OUT/train_1p3b_$V.json > $OUT/train_1p3b_$V.log 2>&1
  echo "1.3b $V $(( $(date +%s) - T1 )) s rc $?" >> $OUT/timing.txt
done
