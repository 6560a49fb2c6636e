"""Loader throughput (images/s) per backend on a folder of JPEGs, masks and hand-off to torch included;
the same images as WebDataset shards (`simmim-fast shard`), and a multispectral case (4-band uint16 TIFFs,
torch backend, model.in_chans 4).

As a pytest-benchmark suite (tiny, CPU):   pytest benchmarks/bench_loader.py
As a script (the GPU check uses this):
    python benchmarks/bench_loader.py --make-jpegs /tmp/jpegs --images 8192          # 500-px JPEGs
    python benchmarks/bench_loader.py --data /tmp/jpegs --backends dali dali_cpu torch synthetic \
        --size 192 --batch 128 --threads 8 --cpu-threads 16 --layouts folder shards --json loader.json
    python benchmarks/bench_loader.py --multispectral 4 --images 1024 --layouts folder shards   # TIFF tiles

The JPEGs are random crops and resizes of the photos scikit-image ships, re-encoded at quality 90,
with the longer side 500 px. A measurement runs one warm-up pass, then times whole epochs; on a GPU
it synchronises before reading the clock, so queued work is counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simmim_fast import load_config  # noqa: E402
from simmim_fast.data import PretrainLoader  # noqa: E402
from simmim_fast.data.files import list_images  # noqa: E402
from simmim_fast.data.samples import sample_photo_paths  # noqa: E402
from simmim_fast.data.shard import write_shards  # noqa: E402


def _one_jpeg(args) -> None:
    i, sources, out, side, seed = args
    from PIL import Image
    rng = np.random.default_rng([seed, i])
    with Image.open(sources[i % len(sources)]) as im:
        im = im.convert("RGB")
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    scale = side / max(cw, ch)
    im = im.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    if rng.uniform() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    sub = out / f"class_{i % 10}"
    sub.mkdir(parents=True, exist_ok=True)
    im.save(sub / f"{i:06d}.jpg", quality=90)


def make_jpegs(out: Path, n: int, side: int = 500, seed: int = 0, workers: Optional[int] = None) -> Path:
    """An ImageFolder tree of ``n`` JPEGs, the longer side ``side`` px, cut from the sample photos."""
    sources = [str(p) for p in sample_photo_paths()]
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, sources, out, side, seed) for i in range(n)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and n > 64:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_one_jpeg, jobs, chunksize=64))
    else:
        for j in jobs:
            _one_jpeg(j)
    return out


def make_tiffs(out: Path, n: int, side: int = 256, bands: int = 4, seed: int = 0) -> Path:
    """A flat folder of ``n`` ``bands``-band uint16 TIFF tiles, ``side`` x ``side`` px (smooth random fields)."""
    import tifffile
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        f = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y) + rng.uniform(0, 6))
             for _ in range(bands)]
        a = ((np.stack(f, -1) + 1) / 2 * 60000 + rng.integers(0, 5000, (side, side, bands))).astype(np.uint16)
        tifffile.imwrite(out / f"{i:06d}.tif", a, photometric="minisblack", planarconfig="contig")
    return out


def make_shards(data: Path, out: Path, shard_mb: float = 64) -> Path:
    """``data`` as WebDataset shards in ``out`` (the same samples in the same order)."""
    write_shards(list_images(str(data)), out, int(shard_mb * 2 ** 20), root=data, source=str(data))
    return out


def loader_config(data: Path, backend: str, size: int, batch: int, threads: int, cache_dir: Path,
                  extra: List[str] = (), in_chans: int = 3):
    # A Swin-B geometry at ``size`` px (masks: 32-px patches, 4-px tokens), as pretraining uses.
    bands = {} if in_chans == 3 else {"mean": [0.5] * in_chans, "std": [0.25] * in_chans}
    return load_config({"model": {"img_size": size, "in_chans": in_chans}, "mask": {"mask_patch_size": 32},
                        "data": {"backend": backend, "path": str(data), "num_workers": threads,
                                 "cache_dir": str(cache_dir), "synthetic_samples": 1 << 20, **bands},
                        "train": {"micro_batch_size": batch, "global_batch_size": batch}}, overrides=list(extra))


def measure(cfg, device: str, epochs: int = 1, warmup_steps: int = 4, max_steps: Optional[int] = None) -> Dict:
    """Images/s of the loader over ``epochs`` timed epochs (or ``max_steps`` steps) after a warm-up."""
    loader = PretrainLoader(cfg, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    steps_per_epoch = loader.micro_batches_per_epoch if max_steps is None else min(max_steps, loader.micro_batches_per_epoch)
    try:
        for i, _ in enumerate(loader.epoch(0)):  # warm-up: pipeline build, workers, page cache, allocator
            if i + 1 >= min(warmup_steps, steps_per_epoch):
                break
        sync()
        images = 0
        start = time.perf_counter()
        for e in range(1, epochs + 1):
            for i, (x, m) in enumerate(loader.epoch(e)):
                images += x.shape[0]
                if i + 1 >= steps_per_epoch:
                    break
        sync()
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds,
            "ms_per_batch": 1000 * seconds / max(1, images // cfg.train.micro_batch_size)}


# -------------------------------------------------------------------------------------------------
# pytest-benchmark suite: tiny, CPU only (DALI's GPU backend is measured by the script on a GPU)

def _bench_backends() -> List[str]:
    out = ["torch", "dali_cpu", "synthetic"]
    return out + (["dali"] if torch.cuda.is_available() else [])


try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def jpeg_folder(tmp_path_factory):
        return make_jpegs(tmp_path_factory.mktemp("jpegs"), 32, side=500, workers=1)

    @pytest.fixture(scope="module")
    def jpeg_shards(jpeg_folder, tmp_path_factory):
        return make_shards(jpeg_folder, tmp_path_factory.mktemp("jpeg_shards") / "s", shard_mb=0.2)

    @pytest.fixture(scope="module")
    def tiff_folder(tmp_path_factory):
        return make_tiffs(tmp_path_factory.mktemp("tiffs"), 32, side=128)

    @pytest.mark.parametrize("layout", ["folder", "shards"])
    @pytest.mark.parametrize("backend", _bench_backends())
    def test_loader_throughput(benchmark, backend, layout, jpeg_folder, jpeg_shards, tmp_path):
        if backend == "synthetic" and layout == "shards":
            pytest.skip("synthetic reads no files")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        data = jpeg_folder if layout == "folder" else jpeg_shards
        cfg = loader_config(data, backend, 96, 8, 2, tmp_path / "cache")
        result = benchmark.pedantic(lambda: measure(cfg, device, epochs=1, warmup_steps=1, max_steps=4), rounds=2,
                                    iterations=1)
        benchmark.extra_info.update({k: round(v, 2) for k, v in result.items()})
        assert result["images"] == 32

    @pytest.mark.parametrize("layout", ["folder", "shards"])
    def test_multispectral_throughput(benchmark, layout, tiff_folder, tmp_path):
        data = tiff_folder if layout == "folder" else make_shards(tiff_folder, tmp_path / "s", shard_mb=0.5)
        cfg = loader_config(data, "torch", 64, 8, 2, tmp_path / "cache", in_chans=4)
        result = benchmark.pedantic(lambda: measure(cfg, "cpu", epochs=1, warmup_steps=1, max_steps=4), rounds=2,
                                    iterations=1)
        benchmark.extra_info.update({k: round(v, 2) for k, v in result.items()})
        assert result["images"] == 32


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-jpegs", type=Path, metavar="DIR", help="write --images 500-px JPEGs to DIR and exit")
    p.add_argument("--data", type=Path, help="folder of images to load (default: make --images JPEGs in a temp dir)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--side", type=int, default=500, help="longer side of the generated JPEGs")
    p.add_argument("--backends", nargs="+", default=["dali", "dali_cpu", "torch", "synthetic"])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=8, help="DALI threads for backend 'dali'")
    p.add_argument("--cpu-threads", type=int, default=os.cpu_count(),
                   help="DALI threads ('dali_cpu') and DataLoader workers ('torch')")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--layouts", nargs="+", choices=["folder", "shards"], default=["folder"],
                   help="read the images from the folder and/or from WebDataset shards of it (default folder)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="shard size for --layouts shards")
    p.add_argument("--multispectral", type=int, metavar="C", default=0,
                   help="instead of JPEGs: --images C-band uint16 TIFF tiles of --side px (torch backend only)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.make_jpegs:
        t = time.perf_counter()
        make_jpegs(args.make_jpegs, args.images, args.side)
        print(f"wrote {args.images} JPEGs ({args.side} px) to {args.make_jpegs} in {time.perf_counter() - t:.1f} s")
        return 0
    tmp = tempfile.TemporaryDirectory()
    c = args.multispectral or 3
    if args.multispectral:
        data = args.data or make_tiffs(Path(tmp.name) / "tiffs", args.images, args.side, bands=c)
        backends = [b for b in args.backends if b == "torch"] or ["torch"]  # the DALI backends read RGB only
    else:
        data = args.data or make_jpegs(Path(tmp.name) / "jpegs", args.images, args.side)
        backends = args.backends
    sources = {"folder": data}
    if "shards" in args.layouts:
        t = time.perf_counter()
        sources["shards"] = make_shards(data, Path(tmp.name) / "shards", args.shard_mb)
        print(f"sharded {data} in {time.perf_counter() - t:.1f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, failed = [], 0
    n_files = len(list_images(str(data)))
    for layout in args.layouts:
        for backend in backends:
            if backend == "dali" and device != "cuda":
                print("skip dali: no CUDA device")
                continue
            if backend == "synthetic" and layout == "shards":
                continue
            threads = args.threads if backend == "dali" else args.cpu_threads
            cfg = loader_config(sources[layout], backend, args.size, args.batch, threads, Path(tmp.name) / "cache",
                                args.set, in_chans=c)
            try:
                r = measure(cfg, device, epochs=args.epochs,
                            max_steps=(n_files // args.batch or None) if backend == "synthetic" else None)
            except Exception as e:  # noqa: BLE001 - report it and still measure the other backends
                print(f"{backend:>10} {layout:>6}  failed: {type(e).__name__}: {e}", flush=True)
                failed += 1
                continue
            r.update(backend=backend, layout=layout, in_chans=c, threads=threads,
                     device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
            rows.append(r)
            print(f"{backend:>10} {layout:>6} C={c}  threads {threads:>3}  {r['img_per_s']:>9.0f} img/s  "
                  f"{r['ms_per_batch']:>7.2f} ms/batch ({r['images']} images, {r['seconds']:.2f} s)", flush=True)
            if args.json:  # after every row, so a later failure or timeout keeps what was measured
                args.json.write_text(json.dumps({"size": args.size, "batch": args.batch, "images": args.images,
                                                 "data": str(data), "results": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
