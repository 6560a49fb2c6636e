#!/usr/bin/env bash
# One prepared GPU check of the engine's speed (fits a 15-minute device lease; ~7 minutes of work):
# plain PyTorch eager / compiled vs DeepSpeed ZeRO 0/1/2/3 img/s, Swin-B, batch 128, one GPU,
# bf16 autocast with fp32 weights (the default), then DeepSpeed's bf16-weights mode, and extras
# while the time budget lasts. Each variant runs in its own process (benchmarks/engine_speed.py).
#
# From the coding session (device tool), after `bash benchmarks/pack_deepspeed_for_gpu.sh` here:
#   run(command="bash benchmarks/gpu_engine_check.sh", carry=[".device_pkgs/ds"], timeout_s=560)
# Results: $OUT/engine_speed.jsonl (one JSON line per variant) and a table at the end of the output.
# BUDGET_S (default 470) bounds the whole script; variants that no longer fit are skipped, not cut.
# MODEL / BATCH (default swin_b / 128) allow a dry run elsewhere, e.g. MODEL=tiny BATCH=4 on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BUDGET_S:-470}
out_dir=${OUT:-/tmp/simmim_gpu_check}
mkdir -p "$out_dir"
results="$out_dir/engine_speed.jsonl"
: > "$results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1
# One inductor cache for all variants: DeepSpeed ZeRO 0-2 compile the same graph as plain PyTorch
# (checked on the CPU: a ZeRO-1 warm-up of 3 s after plain PyTorch had compiled it), so only the
# first compiled variant pays for compilation.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/simmim_inductor}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/simmim_torch_ext}

if ! python3 -c 'import deepspeed' 2>/dev/null; then
  if [ -x .device_pkgs/ds/unpack.sh ]; then bash .device_pkgs/ds/unpack.sh
  else echo "DeepSpeed is missing and .device_pkgs/ds was not carried: DeepSpeed variants will fail"; fi
fi
# simmim_fast.kernels is kernels/ (an editable install maps it; the untracked symlink may not travel)
if ! python3 -c 'import simmim_fast.kernels' 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e ./kernels -e . || echo "editable install failed"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)'
python3 -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null

# variant <needed seconds> <engine_speed.py args...>: skipped when the budget cannot cover it
variant() {
  local need=$1; shift
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt "$need" ]; then echo "SKIP (budget: ${left}s left, needs ~${need}s): $*"; return; fi
  echo "=== $* (t=$((SECONDS - start))s)"
  timeout "$left" python3 benchmarks/engine_speed.py --model "${MODEL:-swin_b}" --batch "${BATCH:-128}" --warmup 6 --steps 30 \
      --json "$results" "$@" 2>&1 | grep -E '^\{|Error|error:|Traceback|out of memory' | tail -5
  [ "${PIPESTATUS[0]}" = 124 ] && echo "TIMEOUT: $*"
}

variant 40  --variant torch                       # yardstick, eager
variant 150 --variant torch --compile             # yardstick, compiled (pays the compile)
variant 45  --variant ds0 --compile
variant 45  --variant ds1 --compile
variant 45  --variant ds2 --compile
variant 60  --variant ds3                         # compile 'auto' is off at ZeRO-3
variant 40  --variant ds1                         # eager DeepSpeed vs eager yardstick
variant 40  --variant ds2
# the slow configuration users reported: ZeRO-2 eager, foreach AdamW, DeepSpeed's default 5e8-element buckets
variant 40  --variant ds2 --optimizer torch_foreach --set engine.reduce_bucket_size=500000000 --set engine.allgather_bucket_size=500000000
variant 120 --variant ds1 --compile --bf16-weights
variant 45  --variant ds2 --compile --set 'engine.deepspeed={"zero_optimization":{"contiguous_gradients":false}}'
variant 40  --variant ds0
variant 45  --variant ds1 --compile --optimizer torch_foreach
variant 150 --variant ds3 --compile               # the ZeRO-3 compile trap, bounded by the budget

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    sys.exit("no results")
base = {r["compile"]: r["img_per_s"] for r in rows if r["variant"] == "torch"}
print(f"\n{rows[0]['device']}  torch {rows[0]['torch']}  {rows[0]['date']}  {rows[0]['model']} batch {rows[0]['batch']}")
print(f"{'variant':8} {'compile':7} {'weights':8} {'optim':22} {'img/s':>7} {'vs torch':>8} {'step ms':>8} "
      f"{'peak GiB':>8} {'syncs':>5} {'aten ops':>8} {'py calls':>8} {'warm-up s':>9}")
for r in rows:
    ref = base.get(r["compile"])
    rel = f"{100 * r['img_per_s'] / ref:.1f}%" if ref else "-"
    print(f"{r['variant']:8} {str(r['compile']):7} {'bf16' if r['bf16_weights'] else 'fp32':8} {r['optimizer'][:22]:22} "
          f"{r['img_per_s']:7.1f} {rel:>8} {r['step_ms']:8.2f} {r['peak_mem_gib']!s:>8} {r['host_syncs_per_step']:5d} "
          f"{r['aten_ops_per_step']:8d} {r['python_calls_per_step']:8d} {r['warmup_s']:9.1f}")
PY
echo "total $((SECONDS - start))s"
