"""Fashion-MNIST reader, features, weighted kNN and the linear probe (small, synthetic where possible)."""
import gzip
import math

import numpy as np
import pytest
import torch

from simmim_fast import SimMIM
from simmim_fast.tools.eval_data import eval_datasets
from simmim_fast.tools.fashion_mnist import CLASSES, fashion_mnist_root, load_fashion_mnist, read_idx
from simmim_fast.tools.features import pooled_features
from simmim_fast.tools.knn import knn_predict, knn_top1
from simmim_fast.tools.linear_probe import LinearProbe, train_linear_probe

from helpers import tiny_swin_config, tiny_vit_config

HAVE_FMNIST = (fashion_mnist_root() / "t10k-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST idx files not in {fashion_mnist_root()} "
                                                          "(apt-get install dataset-fashion-mnist)")


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), 8)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8), 8)
    images, labels = load_fashion_mnist("test", tmp_path)
    assert images.shape == (4, 28, 28) and labels.tolist() == [0, 1, 2, 3]
    train, val = eval_datasets(f"fashion-mnist:{tmp_path}", 32, (0.5,) * 3, (0.25,) * 3)
    x, y = val[1]
    assert x.shape == (3, 32, 32) and y == 1 and torch.equal(x[0], x[2])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")


@needs_fmnist
def test_installed_fashion_mnist_files():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * len(CLASSES)


def test_knn_by_hand():
    # Two classes on the unit circle; the query sits between two class-0 points and one class-1 point.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[0.6, 0.8]])
    # k=1: the nearest (cos 0.96) is class 0.
    assert knn_predict(train, labels, q, 2, k=1).tolist() == [0]
    # k=3, T=0.07: votes exp(0.96/T) (cls 0) + exp(0.6/T) (cls 0) vs exp(0.8/T) (cls 1).
    assert knn_predict(train, labels, q, 2, k=3).tolist() == [0]
    # With scale-free features: scaling a training vector does not change anything (cosine).
    assert knn_predict(train * 7, labels, q, 2, k=3).tolist() == [0]
    # Neighbours (cos 0.96, 0.8, 0.6) labelled (0, 1, 1): a majority says 1, but the weights
    # exp(cos / 0.07) let the closest win; a very high temperature makes it a plain majority vote.
    relabelled = torch.tensor([1, 0, 1, 1])
    assert math.exp(0.96 / 0.07) > math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)
    assert knn_predict(train, relabelled, q, 2, k=3).tolist() == [0]
    assert knn_predict(train, relabelled, q, 2, k=3, temperature=100.0).tolist() == [1]
    assert knn_top1(train, relabelled, torch.cat([q, q]), torch.tensor([0, 1]), 2, k=3) == 50.0
    with pytest.raises(ValueError, match="labels"):
        knn_predict(train, labels[:3], q, 2)


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (600,), generator=g)
    x = centres[y] + torch.randn(600, 16, generator=g) + 50.0   # a large offset: the BatchNorm handles it
    acc = train_linear_probe(x[:400], y[:400], x[400:], y[400:], 4, epochs=10, batch_size=64)
    assert acc > 95.0
    shuffled = train_linear_probe(x[:400], y[:400][torch.randperm(400, generator=g)], x[400:], y[400:], 4,
                                  epochs=10, batch_size=64)
    assert shuffled < 50.0
    probe = LinearProbe(16, 4)
    assert isinstance(probe[0], torch.nn.BatchNorm1d) and probe[0].affine is False


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
def test_pooled_features_are_the_encoder_forward(make):
    cfg = make()
    torch.manual_seed(0)
    enc = SimMIM.from_config(cfg).encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    f = pooled_features(enc, x)
    with torch.no_grad():
        full = enc.forward_features(x)
    expected = full.mean(dim=(1, 2)) if cfg.model.encoder == "swin" else full[:, 1:].mean(dim=1)
    torch.testing.assert_close(f, expected)
    if cfg.model.encoder == "vit":
        with torch.no_grad():
            t = enc.patch_embed(x)
            t = torch.cat((enc.cls_token.expand(2, -1, -1), t), dim=1)
            t = enc.blocks[0](t, shared_rel_pos_bias=enc.rel_pos_bias())
        torch.testing.assert_close(pooled_features(enc, x, block=1), t[:, 1:].mean(dim=1))
        with pytest.raises(ValueError, match="block must be in"):
            pooled_features(enc, x, block=3)
