#!/bin/bash
# amx helper, session 13: the AMX GEMM at 8/16 threads (main vs branch amx), then the engine steps
cd "$(dirname "$0")"
D=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
lscpu | grep -E "Model name|^CPU\(s\)|L2|L3" > $OUT/machine.txt
(make -s -C main/kernels build/bench >/dev/null 2>&1) & (make -s -C src/kernels build/bench > /dev/null 2>&1) &
(cd src && python3 kernels/build_cffi.py > $OUT/cffi.log 2>&1) &
wait
ls -la main/kernels/build/bench src/kernels/build/bench src/bitnet_cli/_kernels*.so >> $OUT/cffi.log 2>&1
for T in 8 16; do for r in 1 2; do
  echo "== main T=$T"; main/kernels/build/bench $T 6 kernel | grep i2_k
  echo "== amx T=$T"; BN_BENCH_TOKENS=16,1,2,4,8,16,32,64 src/kernels/build/bench $T 6 kernel | grep i2_k
done; done > $OUT/kernels.txt 2>&1
cd src
for T in 8 16; do
  PYTHONPATH=$PWD:/tmp/site timeout 200 python3 benchmarks/serve_load.py --shape 2b4t --threads $T --embeddings q6 --streams '' --step-repeats 3 --kv-cache f16 --out $OUT/steps$T > $OUT/steps$T.log 2>&1
done
