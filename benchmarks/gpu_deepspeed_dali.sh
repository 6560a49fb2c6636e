#!/usr/bin/env bash
# The optional GPU checks that need DeepSpeed and/or NVIDIA DALI (benchmarks/gpu_all.sh is the main
# GPU run and needs neither). The GPU machine has no package registry: the packages travel with the
# working tree (DEVELOPERS.md): .device_pkgs/ (the shared pack, DALI + DeepSpeed in three parts) or
# .device_pkgs/ds/ (DeepSpeed only, one part: bash benchmarks/pack_deepspeed_for_gpu.sh).
#
#   bash benchmarks/gpu_deepspeed_dali.sh OUTDIR [data] [engine] [tools]     # default: data engine
#
#  data    (DALI, ~5-7 min) 8192 500-px JPEGs cut from scikit-image's photos; tests/test_data_gpu.py and
#          the CPU data tests; loader img/s per backend (dali 8 threads, target >= 15,000; dali_cpu, torch,
#          synthetic; benchmarks/bench_loader.py); a compiled Swin-B step fed by synthetic vs dali
#          (benchmarks/bench_train_step.py)
#  engine  (DeepSpeed, ~7 min) plain PyTorch eager / compiled vs DeepSpeed ZeRO 0/1/2/3 img/s, Swin-B,
#          batch 128 (benchmarks/engine_speed.py, one process per variant), then bf16 weights, foreach
#          AdamW, the slow setup users reported, ZeRO-3 compiled; variants that no longer fit are skipped
#  tools   (DeepSpeed optional, ~5 min) pretrain 40 steps bf16, visualize, export, knn, linear-probe, finetune
#          on CUDA; finetune through DeepSpeed ZeRO-1/3 where deepspeed imports. PASS/FAIL lines
#
# BUDGET_S (default 540) bounds the whole script; each part gets what is left. Everything lands in
# OUTDIR (data: *.json/*.txt; engine: engine_speed.jsonl; tools: eval_check/), with a table per part.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --part ]; then part=$2; out=$3; else part=""; out=${1:?usage: bash benchmarks/gpu_deepspeed_dali.sh OUTDIR [data] [engine] [tools]}; shift; fi
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TRITON_INTERPRET=0
# one inductor cache for all variants: DeepSpeed ZeRO 0-2 compile the same graph as plain PyTorch
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/simmim_inductor}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/simmim_torch_ext}

packages() {
  if ! python3 -c 'import nvidia.dali' 2>/dev/null && [ -e .device_pkgs/unpack.sh ]; then bash .device_pkgs/unpack.sh; fi
  if ! python3 -c 'import deepspeed' 2>/dev/null && [ -x .device_pkgs/ds/unpack.sh ]; then bash .device_pkgs/ds/unpack.sh; fi
  if ! python3 -c 'import simmim_fast, simmim_kernels' 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e ./kernels -e . || echo "editable install failed"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
  python3 - <<'PY' | tee -a "$out/device.txt"
import os, sys, torch
mods = []
for name in ("triton", "timm", "torchvision", "deepspeed", "nvidia.dali"):
    try:
        mods.append(f"{name} {__import__(name, fromlist=['_']).__version__}")
    except Exception:  # noqa: BLE001
        mods.append(f"{name} missing")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, *mods, "cpus", os.cpu_count())
PY
  date -u '+%F %H:%M UTC' | tee -a "$out/device.txt"
}

part_data() {
  python3 -c 'import nvidia.dali' || { echo "DALI is not installed and no carried parts are complete: see DEVELOPERS.md"; return 3; }
  local data=${SIMMIM_JPEGS:-/tmp/simmim_jpegs}
  echo "== data: 8192 JPEGs, 500 px"
  [ -d "$data" ] || python3 benchmarks/bench_loader.py --make-jpegs "$data" --images 8192 --side 500
  echo "== correctness"
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_data_gpu.py tests/test_data_loader.py \
    tests/test_data_views.py tests/test_data_index.py tests/test_data_shards.py 2>&1 | grep -v '^libpng' | tee "$out/pytest.txt" | tail -n 15
  echo "== loader throughput"
  timeout 240 python3 benchmarks/bench_loader.py --data "$data" --backends dali dali_cpu torch synthetic \
    --size 192 --batch 128 --threads 8 --cpu-threads "$(nproc)" --epochs 2 --json "$out/loader.json" 2>&1 \
    | grep -v '^libpng' | tee "$out/loader.txt"
  timeout 60 python3 benchmarks/bench_loader.py --data "$data" --backends dali --size 192 --batch 128 --threads 8 \
    --epochs 2 --set data.dali_hw_decoder_load=0.9 --json "$out/loader_hw09.json" 2>&1 | grep -v '^libpng' \
    | tee -a "$out/loader.txt"
  timeout 120 python3 benchmarks/bench_loader.py --data "$data" --backends dali dali_cpu --layouts shards --size 192 \
    --batch 128 --threads 8 --cpu-threads "$(nproc)" --epochs 1 --json "$out/loader_shards.json" 2>&1 \
    | grep -v '^libpng' | tee -a "$out/loader.txt"
  echo "== train step: synthetic vs dali (Swin-B, 192 px, batch 128, bf16, compiled)"
  timeout 330 python3 benchmarks/bench_train_step.py --config configs/swin_b.json --data "$data" \
    --backends synthetic dali --batch 128 --threads 8 --steps 40 --warmup 15 --compile --json "$out/train.json" 2>&1 \
    | grep -v '^libpng' | tee "$out/train.txt" | tail -n 20
  python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(" ".join((out / "device.txt").read_text().split("\n")))
def load(name):
    p = out / name
    return json.loads(p.read_text())["results"] if p.exists() else []
print("loader, 500-px JPEGs -> 192 px, batch 128, masks + hand-off included:")
for r in (load("loader.json") + [dict(r, backend=r["backend"] + " (hw 0.9)") for r in load("loader_hw09.json")]
          + [dict(r, backend=r["backend"] + " (shards)") for r in load("loader_shards.json")]):
    note = "  target >= 15,000" if r["backend"].startswith("dali") and "cpu" not in r["backend"] else ""
    print(f"  {r['backend']:<16} threads {r['threads']:>3}  {r['img_per_s']:>9,.0f} img/s{note}")
rows = load("train.json")
print("SimMIM Swin-B step, 192 px, batch 128, bf16, torch.compile:")
base = next((r["ms_per_step"] for r in rows if r["backend"] == "synthetic"), None)
for r in rows:
    ratio = f"  x{r['ms_per_step'] / base:.3f} of synthetic" if base else ""
    print(f"  {r['backend']:<16} {r['ms_per_step']:8.1f} ms/step {r['img_per_s']:8,.0f} img/s{ratio}")
tail = [l for l in (out / "pytest.txt").read_text().splitlines() if " passed" in l or " failed" in l or "error" in l]
print("tests:", tail[-1] if tail else "no result")
EOF
}

part_engine() {
  local results="$out/engine_speed.jsonl" budget=${SIMMIM_PART_LIMIT_S:-470} start=$SECONDS
  : > "$results"
  python3 -c 'import deepspeed' 2>/dev/null || echo "DeepSpeed is missing (carry .device_pkgs/ds): DeepSpeed variants will fail"
  # variant <needed seconds> <engine_speed.py args...>: skipped when the budget cannot cover it
  variant() {
    local need=$1; shift
    local left=$((budget - (SECONDS - start) - 10))
    if [ "$left" -lt "$need" ]; then echo "SKIP (budget: ${left}s left, needs ~${need}s): $*"; return; fi
    echo "=== $* (t=$((SECONDS - start))s)"
    timeout "$left" python3 benchmarks/engine_speed.py --model "${MODEL:-swin_b}" --batch "${BATCH:-128}" --warmup 6 \
      --steps 30 --json "$results" "$@" 2>&1 | grep -E '^\{|Error|error:|Traceback|out of memory' | tail -5
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
}

part_tools() (
  set -e
  local dev=${DEVICE:-cuda} prec=${PREC:-bf16} cfg=configs/swin_tiny_cpu.json
  local ev="$out/eval_check"
  rm -rf "$ev"; mkdir -p "$ev"
  # labelled data: a synthetic 10-class ImageFolder (stripes of 10 frequencies), so nothing is downloaded
  python3 - "$ev/stripes" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, n in (("train", 48), ("val", 16)):
    for c in range(10):
        d = root / split / f"class{c}"; d.mkdir(parents=True)
        for i in range(n):
            y = np.arange(128)[:, None] * (c + 1) * np.pi / 64 + rng.uniform(0, 6.3)
            img = (127 + 100 * np.sin(y + np.zeros((1, 128))) + rng.normal(0, 20, (128, 128))).clip(0, 255)
            Image.fromarray(np.repeat(img[..., None], 3, 2).astype(np.uint8)).rotate(rng.uniform(-20, 20)).save(d / f"{i}.png")
PY
  local pre="$ev/pre"
  python3 train.py --config $cfg --output-dir "$pre" --data-path "$ev/stripes/train" --set engine.mode=torch \
    --set engine.precision=$prec --set train.max_steps=40 --set logging.visualize_every=20 --set logging.tensorboard=false
  echo "PASS pretrain ($prec, torch mode)"
  simmim() { python3 -m simmim_fast.cli "$@"; }
  simmim visualize "$pre" --images "$ev"/stripes/val/class3/0.png --combined "$ev/rec.png" && echo "PASS visualize"
  simmim export "$pre" -o "$ev/enc" --img-size 128 --window-size 8 && echo "PASS export (window 6 -> 8)"
  DEVICE=$dev python3 - "$ev/enc" <<'PY'
import contextlib, json, os, sys, timm, torch
dev = os.environ.get("DEVICE", "cuda")
info = json.load(open(sys.argv[1] + ".json"))
kw = {k: tuple(v) if isinstance(v, list) else v for k, v in info["model_kwargs"].items()}
m = timm.create_model(info["model_name"], pretrained=True, num_classes=0, **kw,
                      pretrained_cfg_overlay=dict(file=sys.argv[1] + ".safetensors", num_classes=0)).to(dev).eval()
amp = torch.autocast(dev, torch.bfloat16) if dev == "cuda" else contextlib.nullcontext()
with amp, torch.no_grad():
    y = m(torch.randn(4, 3, 128, 128, device=dev))
assert y.shape == (4, m.num_features) and torch.isfinite(y).all()
print(f"PASS timm strict load + forward on {dev}")
PY
  for tool in knn linear-probe; do
    simmim $tool "$pre" --data "$ev/stripes" --device $dev --json "$ev/$tool.json" --workers 2
    simmim $tool "$pre" --data "$ev/stripes" --device $dev --random-init --json "$ev/$tool.random.json" --workers 2
    echo "PASS $tool on $dev"
  done
  ft() { simmim finetune "$pre" --config $cfg --output-dir "$ev/$1" --workers 2 --set finetune.data="$ev/stripes" \
    --set finetune.num_classes=10 --set train.epochs=2 --set train.warmup_epochs=0 --set train.layer_decay=0.75 \
    --set train.base_lr=2e-2 --set finetune.auto_augment=null --set logging.tensorboard=false "${@:2}"; }
  ft ft_torch --set engine.mode=torch --set engine.precision=$prec && echo "PASS finetune torch $prec"
  if python3 -c "import deepspeed" 2>/dev/null; then
    ft ft_z1 --set engine.mode=deepspeed --set engine.zero_stage=1 --set engine.precision=$prec && echo "PASS finetune ZeRO-1"
    ft ft_z3 --set engine.mode=deepspeed --set engine.zero_stage=3 --set engine.precision=$prec && echo "PASS finetune ZeRO-3"
    python3 - "$ev" <<'PY'
import sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{d}/best/model.safetensors") for d in ("ft_z1", "ft_z3"))
assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), "ZeRO-3 best/ must hold full tensors"
print("PASS ZeRO-3 best/ has full tensors; max |z1 - z3| =", max((a[k] - b[k]).abs().max().item() for k in a))
PY
  else
    echo "SKIP finetune through DeepSpeed (deepspeed not importable here)"
  fi
  for f in "$ev"/*.json "$ev"/ft_*/best/metrics.json; do echo "$f: $(tr -d '\n' < "$f" | head -c 300)"; done
)

if [ -n "$part" ]; then  # one part, run by the loop below under its time limit
  "part_$part"
  exit $?
fi

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(data engine)
for p in "${parts[@]}"; do
  case $p in data|engine|tools) ;; *) echo "unknown part '$p' (data engine tools)"; exit 2;; esac
done
budget=${BUDGET_S:-540}
start=$SECONDS
packages
rc_all=0
for p in "${parts[@]}"; do
  left=$((budget - (SECONDS - start)))
  echo; echo "== [$((SECONDS - start)) s] $p: limit ${left} s"
  if [ "$left" -lt 60 ]; then echo "SKIP $p: time budget"; continue; fi
  SIMMIM_PART_LIMIT_S=$left timeout --kill-after=5 "$left" bash "$0" --part "$p" "$out"
  rc=$?
  echo "$p: exit $rc"
  [ $rc -eq 0 ] || rc_all=1
done
echo "total $((SECONDS - start)) s"
exit $rc_all
