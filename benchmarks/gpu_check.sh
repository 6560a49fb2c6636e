#!/usr/bin/env bash
# One prepared GPU check for the fused kernels (issue 3), sized to finish well under 8 minutes on
# one H100: (1) every kernel test compiled on the GPU, incl. the full SimMIM sizes and the model
# under torch.compile (inductor); (2) the benchmarks at B = 128 with a compact table and the
# issue's targets. Usage, from anywhere:  benchmarks/gpu_check.sh   ($OUT, if set, gets the JSON)
set -uo pipefail
cd "$(dirname "$0")/.."
# (both overridable for a dry run of this script on a CPU: TRITON_INTERPRET=1 SIMMIM_SLOW_TESTS=)
export TRITON_INTERPRET=${TRITON_INTERPRET:-0} SIMMIM_SLOW_TESTS=${SIMMIM_SLOW_TESTS-1} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# a plain checkout imports both packages: simmim_fast from the root, simmim_kernels from kernels/
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PY'
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
PY
start=$SECONDS
echo "== correctness (tests/test_kernels*.py on the GPU) =="
# Many small tests, each new shape / dtype a Triton compile: spread them over workers if xdist is there.
parallel=()
$PY -c "import xdist" 2>/dev/null && parallel=(-n 8)
timeout 330 $PY -m pytest kernels/tests/test_kernels.py tests/test_kernels_model.py tests/test_kernels_compile.py \
  ${parallel[@]+"${parallel[@]}"} -q -p no:cacheprovider --durations=5 2>&1 | tail -n 30
tests_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc in $((SECONDS - start)) s"
start=$SECONDS
echo "== benchmarks (B = 128, forward + backward) =="
json=()
[ -n "${OUT:-}" ] && json=(--benchmark-json="$OUT/bench_kernels.json")
log=$(mktemp)
timeout 200 $PY -m pytest benchmarks/bench_kernels.py -q -p no:cacheprovider \
  --benchmark-columns=median,rounds,iterations --benchmark-sort=name ${json[@]+"${json[@]}"} >"$log" 2>&1
bench_rc=$?
# the compact table (benchmarks/conftest.py prints it last); the whole tail if something failed
if [ $bench_rc -eq 0 ]; then
  sed -n '/SimMIM ops, forward/,$p' "$log" | grep -v '^$' | head -n 40
else
  tail -n 60 "$log"
fi
echo "benchmarks: rc=$bench_rc in $((SECONDS - start)) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
