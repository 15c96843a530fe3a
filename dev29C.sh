name=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$name"
case "$name" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
timeout 430 python3 benchmarks/train_gpu.py --modes compile --steps 40 --variants int8,int8@default,none,int8,int8@default,none,int8 --out $OUT/small_graphs_h200.json 2>&1 | grep -v Warning | tail -8
timeout 140 python3 benchmarks/train_gpu.py --modes compile --steps 30 --variants int8,none --profile --out $OUT/small_profile_h200.json 2>&1 | grep -v Warning | tail -30
