"""Checkpoint commit is atomic, keep-last-K prunes, resolve finds checkpoints; non-finite losses stop
(saving nothing after them) or are skipped and counted."""
import json

import pytest
import torch

from engine_subprocess import one_thread  # noqa: F401
from helpers import tiny_swin_config
from simmim_fast import SimMIM, load_config
from simmim_fast.config import config_to_dict
from simmim_fast.engine.backends import TorchBackend
from simmim_fast.engine.checkpoint import CheckpointError, CheckpointManager, resolve_checkpoint
from simmim_fast.engine.dist import DistInfo
from simmim_fast.engine.metrics import MetricsLogger, read_metrics
from simmim_fast.engine.optim import param_groups
from simmim_fast.engine.schedule import LRSchedule
from simmim_fast.engine.trainer import NonFiniteLossError, Trainer
from simmim_fast.masking import BatchMaskGenerator


def _noop():
    pass


def _write(payload):
    def write(d):  # the files a torch-mode backend writes
        (d / "model.pt").write_text(payload)
        (d / "optimizer.pt").write_text(payload)
    return write


def test_atomic_commit_and_keep_last(tmp_path):
    cfg = tiny_swin_config()
    m = CheckpointManager(tmp_path, rank=0, keep_last=2, barrier=_noop)
    for step in (1, 2, 3):
        m.save(step, cfg, {"state": {"step": step}}, _write(str(step)))
    assert m.tags() == ["step_00000002", "step_00000003"]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000003"
    ck = resolve_checkpoint(tmp_path)
    assert ck.name == "step_00000003" and json.loads((ck / "config.json").read_text()) == config_to_dict(cfg)

    def killed(d):  # a save that dies half-way (like kill -9 during the write)
        (d / "model.pt").write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        m.save(4, cfg, {"state": {"step": 4}}, killed)
    assert resolve_checkpoint(tmp_path).name == "step_00000003"   # latest still names a complete checkpoint
    assert (tmp_path / "checkpoints/.partial-step_00000004").is_dir()
    assert m.tags() == ["step_00000002", "step_00000003"]
    m.clean_partial()
    assert not (tmp_path / "checkpoints/.partial-step_00000004").exists()
    for p in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints/step_00000002"):
        assert resolve_checkpoint(p).name in ("step_00000003", "step_00000002")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nope")


class FixedLoader:
    def __init__(self, cfg, steps):
        g = torch.Generator().manual_seed(0)
        s = cfg.model.img_size
        self.batch = (torch.randn(4, 3, s, s, generator=g),
                      BatchMaskGenerator(s, cfg.mask.mask_patch_size, 4, 0.6)(4, generator=g))
        self.micro_batches_per_epoch = steps

    def epoch(self, epoch, start_batch=0):
        for _ in range(start_batch, self.micro_batches_per_epoch):
            yield self.batch


def _trainer(tmp_path, policy, bad_steps, every=2, max_skipped=100):
    cfg = load_config(config_to_dict(tiny_swin_config()), overrides=[
        "engine.mode=torch", "engine.zero_stage=0", "train.global_batch_size=4", "train.micro_batch_size=4",
        f"train.nan_policy={policy}", "train.epochs=1", "train.warmup_epochs=0"])
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg)
    calls = {"n": 0}

    def loss_fn(module, batch):  # NaN on the chosen (1-based) steps
        calls["n"] += 1
        loss = module(*batch)
        return loss * float("nan") if calls["n"] in bad_steps else loss
    backend = TorchBackend(model, param_groups(model, 0.05), cfg, DistInfo(0, 1, 0, torch.device("cpu")), "fp32",
                           loss_fn)
    steps = 6
    trainer = Trainer(backend=backend, loader=FixedLoader(cfg, steps),
                      schedule=LRSchedule.from_config(cfg.train, steps),
                      steps_per_epoch=steps, epochs=1, max_steps=None, global_batch_size=4, nan_policy=policy,
                      max_skipped_steps=max_skipped, checkpoints=CheckpointManager(tmp_path, 0, 5, _noop),
                      checkpoint_every=every, save_at_end=True, print_every=3, world_size=1, config=cfg,
                      logger=MetricsLogger(tmp_path, True, steps, 0, False, False, "t"))
    return trainer, model


def test_nan_stop_saves_nothing_after_the_bad_step(tmp_path, one_thread):
    trainer, _ = _trainer(tmp_path, "stop", bad_steps={3})
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*Last checkpoint: .*step_00000002"):
        trainer.fit()
    assert trainer.checkpoints.tags() == ["step_00000002"]


def test_nan_skip_counts_and_keeps_weights(tmp_path, one_thread):
    trainer, model = _trainer(tmp_path, "skip", bad_steps={3, 4}, every=100)
    state = trainer.fit()
    assert state.step == 6 and state.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False]
    trainer, _ = _trainer(tmp_path / "b", "skip", bad_steps={2, 3, 4}, max_skipped=3)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.fit()
