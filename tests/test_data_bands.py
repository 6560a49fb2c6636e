"""Vertical flips, 90-degree turns and data.value_range in the torch backend, the same value space in
`stats`, files with the wrong channel count unusable (index, scan, loader), and clear DALI refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import load_config
from simmim_fast.cli import main as cli
from simmim_fast.data.index import BAD
from simmim_fast.data.loader import PretrainLoader, load_index
from simmim_fast.errors import UserError

tifffile = pytest.importorskip("tifffile")


def _cfg(path, tmp_path, c, **data):
    d = {"backend": "torch", "path": str(path), "num_workers": 0, "cache_dir": str(tmp_path / "cache"),
         "mean": [0.5] * c, "std": [0.25] * c, "max_skipped_fraction": 1.0}
    d.update(data)
    return load_config({"model": dict(encoder="swin", img_size=32, patch_size=4, in_chans=c, embed_dim=16,
                                      depths=[1, 1], num_heads=[1, 2], window_size=4),
                        "mask": {"mask_patch_size": 8, "mask_ratio": 0.6}, "data": d,
                        "train": {"micro_batch_size": 4, "global_batch_size": 4, "seed": 5}})


def _epoch(cfg, epoch=0):
    loader = PretrainLoader(cfg)
    return [x.clone() for x, _ in loader.epoch(epoch)], loader


@pytest.fixture(scope="module")
def tiles12(tmp_path_factory):
    """8 four-band 12-bit tiles stored as uint16 (values 0..4095), 40 x 48 px."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(8):
        tifffile.imwrite(root / f"t{i}.tif", rng.integers(0, 4096, (40, 48, 4), dtype=np.uint16),
                         photometric="minisblack", planarconfig="contig")
    return root


def test_vflip_and_rot90_turn_every_band_and_keep_the_crops(tiles12, tmp_path):
    plain, lp = _epoch(_cfg(tiles12, tmp_path, 4))
    turned, lt = _epoch(_cfg(tiles12, tmp_path, 4, vflip_prob=0.5, rot90=True))
    ks, flips = [], []
    for step, (a, b) in enumerate(zip(plain, turned)):
        vp, vt = lp.plan(0, step).views, lt.plan(0, step).views
        for f in ("top", "left", "height", "width", "flip"):  # crops and horizontal flips unchanged
            assert np.array_equal(getattr(vp, f), getattr(vt, f))
        for j in range(a.shape[0]):
            vflip, k = vt.turns(j)
            ks.append(k)
            flips.append(vflip)
            want = a[j].flip(-2) if vflip else a[j]
            assert torch.equal(b[j], torch.rot90(want, k, dims=(-2, -1)))
    assert len(set(ks)) >= 3 and any(flips) and not all(flips)
    again, _ = _epoch(_cfg(tiles12, tmp_path, 4, vflip_prob=0.5, rot90=True))
    assert all(torch.equal(x, y) for x, y in zip(turned, again))  # seeded


def test_value_range_maps_lo_hi_to_0_1_and_stats_use_it(tiles12, tmp_path, capsys):
    default, _ = _epoch(_cfg(tiles12, tmp_path, 4, mean=[0.0] * 4, std=[1.0] * 4))
    mapped, _ = _epoch(_cfg(tiles12, tmp_path, 4, mean=[0.0] * 4, std=[1.0] * 4, value_range=[0, 4095]))
    for a, b in zip(default, mapped):  # raw / 65535 vs raw / 4095, through the same crop-resize
        torch.testing.assert_close(b, a * (65535 / 4095), rtol=1e-5, atol=1e-5)
    assert max(float(b.max()) for b in mapped) > 0.95
    raw = np.stack([tifffile.imread(p) for p in sorted(tiles12.glob("*.tif"))]).astype(np.float64)
    assert cli(["stats", str(tiles12), "--in-chans", "4", "--json", "--set", "data.value_range=[0,4095]",
                "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'c'))}"]) == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(out["mean"], (raw / 4095).mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(out["std"], (raw / 4095).std(axis=(0, 1, 2)), atol=1e-6)
    with pytest.raises(Exception, match="data.value_range"):
        _cfg(tiles12, tmp_path, 4, value_range=[10, 10])


def test_a_file_with_another_channel_count_is_unusable(tiles12, tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    for p in sorted(tiles12.glob("*.tif"))[:4]:
        (root / p.name).write_bytes(p.read_bytes())
    tifffile.imwrite(root / "x3.tif", np.zeros((40, 48, 3), np.uint16), photometric="rgb")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "rgb.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "grey.png")
    np.save(root / "five.npy", np.zeros((5, 40, 48), np.float32))
    index = load_index(_cfg(root, tmp_path, 4))
    reasons = {index.paths[i].name: index.reasons[int(i)] for i in index.bad}
    assert reasons == {"rgb.png": "3 channels, model.in_chans is 4", "grey.png": "1 channels, model.in_chans is 4",
                       "x3.tif": "array of shape (40, 48, 3) has no axis of 4 channels (model.in_chans)",
                       "five.npy": "array of shape (5, 40, 48) has no axis of 4 channels (model.in_chans)"}
    assert cli(["scan", str(root), "--set", "model.in_chans=4", "--set", "data.mean=[0,0,0,0]",
                "--set", "data.std=[1,1,1,1]", "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'c'))}",
                "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "would skip: 4" in out and "rgb.png: 3 channels, model.in_chans is 4" in out
    # the same folder for 1 channel: only the greyscale PNG is usable
    index1 = load_index(_cfg(root, tmp_path, 1))
    assert [index1.paths[i].name for i in range(len(index1)) if index1.status[i] != BAD] == ["grey.png"]
    # the loader never feeds them: every slot of theirs reads a stand-in
    loader = PretrainLoader(_cfg(root, tmp_path, 4, max_skipped_fraction=0.6))
    batch = next(iter(loader.epoch(0)))[0]
    assert batch.shape == (4, 4, 32, 32)
    files = loader.plan(0, 0).files
    assert not any(loader.planner.resolver.is_bad[files])


def test_rgb_npy_on_the_torch_backend_and_dali_refusals(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        np.save(root / f"a{i}.npy", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cfg = _cfg(root, tmp_path, 3, mean=[0.0] * 3, std=[1.0] * 3, crop_scale=[1.0, 1.0], crop_ratio=[1.2, 1.2],
               hflip_prob=0.0)
    x = next(iter(PretrainLoader(cfg).epoch(0)))[0]
    assert x.shape == (4, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    pytest.importorskip("nvidia.dali")
    with pytest.raises(UserError, match=r"arrays the DALI decoders cannot read.*data\.backend 'torch'"):
        PretrainLoader(_cfg(root, tmp_path, 3, backend="dali_cpu"))
    for extra, what in ((dict(vflip_prob=0.5), "data.vflip_prob"), (dict(rot90=True), "data.rot90"),
                        (dict(value_range=[0, 255]), "data.value_range")):
        with pytest.raises(UserError, match=what + r".*data\.backend 'torch'"):
            PretrainLoader(_cfg(root, tmp_path, 3, backend="dali_cpu", **extra))
