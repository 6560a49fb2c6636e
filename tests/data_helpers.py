"""Datasets the data tests build on the fly: real photos (scikit-image's), bad files, colour-coded files."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from simmim_fast import load_config
from simmim_fast.data.samples import sample_photo_dir

ROOT = Path(__file__).resolve().parents[1]

# Real photographs shipped by scikit-image (colour and greyscale), written as JPEG and PNG.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
          "brick.png", "moon.png", "hubble_deep_field.jpg", "retina.jpg", "grass.png", "coins.png")


def photo(name: str, max_side: int = 320) -> Image.Image:
    """A scikit-image sample photo, shrunk so that tests decode fast."""
    with Image.open(sample_photo_dir() / name) as im:
        im.load()
        im.thumbnail((max_side, max_side), Image.BILINEAR)
        return im.copy()


def make_photo_tree(root: Path, n: int = 12, max_side: int = 320) -> List[Path]:
    """An ImageFolder tree (two class folders) of n real photos, alternately JPEG and PNG."""
    paths = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        d = root / ("class_a" if i % 2 else "class_b")
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:03d}_{Path(name).stem}.{'jpg' if i % 3 else 'png'}"
        im = photo(name, max_side)
        if p.suffix == ".jpg":
            im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(p, quality=90)
        else:
            im.save(p)
        paths.append(p)
    return sorted(paths)


def _png16_rgb(path: Path, rgb8: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    a = rgb8.astype(np.uint16) * 257
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_odd_files(root: Path) -> Dict[str, Path]:
    """Files a real dataset holds: broken ones (skipped) and odd but decodable ones (converted).

    Returns name -> path; names starting with 'bad_' must be skipped, 'deep_' pass the header
    check but fail to decode, the others must be used.
    """
    root.mkdir(parents=True, exist_ok=True)
    cat = photo("chelsea.png").convert("RGB")
    grey = photo("camera.png")
    out: Dict[str, Path] = {}

    def path(name: str) -> Path:
        out[name.split(".")[0]] = root / name
        return root / name
    cat.save(path("ok_reference.jpg"), quality=90)
    jpeg = path("ok_reference.jpg").read_bytes()
    path("bad_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    path("bad_empty.jpg").write_bytes(b"")
    path("bad_text.png").write_text("this is not an image\n")
    dht = bytearray(jpeg)  # wreck the Huffman table: the header still parses, decoding fails
    k = dht.find(b"\xff\xc4")
    dht[k + 5:k + 25] = b"\xff" * 20
    path("deep_huffman.jpg").write_bytes(bytes(dht))
    cat.save(path("ok_cat.png"))
    png = bytearray(path("ok_cat.png").read_bytes())
    k = png.find(b"IDAT")
    png[k + 100:k + 400] = b"\x11" * 300
    path("deep_idat.png").write_bytes(bytes(png))
    rgba = cat.convert("RGBA")
    alpha = np.full((cat.height, cat.width), 255, np.uint8)
    alpha[:, : cat.width // 2] = 0  # half transparent: both backends must drop alpha the same way
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(path("ok_rgba.png"))
    grey.save(path("ok_grey.png"))
    grey.save(path("ok_grey.jpg"), quality=90)
    cat.convert("CMYK").save(path("ok_cmyk.jpg"), quality=95)
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(path("ok_grey16.png"))
    _png16_rgb(path("ok_rgb16.png"), np.asarray(cat))
    cat.resize((20, 20), Image.BILINEAR).save(path("ok_small.jpg"), quality=90)
    cat.convert("P", palette=Image.ADAPTIVE).save(path("ok_palette.png"))
    cat.save(path("ok_anim.gif"))
    return out


def make_colour_files(root: Path, n: int) -> List[Path]:
    """n flat-colour PNGs whose colour encodes the file number (read back by colour_ids)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{i:03d}.png"
        Image.new("RGB", (40 + 3 * i, 30 + 2 * i), (10 * i, 255 - 10 * i, 128)).save(p)
        paths.append(p)
    return paths


def colour_ids(images, mean, std) -> List[int]:
    """The file numbers of batches of flat-colour images made by make_colour_files."""
    import torch
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    red = ((images.float().cpu() * s + m) * 255).mean(dim=(2, 3))[:, 0]
    return [int(round(v / 10)) for v in red.tolist()]


def data_config(path, tmp_path: Path, backend: str = "torch", batch: int = 4, **data):
    """The tiny CPU config on ``path`` with a given backend; the index cache stays in tmp_path."""
    d = dict(backend=backend, path=None if path is None else str(path), num_workers=0 if backend == "torch" else 2,
             cache_dir=str(tmp_path / "cache"))
    d.update(data)
    overrides = [f"data.{k}={_json(v)}" for k, v in d.items()] + [
        f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", "train.seed=3"]
    return load_config(ROOT / "configs/swin_tiny_cpu.json", overrides=overrides)


def _json(v) -> str:
    import json
    return json.dumps(v)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
