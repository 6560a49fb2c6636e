"""The loader interface: shapes, determinism, resume position, sharding (torch backend)."""
import pytest
import torch

from simmim_fast import load_config
from simmim_fast.data import build_pretrain_loader, epoch_order, list_images


def _cfg(**train):
    t = dict(micro_batch_size=4, global_batch_size=4, seed=3)
    t.update(train)
    return load_config("configs/swin_tiny_cpu.json", overrides=[f"train.{k}={v}" for k, v in t.items()]
                       + ["data.num_workers=0"])


def test_shapes_and_ranges():
    cfg = _cfg()
    loader = build_pretrain_loader(cfg)
    images, mask = next(iter(loader.epoch(0)))
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32
    assert mask.shape == (4, 24, 24) and mask.dtype == torch.uint8
    assert (mask.flatten(1).sum(1) == 22 * 16).all()
    # normalised ImageNet range: (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225
    assert images.min() >= -2.2 and images.max() <= 2.7 and images.std() > 0.3


def test_deterministic_and_resumable():
    cfg = _cfg()
    a = list(build_pretrain_loader(cfg).epoch(1))
    b = list(build_pretrain_loader(cfg).epoch(1, start_step=2))
    assert len(a) == build_pretrain_loader(cfg).steps_per_epoch
    for (ia, ma), (ib, mb) in zip(a[2:], b):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    c = list(build_pretrain_loader(cfg).epoch(2))
    assert not torch.equal(a[0][0], c[0][0])


def test_sharding_covers_each_file_once():
    n = len(list_images(None))
    orders = [epoch_order(n, 0, 5, r, 2, 3) for r in range(2)]
    assert len(orders[0]) == len(orders[1]) and len(orders[0]) % 3 == 0
    assert not set(orders[0]) & set(orders[1])
    assert len(set(orders[0]) | set(orders[1])) == (n // 2) // 3 * 3 * 2


def test_missing_path_and_too_few_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path does not exist"):
        build_pretrain_loader(load_config("configs/swin_tiny_cpu.json", overrides=[f"data.path={tmp_path}/nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_pretrain_loader(load_config("configs/swin_tiny_cpu.json", overrides=[f"data.path={tmp_path}/empty"]))
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_pretrain_loader(_cfg(micro_batch_size=64, global_batch_size=64))
