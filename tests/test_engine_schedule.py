"""The lr schedule equals the official SimMIM formulas at chosen steps."""
import math

import pytest

from simmim_fast import load_config
from simmim_fast.engine.schedule import LRSchedule

SPE = 100  # optimiser steps per epoch


def test_cosine_swin_b_100ep():
    t = load_config("configs/swin_b_100ep.json").train     # 2e-4 / 1e-6 / 1e-5 per 512, batch 2048
    s = LRSchedule.from_config(t, SPE)
    lr, wlr, mlr = 2e-4 * 4, 1e-6 * 4, 1e-5 * 4             # scaled by 2048 / 512
    W, T = 10 * SPE, 100 * SPE
    assert s(0) == pytest.approx(wlr, rel=1e-12)
    assert s(W // 2) == pytest.approx(wlr + (lr - wlr) * 0.5, rel=1e-12)
    assert s(W - 1) == pytest.approx(wlr + (lr - wlr) * (W - 1) / W, rel=1e-12)
    assert s(W) == pytest.approx(lr, rel=1e-12)
    mid = W + (T - W) // 2
    assert s(mid) == pytest.approx((lr + mlr) / 2, rel=1e-12)
    q = W + (T - W) // 4
    assert s(q) == pytest.approx(mlr + 0.5 * (lr - mlr) * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert s(T) == pytest.approx(mlr, rel=1e-12)
    assert s(T + 50) == pytest.approx(mlr, rel=1e-12)


def test_multistep_swin_b_800ep():
    t = load_config("configs/swin_b.json").train             # 1e-4 / 5e-7, x0.1 at epoch 700
    s = LRSchedule.from_config(t, SPE)
    lr, wlr = 1e-4 * 4, 5e-7 * 4
    assert s(0) == pytest.approx(wlr, rel=1e-12)
    assert s(5 * SPE) == pytest.approx((wlr + lr) / 2, rel=1e-12)
    assert s(10 * SPE) == pytest.approx(lr, rel=1e-12)
    assert s(700 * SPE - 1) == pytest.approx(lr, rel=1e-12)
    assert s(700 * SPE) == pytest.approx(lr * 0.1, rel=1e-12)
    assert s(800 * SPE - 1) == pytest.approx(lr * 0.1, rel=1e-12)


def test_scaling_uses_global_batch_and_no_warmup():
    t = load_config(None, overrides=["train.global_batch_size=256", "train.micro_batch_size=32",
                                     "train.warmup_epochs=0", "train.base_lr=1e-3", "train.min_lr=0"]).train
    s = LRSchedule.from_config(t, 10)
    assert s(0) == pytest.approx(1e-3 * 256 / 512)
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        LRSchedule.from_config(t, 0)
