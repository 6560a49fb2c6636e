"""Does the loader keep up with training? SimMIM step time with real data vs synthetic tensors.

    python benchmarks/bench_train_step.py --config configs/swin_b.json --data /tmp/jpegs \
        --backends synthetic dali --batch 128 --steps 40 --compile --json train.json

A plain PyTorch step (bf16 autocast on CUDA, fused AdamW, no gradient clipping, no DeepSpeed), so
the only difference between the rows is where the batch comes from: 'synthetic' (random tensors
already on the device) or a real loader backend reading ``--data``. If the loader keeps up, the
real-data step time equals the synthetic one. One model (compiled once with --compile) serves
every backend; each row runs its warm-up steps first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simmim_fast import SimMIM, load_config  # noqa: E402
from simmim_fast.data import PretrainLoader  # noqa: E402


def run(model, opt, loader, device: str, warmup: int, steps: int, amp: bool) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    done, epoch, start = 0, 0, None
    while done < warmup + steps:
        for images, mask in loader.epoch(epoch):
            if done == warmup:
                sync()
                start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = model(images, mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done >= warmup + steps:
                break
        epoch += 1
    sync()
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
            "img_per_s": steps * loader.batch_size / seconds, "loss": float(loss.detach())}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/swin_b.json"))
    p.add_argument("--data", type=Path, required=True, help="folder of images for the real-data rows")
    p.add_argument("--backends", nargs="+", default=["synthetic", "dali"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=8, help="data.num_workers")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = [f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
            f"data.path={json.dumps(str(args.data))}", f"data.num_workers={args.threads}",
            "data.synthetic_samples=1048576"] + args.set
    cfg = load_config(args.config, overrides=base)
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device == "cuda")
    step_model = torch.compile(model) if args.compile else model
    rows, failed = [], 0
    for backend in args.backends:
        try:
            loader = PretrainLoader(load_config(args.config, overrides=base + [f"data.backend={backend}"]),
                                           device=device)
            try:
                r = run(step_model, opt, loader, device, args.warmup, args.steps, amp=device == "cuda")
            finally:
                loader.close()
        except Exception as e:  # noqa: BLE001 - report it and still measure the other backends
            print(f"{backend:>10}  failed: {type(e).__name__}: {e}", flush=True)
            failed += 1
            continue
        r.update(backend=backend, batch=args.batch, compile=args.compile,
                 device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        rows.append(r)
        print(f"{backend:>10}  {r['ms_per_step']:8.1f} ms/step  {r['img_per_s']:8.0f} img/s  "
              f"(batch {args.batch}, {args.steps} steps, compile {args.compile}, loss {r['loss']:.3f})", flush=True)
        if args.json:  # after every row, so a later failure or timeout keeps what was measured
            args.json.write_text(json.dumps({"config": args.config, "results": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
