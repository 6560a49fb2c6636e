import math

import numpy as np
import pytest
import torch

from simmim_fast import BatchMaskGenerator, MaskGenerator


def test_official_counts_and_shape():
    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    assert gen.mask_count == 22 and gen.token_count == 36
    for _ in range(20):
        m = gen()
        assert m.shape == (48, 48) and m.dtype.kind == "i"
        assert set(np.unique(m)) <= {0, 1}
        assert m.sum() == 22 * 8 * 8


@pytest.mark.parametrize("size,mp,p,ratio,grid,count", [
    (192, 32, 4, 0.6, 48, 22), (224, 32, 16, 0.6, 14, 30), (96, 16, 4, 0.6, 24, 22), (192, 32, 32, 0.5, 6, 18),
    (192, 16, 4, 0.75, 48, 108)])
def test_geometry(size, mp, p, ratio, grid, count):
    gen = MaskGenerator(size, mp, p, ratio)
    g = size // mp
    assert gen.mask_count == math.ceil(g * g * ratio) == count
    m = gen()
    assert m.shape == (grid, grid)
    b = BatchMaskGenerator(size, mp, p, ratio)(5)
    assert b.shape == (5, grid, grid)
    assert (b.sum((1, 2)) == count * (mp // p) ** 2).all()


def _grid_of(m: np.ndarray, scale: int) -> np.ndarray:
    """Collapse a token mask to its mask-patch grid, asserting every block is constant."""
    g = m.shape[-1] // scale
    blocks = m.reshape(*m.shape[:-2], g, scale, g, scale)
    assert (blocks == blocks[..., :1, :, :1]).all(), "token mask is not a repeated grid"
    return blocks[..., 0, :, 0]


def test_repetition_structure():
    m = MaskGenerator(192, 32, 4, 0.6)()
    grid = _grid_of(m, 8)
    assert grid.shape == (6, 6) and grid.sum() == 22
    np.testing.assert_array_equal(np.kron(grid, np.ones((8, 8), dtype=int)), m)
    b = BatchMaskGenerator(192, 32, 4, 0.6)(4).numpy()
    assert _grid_of(b, 8).shape == (4, 6, 6)


def _cell_and_pair_freqs(grids: np.ndarray):
    flat = grids.reshape(len(grids), -1).astype(np.float64)
    return flat.mean(0), (flat.T @ flat) / len(flat)


def _assert_uniform_22_of_36(grids: np.ndarray):
    """Every cell masked with probability 22/36, every pair with 22*21 / (36*35) (without replacement)."""
    n = len(grids)
    cell, pair = _cell_and_pair_freqs(grids)
    p = 22 / 36
    sd = math.sqrt(p * (1 - p) / n)
    assert np.abs(cell - p).max() < 5 * sd
    off = pair[~np.eye(36, dtype=bool)]
    assert abs(off.mean() - 22 * 21 / (36 * 35)) < 0.01
    return cell, pair, sd


def test_uniformity_numpy():
    rng = np.random.default_rng(0)
    gen = MaskGenerator(192, 32, 4, 0.6, rng=rng)
    n = 4000
    _assert_uniform_22_of_36(np.stack([_grid_of(gen(), 8) for _ in range(n)]))


def test_batched_matches_distribution():
    gen = BatchMaskGenerator(192, 32, 4, 0.6)
    g = torch.Generator().manual_seed(0)
    n = 4000
    grids = _grid_of(gen(n, generator=g).numpy(), 8)
    assert (grids.reshape(n, -1).sum(1) == 22).all()
    cell, pair, sd = _assert_uniform_22_of_36(grids)
    # Same law as the official generator: per-cell and pairwise frequencies agree.
    official = MaskGenerator(192, 32, 4, 0.6, rng=np.random.default_rng(1))
    ref_cell, ref_pair = _cell_and_pair_freqs(np.stack([_grid_of(official(), 8) for _ in range(n)]))
    assert np.abs(cell - ref_cell).max() < 8 * sd
    assert np.abs(pair - ref_pair).max() < 0.06


def test_batched_determinism_and_dtype():
    gen = BatchMaskGenerator(192, 32, 4, 0.6)
    a = gen(3, generator=torch.Generator().manual_seed(5))
    b = gen(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert gen(2, dtype=torch.bool).dtype == torch.bool
    c = gen(3, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_size=200), "input_size 200 is not divisible by mask_patch_size 32"),
    (dict(mask_patch_size=30, input_size=180), "mask_patch_size 30 is not divisible by model_patch_size 4"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(model_patch_size=0), "model_patch_size"),
])
def test_bad_geometry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(**kwargs)
    with pytest.raises(ValueError, match=match):
        BatchMaskGenerator(**kwargs)
