"""The loader interface with the 'torch' and 'dali_cpu' backends: shapes, determinism, resume, sharding,
agreement between backends, bad files; and the 'synthetic' backend."""
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from data_helpers import colour_ids, data_config, make_colour_files, make_odd_files, make_photo_tree, photo
from simmim_fast.data import PretrainLoader, epoch_order, list_images

BACKENDS = ["torch", "dali_cpu"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_tree(root, 12)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """12 photos and 16 odd files (3 bad, 2 that only a full decode finds bad, 11 odd but usable)."""
    root = tmp_path_factory.mktemp("mixed")
    make_photo_tree(root, 12)
    odd = make_odd_files(root / "odd")
    return root, odd


def _epoch(cfg, epoch=0, start_batch=0, **kw):
    loader = PretrainLoader(cfg, **kw)
    try:
        return [(x.clone(), m.clone()) for x, m in loader.epoch(epoch, start_batch)], loader
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_ranges(backend, photos, tmp_path):
    batches, loader = _epoch(data_config(photos, tmp_path, backend))
    assert loader.micro_batches_per_epoch == 3 and loader.num_samples == 12 and len(batches) == 3
    for images, mask in batches:
        assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert mask.shape == (4, 24, 24) and mask.dtype == torch.uint8
        assert (mask.flatten(1).sum(1) == 22 * 16).all()
        # normalised ImageNet range: (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225
        assert images.min() >= -2.12 and images.max() <= 2.65 and images.std() > 0.3
        assert images.flatten(1).std(1).min() > 0.05  # every sample is a real image, not padding
    for dtype in ("float16", "bfloat16"):
        low, _ = _epoch(data_config(photos, tmp_path, backend, output_dtype=dtype))
        assert low[0][0].dtype == getattr(torch, dtype)
        assert (low[0][0].float() - batches[0][0]).abs().max() < 0.02
        assert torch.equal(low[0][1], batches[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_resumable(backend, photos, tmp_path):
    cfg = data_config(photos, tmp_path, backend, batch=2)
    full, _ = _epoch(cfg, epoch=1)
    resumed, _ = _epoch(cfg, epoch=1, start_batch=4)
    assert len(full) == 6 and len(resumed) == 2
    for (ia, ma), (ib, mb) in zip(full[4:], resumed):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    other, _ = _epoch(cfg, epoch=2)
    assert not torch.equal(full[0][0], other[0][0])
    loader = PretrainLoader(cfg)
    for _ in zip(range(2), loader.epoch(5)):  # an epoch abandoned with batches in flight ...
        pass
    again = [x for x, _ in loader.epoch(1)]  # ... leaves the next one unaffected
    assert all(torch.equal(a, b) for a, b in zip(again, (x for x, _ in full)))
    assert list(loader.epoch(1, start_batch=6)) == []
    first = loader.epoch(1)
    assert torch.equal(next(first)[0], full[0][0])
    second = [x for x, _ in loader.epoch(1, start_batch=3)]  # a second iterator while the first is open
    assert all(torch.equal(a, b) for a, b in zip(second, (x for x, _ in full[3:])))
    if backend == "torch":  # independent DataLoaders: the first goes on
        assert torch.equal(next(first)[0], full[1][0])
    else:  # one DALI pipeline: the newer iterator took it over
        with pytest.raises(RuntimeError, match="superseded by a later loader.epoch"):
            next(first)
    loader.close()


def test_backends_agree(mixed, tmp_path):
    """Same samples, same stand-ins, same crops and flips: the images differ only by resampling details."""
    root, _ = mixed
    out = {b: _epoch(data_config(root, tmp_path, b, max_skipped_fraction=0.5), epoch=3) for b in BACKENDS}
    (tb, tl), (db, dl) = out["torch"], out["dali_cpu"]
    for step, ((ti, tm), (di, dm)) in enumerate(zip(tb, db)):
        assert np.array_equal(tl.plan(3, step).files, dl.plan(3, step).files)
        assert torch.equal(tm, dm)
        per_image = (ti - di).abs().flatten(1).mean(1)
        assert per_image.max() < 0.02, (step, per_image)
    skipped = [[(r["batch"], r["path"], r["stand_in"]) for r in loader.stats()["epochs"][3]["files"]]
               for loader in (tl, dl)]
    assert skipped[0] == skipped[1] and len(skipped[0]) == 5


def test_mean_std_of_one_image_agree(tmp_path):
    """Many views of one photo: per-channel output mean/std match across backends and the whole image's."""
    root = tmp_path / "one"
    root.mkdir()
    im = photo("coffee.png").convert("RGB")
    for i in range(8):
        im.save(root / f"{i}.jpg", quality=95)
    stats = {}
    for b in BACKENDS:
        loader = PretrainLoader(data_config(root, tmp_path, b))
        x = torch.cat([x for e in range(3) for x, _ in loader.epoch(e)])
        stats[b] = (x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
    whole = (torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    assert (stats["torch"][0] - stats["dali_cpu"][0]).abs().max() < 0.01
    assert (stats["torch"][1] - stats["dali_cpu"][1]).abs().max() < 0.01
    assert (stats["torch"][0] - whole.mean(dim=(1, 2))).abs().max() < 0.15
    assert (stats["torch"][1] - whole.std(dim=(1, 2))).abs().max() < 0.1


@pytest.mark.parametrize("backend,workers", [("torch", 2), ("dali_cpu", 2)])
def test_bad_files_skipped_counted_and_logged(backend, workers, mixed, tmp_path, caplog):
    root, odd = mixed
    cfg = data_config(root, tmp_path, backend, num_workers=workers, max_skipped_fraction=0.5)
    caplog.set_level(logging.INFO, logger="simmim_fast.data")
    loader = PretrainLoader(cfg, log_dir=tmp_path / "run")
    assert loader.num_samples == 28 and loader.micro_batches_per_epoch == 7
    for epoch in (0, 1):
        batches = [x for x, _ in loader.epoch(epoch)]
        assert len(batches) == 7 and all(torch.isfinite(x).all() and x.shape[0] == 4 for x in batches)
        rec = loader.stats()["epochs"][epoch]
        skipped = {r["path"]: r["reason"] for r in rec["files"]}
        expected = {str(p) for n, p in odd.items() if n.startswith(("bad_", "deep_"))}
        assert rec["skipped"] == 5 and set(skipped) == expected
        assert "truncated JPEG" in skipped[str(odd["bad_truncated"])]
        assert "corrupt JPEG data" in skipped[str(odd["deep_huffman"])]  # the index's JPEG stream check
        assert "decode failed" in skipped[str(odd["deep_idat"])]
        assert not {r["stand_in"] for r in rec["files"]} & expected
    assert loader.stats()["unusable_files"] == 5
    assert "epoch 1 rank 0 (whole epoch): 5 undecodable files skipped" in caplog.text
    assert "4 of 28 files cannot be used" in caplog.text  # the index knew 4; decoding found 1 more
    log = (tmp_path / "run" / "data_skipped_rank0.tsv").read_text().splitlines()
    assert log[0].startswith("epoch\tbatch\tpath") and len(log) == 1 + 2 * 5
    assert len((tmp_path / "run" / "data_bad_files.tsv").read_text().splitlines()) == 1 + 4
    resumed, _ = _epoch(cfg, epoch=1, start_batch=3)  # a fresh loader finds the same bad files, same batches
    assert all(torch.equal(a, b) for a, b in zip(batches[3:], (x for x, _ in resumed)))
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharding_covers_each_file_once(backend, tmp_path):
    make_colour_files(tmp_path / "colours", 17)
    cfg = data_config(tmp_path / "colours", tmp_path, backend, batch=2)
    seen = []
    for rank in range(2):
        loader = PretrainLoader(cfg, rank=rank, world_size=2)
        assert loader.micro_batches_per_epoch == 4
        for step, (x, _) in enumerate(loader.epoch(1)):
            ids = colour_ids(x, MEAN, STD)
            assert ids == loader.plan(1, step).files.tolist()
            seen += ids
    assert len(seen) == len(set(seen)) == 16  # 17 files, 2 ranks x 4 steps x 2: one left out this epoch
    assert set(seen) == set(epoch_order(17, 3, 1, 0, 2, 2) + epoch_order(17, 3, 1, 1, 2, 2))


def test_epoch_order_shards():
    n = len(list_images(None))
    orders = [epoch_order(n, 0, 5, r, 2, 3) for r in range(2)]
    assert len(orders[0]) == len(orders[1]) and len(orders[0]) % 3 == 0
    assert not set(orders[0]) & set(orders[1])
    assert len(set(orders[0]) | set(orders[1])) == (n // 2) // 3 * 3 * 2
    assert orders != [epoch_order(n, 0, 6, r, 2, 3) for r in range(2)]


def test_synthetic_backend_and_mask_distribution(tmp_path):
    cfg = data_config(None, tmp_path, "synthetic", batch=8, synthetic_samples=801)
    loader = PretrainLoader(cfg, rank=1, world_size=2)
    assert loader.micro_batches_per_epoch == 50 and loader.num_samples == 801
    batches = list(loader.epoch(0))
    images = torch.stack([x for x, _ in batches])
    masks = torch.cat([m for _, m in batches])
    assert images.shape == (50, 8, 3, 96, 96) and images.dtype == torch.float32
    assert abs(images.mean()) < 0.01 and abs(images.std() - 1) < 0.01
    resumed = list(loader.epoch(0, start_batch=45))
    assert len(resumed) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[45:], resumed))
    # Masks: 22 of the 6 x 6 cells of 16 px, each repeated 4 x 4 tokens, every cell equally likely.
    cells = masks[:, ::4, ::4]
    assert torch.equal(cells.repeat_interleave(4, 1).repeat_interleave(4, 2), masks)
    assert (cells.flatten(1).sum(1) == math.ceil(36 * 0.6)).all()
    freq = cells.float().mean(0)
    assert (freq - 22 / 36).abs().max() < 4 * math.sqrt(22 / 36 * 14 / 36 / len(cells))
    other_rank = PretrainLoader(cfg, rank=0, world_size=2)
    assert not torch.equal(next(iter(other_rank.epoch(0)))[1], batches[0][1])
    assert PretrainLoader(cfg).stats()["epochs"] == {}


def test_masks_are_the_same_for_every_backend(photos, tmp_path):
    masks = [[m for _, m in _epoch(data_config(photos, tmp_path, b, synthetic_samples=12))[0]]
             for b in BACKENDS + ["synthetic"]]
    for other in masks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks[0], other))


def test_bad_input_is_refused_before_any_work(photos, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PretrainLoader(data_config(photos, tmp_path, "dali"), device="cpu")
    with pytest.raises(ValueError, match="rank must be"):
        PretrainLoader(data_config(photos, tmp_path), rank=2, world_size=2)
    loader = PretrainLoader(data_config(photos, tmp_path))
    for bad in (-1, 4, 1.0):
        with pytest.raises(ValueError, match="start_batch must be"):
            loader.epoch(0, bad)
    with pytest.raises(ValueError, match="epoch must be"):
        loader.epoch(-1)
    with pytest.raises(FileNotFoundError, match="data.path does not exist"):
        PretrainLoader(data_config(tmp_path / "nope", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        PretrainLoader(data_config(tmp_path / "empty", tmp_path))
    with pytest.raises(ValueError, match="fewer than one batch"):
        PretrainLoader(data_config(photos, tmp_path, batch=16))
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        PretrainLoader(data_config(photos, tmp_path, "dali_cpu"))


def test_too_many_bad_files_refused(tmp_path):
    root = tmp_path / "ds"
    make_photo_tree(root / "a", 6)
    make_odd_files(root / "b")
    with pytest.raises(ValueError, match=r"4 of 22 files .* more than data.max_skipped_fraction = 0.1"):
        PretrainLoader(data_config(root, tmp_path, max_skipped_fraction=0.1))
    shutil.rmtree(root / "b")
    (root / "b").mkdir()
    make_photo_tree(root / "b", 6, max_side=64)
    small = data_config(root, tmp_path, min_image_side=65, max_skipped_fraction=0.5)
    assert PretrainLoader(small).stats()["unusable_files"] == 6


def test_dali_reads_a_png_copy_of_a_file_it_fails_on(tmp_path, monkeypatch, caplog):
    """A file the index passed but DALI cannot decode while PIL can is converted, not skipped."""
    from simmim_fast.data import index
    root = tmp_path / "ds"
    make_photo_tree(root, 3)
    photo("chelsea.png").convert("RGB").save(root / "class_a" / "anim.gif")
    monkeypatch.setattr(index, "DALI_FORMATS", index.DALI_FORMATS | {"GIF"})  # the index now misjudges GIFs
    caplog.set_level(logging.WARNING, logger="simmim_fast.data")
    (tb, _), (db, dl) = [_epoch(data_config(root, tmp_path, b)) for b in BACKENDS]
    assert "dali_cpu cannot decode" in caplog.text and "using a PNG copy" in caplog.text
    assert dl.stats()["epochs"][0]["skipped"] == 0 and dl.stats()["unusable_files"] == 0
    assert (tb[0][0] - db[0][0]).abs().flatten(1).mean(1).max() < 0.02
