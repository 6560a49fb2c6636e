#!/usr/bin/env bash
# GPU check of the after-pretraining tools (visualize, export, knn, linear-probe, finetune): the CUDA and
# bf16 paths the CPU suite cannot reach. Needs the engine (simmim_fast.engine); the DeepSpeed parts run
# only where deepspeed imports. Labelled data: a synthetic 10-class ImageFolder made here (stripes of
# 10 frequencies), so nothing is downloaded. Prints PASS/FAIL lines; exits non-zero on the first failure.
#   bash scripts/gpu_check_eval.sh                    # on the GPU machine (DEVICE=cuda PREC=bf16)
#   DEVICE=cpu PREC=fp32 bash scripts/gpu_check_eval.sh   # the same steps on a CPU (slow; a dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEVICE=${DEVICE:-cuda}; PREC=${PREC:-bf16}
out=${OUT:-/tmp/simmim_eval_gpu}/eval_check; rm -rf "$out"; mkdir -p "$out"
python - "$out/stripes" <<'PY'
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
cfg=configs/swin_tiny_cpu.json
pre="$out/pre"
python train.py --config $cfg --output-dir "$pre" --data-path "$out/stripes/train" --set engine.mode=torch \
  --set engine.precision=$PREC --set train.max_steps=40 --set logging.visualize_every=20 --set logging.tensorboard=false
echo "PASS pretrain ($PREC, torch mode)"
simmim() { python -m simmim_fast.cli "$@"; }
simmim visualize "$pre" --images "$out"/stripes/val/class3/0.png --combined "$out/rec.png" && echo "PASS visualize"
simmim export "$pre" -o "$out/enc" --img-size 128 --window-size 8 && echo "PASS export (window 6 -> 8)"
DEVICE=$DEVICE python - "$out/enc" <<'PY'
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
  simmim $tool "$pre" --data "$out/stripes" --device $DEVICE --json "$out/$tool.json" --workers 2
  simmim $tool "$pre" --data "$out/stripes" --device $DEVICE --random-init --json "$out/$tool.random.json" --workers 2
  echo "PASS $tool on $DEVICE"
done
ft() { simmim finetune "$pre" --config $cfg --output-dir "$out/$1" --workers 2 --set finetune.data="$out/stripes" \
  --set finetune.num_classes=10 --set train.epochs=2 --set train.warmup_epochs=0 --set train.layer_decay=0.75 \
  --set train.base_lr=2e-2 --set finetune.auto_augment=null --set logging.tensorboard=false "${@:2}"; }
ft ft_torch --set engine.mode=torch --set engine.precision=$PREC && echo "PASS finetune torch $PREC"
if python -c "import deepspeed" 2>/dev/null; then
  ft ft_z1 --set engine.mode=deepspeed --set engine.zero_stage=1 --set engine.precision=$PREC && echo "PASS finetune ZeRO-1"
  ft ft_z3 --set engine.mode=deepspeed --set engine.zero_stage=3 --set engine.precision=$PREC && echo "PASS finetune ZeRO-3"
  python - "$out" <<'PY'
import sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{d}/best/model.safetensors") for d in ("ft_z1", "ft_z3"))
assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), "ZeRO-3 best/ must hold full tensors"
print("PASS ZeRO-3 best/ has full tensors; max |z1 - z3| =", max((a[k] - b[k]).abs().max().item() for k in a))
PY
else
  echo "SKIP finetune through DeepSpeed (deepspeed not importable here)"
fi
for f in "$out"/*.json "$out"/ft_*/best/metrics.json; do echo "$f: $(tr -d '\n' < "$f" | head -c 300)"; done
