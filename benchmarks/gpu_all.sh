#!/usr/bin/env bash
# Every GPU measurement of the project in ONE run, under 8 minutes on one GPU machine with torch,
# triton and timm (no DeepSpeed, no DALI needed):
#
#   bash benchmarks/gpu_all.sh OUTDIR [PART ...]      # parts: steps attention kernels tests (the default), scale
#   bash benchmarks/gpu_all.sh OUTDIR scale           # the optional large-model part alone, with the whole budget
#   SIMMIM_BENCH_TINY=1 bash benchmarks/gpu_all.sh /tmp/smoke   # CPU smoke: every part at tiny sizes
#
# From a coding session (device tool):  run(command="bash benchmarks/gpu_all.sh $OUT", timeout_s=540)
#
#  steps      the whole SimMIM step, Swin-B then Swin-L, 192 px, batch 128, bf16 autocast, synthetic data,
#             engine.mode=torch: stock timm eager, stock timm compiled, ours (defaults, compiled), ours with
#             model.attention=fused; img/s, x stock compiled, peak memory (benchmarks/step_speed.py; all
#             variants in one process)
#  attention  the fused window_attention op vs timm's attention path, eager and compiled, per stage of
#             Swin-B and Swin-L, with the bytes model (benchmarks/bench_attention.py)
#  kernels    mask-token substitution and masked L1 vs the reference, eager and compiled (bench_kernels.py)
#  tests      the kernel and attention tests on the GPU, with whatever time is left
#  scale      (optional: not in the default list, it needs most of the budget by itself) large-model
#             pretraining, SwinV2-H, then SwinV2-G, then Swin-L as time allows: the memory planner's
#             choice for this GPU beside the measured img/s and peak memory of a few steps per choice
#             (benchmarks/bench_scale.py; without DeepSpeed only the ZeRO-0 choices run)
#
# Each part runs under its own time limit: what is left of the total budget (SIMMIM_GPU_BUDGET_S,
# default 450 s) minus the reserves of the parts after it; a part that fails or runs out of time
# loses only itself (the steps and the benchmarks keep what they finished). The device line,
# date and versions come first; the end is OUTDIR/perf.md (printed) and OUTDIR/perf.json
# (benchmarks/perf_report.py), with each part's log as OUTDIR/<part>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_all.sh OUTDIR [steps attention kernels tests scale]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(steps attention kernels tests)
for p in "${parts[@]}"; do
  case $p in steps|attention|kernels|tests|scale) ;; *) echo "unknown part '$p' (steps attention kernels tests scale)"; exit 2;; esac
done
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tiny=${SIMMIM_BENCH_TINY:-0}
declare -A reserve minimum
if [ "$tiny" = 1 ]; then
  # CPU, the kernels in Triton's interpreter, dynamo without code generation: checks the logic only
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 SIMMIM_BENCH_COMPILE_BACKEND=${SIMMIM_BENCH_COMPILE_BACKEND:-eager}
  budget=${SIMMIM_GPU_BUDGET_S:-110}
  reserve=([steps]=40 [attention]=20 [kernels]=20 [tests]=0 [scale]=20)
  minimum=([steps]=10 [attention]=8 [kernels]=8 [tests]=8 [scale]=10)
  scale_args=(--models swinv2_tiny_cpu --warmup 1 --steps 2)
  steps_args=(--models tiny_cpu --batch 1 --warmup 1 --steps 1 --eager-estimate-s 3 --compile-estimate-s 8)
  tests=(tests/test_attention_bytes.py -k "hand_count or block_shapes")
else
  export TRITON_INTERPRET=0   # the kernel tests' conftest would otherwise choose the interpreter
  budget=${SIMMIM_GPU_BUDGET_S:-450}
  reserve=([steps]=250 [attention]=80 [kernels]=60 [tests]=0 [scale]=300)
  minimum=([steps]=60 [attention]=30 [kernels]=30 [tests]=30 [scale]=90)
  scale_args=(--models swinv2_h swinv2_g swin_l --warmup 1 --steps 3)
  steps_args=(--models swin_b swin_l --batch 128 --warmup 3 --steps 20)
  tests=()
  # the attention tests first (whatever their names), then the kernel tests at full sizes
  for f in kernels/tests/test_*attention*.py tests/test_*attention*.py \
           kernels/tests/test_kernels.py tests/test_kernels_model.py tests/test_kernels_compile.py; do
    [ -e "$f" ] && tests+=("$f")
  done
fi
export SIMMIM_BENCH_TINY=$tiny
start=$SECONDS
# what an earlier run left here must not mix into this report
rm -f "$out"/{env.json,steps.json,attention.json,kernels.json,scale.json,perf.json,perf.md} \
  "$out"/{steps,attention,kernels,tests,scale}.log
: > "$out/parts.jsonl"
report_reserve=10

record() {  # record PART STATUS SECONDS LIMIT
  printf '{"part": "%s", "status": "%s", "seconds": %s, "limit_s": %s}\n' "$1" "$2" "$3" "$4" >> "$out/parts.jsonl"
}

# part NAME CMD...: runs CMD under the time left for NAME, output in OUTDIR/NAME.log
part() {
  local name=$1; shift
  local later=0 seen=0 p
  for p in "${parts[@]}"; do
    [ $seen = 1 ] && later=$((later + ${reserve[$p]}))
    [ "$p" = "$name" ] && seen=1
  done
  local limit=$((budget - (SECONDS - start) - later - report_reserve))
  echo
  echo "== [$((SECONDS - start)) s] $name: limit ${limit} s"
  if [ "$limit" -lt "${minimum[$name]}" ]; then
    echo "skipped: time budget"
    record "$name" "skipped: time budget (${limit} s left for it)" 0 "$limit"
    return
  fi
  export SIMMIM_PART_LIMIT_S=$limit SIMMIM_BENCH_DEADLINE=$(( $(date +%s) + limit * 85 / 100 ))
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  grep -v '^\s*$' "$out/$name.log" | grep -vE '^(Name \(time|-{20,}|test_[a-z_]+\[)' | tail -n 30
  local status="ok"
  [ $rc -ne 0 ] && status="failed (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="cut at its time limit (${limit} s)"
  echo "$name: $status in $((SECONDS - t0)) s"
  record "$name" "$status" $((SECONDS - t0)) "$limit"
  [ "$status" = ok ] || any_failed=1
}
any_failed=0

# --- device, date, versions ------------------------------------------------------------------
timeout 60 $PY - "$out/env.json" "$tiny" "bash benchmarks/gpu_all.sh $out ${parts[*]}" <<'PY'
import json, platform, subprocess, sys, time
import torch
env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
       "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": sys.argv[2] == "1", "command": sys.argv[3]}
for name in ("triton", "timm"):
    try:
        env[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
        env[name] = f"missing ({type(e).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, gpu_memory=f"{p.total_memory / 2**30:.0f} GiB", capability=f"sm_{p.major}{p.minor}")
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
else:
    env["device"] = f"cpu ({platform.processor() or platform.machine()})"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("  ".join(f"{k} {v}" for k, v in env.items() if k not in ("command", "tiny")))
PY
[ $? -eq 0 ] || { echo "torch does not import: nothing can be measured"; exit 3; }
if [ "$tiny" != 1 ] && ! $PY -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "no CUDA device: run SIMMIM_BENCH_TINY=1 bash benchmarks/gpu_all.sh OUT for the CPU smoke run"; exit 3
fi

for p in "${parts[@]}"; do
  case $p in
    steps)
      # its own budget is the part's limit less 15 s (SIMMIM_PART_LIMIT_S): it skips what would not fit
      part steps $PY benchmarks/step_speed.py "${steps_args[@]}" --json "$out/steps.json" ;;
    attention)
      SIMMIM_BENCH_JSON="$out/attention.json" part attention $PY -m pytest benchmarks/bench_attention.py -q \
        -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name ;;
    kernels)
      SIMMIM_BENCH_JSON="$out/kernels.json" part kernels $PY -m pytest benchmarks/bench_kernels.py -q \
        -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name ;;
    scale)
      # like steps: its own budget is the part's limit less 15 s; it skips the choices that would not fit
      part scale $PY benchmarks/bench_scale.py "${scale_args[@]}" --json "$out/scale.json" ;;
    tests)
      if [ ${#tests[@]} -eq 0 ]; then record tests "no test files" 0 0; continue; fi
      xdist=()
      [ "$tiny" != 1 ] && $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
      # SIMMIM_SLOW_TESTS=1 (unless set): the full SimMIM sizes and the model under inductor, as the GPU allows
      SIMMIM_SLOW_TESTS=${SIMMIM_SLOW_TESTS-1} part tests $PY -m pytest "${tests[@]}" ${xdist[@]+"${xdist[@]}"} -v -p no:cacheprovider --durations=5 ;;
  esac
done

echo
echo "== [$((SECONDS - start)) s] report"
$PY benchmarks/perf_report.py "$out" && cat "$out/perf.md"
echo "total $((SECONDS - start)) s; perf.md, perf.json and the logs are in $out"
exit $any_failed
