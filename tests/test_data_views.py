"""Per-sample views: the seeded generator, torchvision's RandomResizedCrop algorithm and its distribution."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from simmim_fast.data.views import NUM_DRAWS, NUM_TRIES, crop_boxes, sample_uniforms, sample_views

SCALE, RATIO = (0.67, 1.0), (3 / 4, 4 / 3)


def test_uniforms_are_a_pure_function_of_their_key():
    a = sample_uniforms(1, 2, [5, 6, 7], 4)
    assert a.shape == (3, 4) and a.dtype == np.float64 and (a >= 0).all() and (a < 1).all()
    assert np.array_equal(a, sample_uniforms(1, 2, [5, 6, 7], 4))
    assert np.array_equal(a[1:2], sample_uniforms(1, 2, [6], 4))  # a slot's draws ignore its batch
    for other in (sample_uniforms(0, 2, [5, 6, 7], 4), sample_uniforms(1, 3, [5, 6, 7], 4)):
        assert not np.isclose(a, other).any()
    assert len(np.unique(a)) == a.size


def test_uniforms_are_uniform_and_uncorrelated():
    u = sample_uniforms(0, 0, np.arange(4000), 5)
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    c = np.corrcoef(u.T)  # draws of one slot, and neighbouring slots, are independent
    assert np.abs(c - np.eye(5)).max() < 0.06
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.06
    e = sample_uniforms(0, 1, np.arange(4000), 1)[:, 0]
    assert abs(np.corrcoef(u[:, 0], e)[0, 1]) < 0.06


def _torchvision_box(width, height, draws):
    """torchvision's RandomResizedCrop.get_params, line by line, reading its random numbers from ``draws``."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for t in range(NUM_TRIES):
        target_area = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws[t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[NUM_TRIES + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(draws[2 * NUM_TRIES] * (height - h + 1))
            j = int(draws[2 * NUM_TRIES + 1] * (width - w + 1))
            return (i, j, h, w), False
    in_ratio = float(width) / float(height)
    if in_ratio < min(RATIO):
        w = width
        h = int(round(w / min(RATIO)))
    elif in_ratio > max(RATIO):
        h = height
        w = int(round(h * max(RATIO)))
    else:
        w = width
        h = height
    return ((height - h) // 2, (width - w) // 2, h, w), True


def test_boxes_follow_torchvision_exactly():
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (20, 20), (1, 1), (3, 40), (1000, 100), (100, 1000), (64, 48), (7, 5)]
    widths = np.array([w for w, _ in sizes] * 60)
    heights = np.array([h for _, h in sizes] * 60)
    draws = rng.random((len(widths), NUM_DRAWS))
    draws[::7, :NUM_TRIES] = 0.999  # large areas with wide ratios: forces retries and the fallback
    top, left, h, w = crop_boxes(widths, heights, draws, SCALE, RATIO)
    fallbacks = 0
    for k in range(len(widths)):
        ref, fallback = _torchvision_box(int(widths[k]), int(heights[k]), draws[k])
        assert (top[k], left[k], h[k], w[k]) == ref, (widths[k], heights[k])
        assert 0 <= top[k] and top[k] + h[k] <= heights[k] and 0 <= left[k] and left[k] + w[k] <= widths[k]
        assert h[k] >= 1 and w[k] >= 1
        fallbacks += fallback
    assert 0 < fallbacks < len(widths)


@pytest.mark.parametrize("width,height", [(500, 375), (240, 500), (900, 120)])
def test_crop_distribution_matches_torchvision(width, height):
    n = 3000
    ours = sample_views(7, 0, np.arange(n), [width] * n, [height] * n, SCALE, RATIO, 0.5)
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)])
    for a, b in ((ours.height * ours.width / (width * height), ref[:, 2] * ref[:, 3] / (width * height)),
                 (np.log(ours.width / ours.height), np.log(ref[:, 3] / ref[:, 2])),
                 (ours.top / height, ref[:, 0] / height), (ours.left / width, ref[:, 1] / width)):
        assert stats.ks_2samp(a, b).pvalue > 1e-3


def test_flip_rate():
    n = 20000
    for p in (0.5, 0.2, 0.0, 1.0):
        flips = sample_views(1, 4, np.arange(n), [100] * n, [80] * n, SCALE, RATIO, p).flip
        assert abs(flips.mean() - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_views_depend_on_slot_not_on_batch():
    a = sample_views(0, 1, [3, 9, 4], [300, 200, 100], [200, 300, 100], SCALE, RATIO, 0.5)
    b = sample_views(0, 1, [9], [200], [300], SCALE, RATIO, 0.5)
    assert a[1] == b[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="slots"):
        sample_views(0, 0, [1, 2], [10], [10], SCALE, RATIO, 0.5)
    with pytest.raises(ValueError, match=">= 1"):
        sample_views(0, 0, [1], [0], [10], SCALE, RATIO, 0.5)
