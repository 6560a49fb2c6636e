#!/usr/bin/env bash
# One prepared GPU check for the fused kernels (issue 3), sized to finish well under 8 minutes on
# one H100: (1) every kernel test compiled on the GPU, incl. the full SimMIM sizes and the model
# under torch.compile (inductor); (2) the benchmarks at B = 128 with a compact table and the
# issue's targets. Usage, from anywhere:  benchmarks/gpu_check.sh   ($OUT, if set, gets the JSON)
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SIMMIM_SLOW_TESTS=1
PY=${PYTHON:-python3}
# simmim_fast.kernels is the kernels/ folder (setup.py maps it); without an install, link it.
if ! $PY -c "import simmim_fast.kernels" 2>/dev/null; then
  [ -e simmim_fast/kernels ] || ln -s ../kernels simmim_fast/kernels
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PY'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
start=$SECONDS
echo "== correctness (tests/test_kernels*.py on the GPU) =="
timeout 300 $PY -m pytest tests/test_kernels.py tests/test_kernels_model.py tests/test_kernels_compile.py \
  -q -x -p no:cacheprovider --durations=5 2>&1 | tail -n 25
tests_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc in $((SECONDS - start)) s"
start=$SECONDS
echo "== benchmarks (B = 128, forward + backward) =="
json=()
[ -n "${OUT:-}" ] && json=(--benchmark-json="$OUT/bench_kernels.json")
timeout 240 $PY -m pytest benchmarks/bench_kernels.py -q -p no:cacheprovider \
  --benchmark-columns=median,rounds,iterations --benchmark-sort=name "${json[@]}" 2>&1 \
  | sed -n '/SimMIM ops, forward/,$p'
bench_rc=${PIPESTATUS[0]}
echo "benchmarks: rc=$bench_rc in $((SECONDS - start)) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
