"""The training loop: schedule, accumulation, logging, non-finite losses, checkpoints and resume.

Nothing here knows about SimMIM: the backend's ``loss_fn`` turns a batch into a loss, the loader
yields micro-batches with a resumable ``epoch(epoch, start_batch)``, and the schedule maps a step to an lr.

Host syncs: losses stay on the device and are fetched once per ``print_every`` steps (one all-reduce
for all ranks' losses), before each checkpoint and at the end, so the host can run ahead of the GPU.
nan_policy 'skip' adds one sync per step (it must decide before the update).

``on_step(state)`` runs after every optimiser step on every rank (before the checkpoint of that step). It
returns None, or a dict of scalars for this step (e.g. an evaluation's result; ``{}`` on ranks that
log nothing): they join the step's record in metrics.jsonl, TensorBoard and the trackers under their
own names, and the progress line, and force a flush at that step. Whether it returns None must be
the same on every rank (the flush all-reduces the losses).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as torch_dist

from .checkpoint import CheckpointError, CheckpointManager, read_trainer_state, restore_rng, tag_for_step
from .metrics import MetricsLogger, plot_loss_curve
from .schedule import LRSchedule
from ..errors import EXIT_NONFINITE, RunStopped, UserError, exit_code_for_signal

__all__ = ["TrainState", "Trainer", "NonFiniteLossError", "StopSignals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RunStopped, RuntimeError):
    """Training stopped on a non-finite loss (exit status EXIT_NONFINITE); the message names the step, the last
    checkpoint and what to try."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_NONFINITE)


class StopSignals:
    """While training: the first SIGTERM or SIGINT is remembered (``signum``), so the loop can finish the
    current optimiser step, save and stop; a second SIGINT (Ctrl-C twice) exits at once, saving nothing.
    Handlers can only be installed from the main thread; elsewhere signals keep their default action."""

    def __init__(self, rank: int = 0):
        self.signum = 0
        self.rank = rank
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            print(f"[rank {self.rank}] second interrupt: exiting at once, without saving a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(exit_code_for_signal(signum))
        if not self.signum:
            self.signum = signum
            if signum == signal.SIGINT and self.rank == 0:
                print("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to exit at once)",
                      file=sys.stderr, flush=True)


@dataclass
class TrainState:
    step: int = 0               # optimiser steps done
    epoch: int = 0              # current epoch
    step_in_epoch: int = 0      # optimiser steps done in the current epoch
    skipped_steps: int = 0      # total updates skipped for a non-finite loss
    skipped_in_a_row: int = 0
    samples: int = 0            # images consumed over all ranks


@dataclass
class _Pending:
    steps: List[int] = field(default_factory=list)
    epochs: List[int] = field(default_factory=list)
    losses: List[torch.Tensor] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    skipped: List[bool] = field(default_factory=list)
    norm: Optional[torch.Tensor] = None
    extras: Dict[str, float] = field(default_factory=dict)  # the on_step callback's scalars (last step)


class Trainer:
    def __init__(self, *, backend, loader, schedule: LRSchedule, steps_per_epoch: int, epochs: int,
                 max_steps: Optional[int], global_batch_size: int, nan_policy: str, max_skipped_steps: int,
                 checkpoints: CheckpointManager, checkpoint_every: int, save_at_end: bool, logger: MetricsLogger,
                 print_every: int, world_size: int, config, loss_curve: bool = True,
                 on_step: Optional[Callable[[TrainState], Optional[Dict[str, float]]]] = None,
                 agree: Optional[Callable[[int], int]] = None, rank: int = 0):
        """``agree(value) -> max of value over all ranks`` (dist.RankAgreement; identity for one rank):
        called once per step with the stop signal this rank got (0 if none)."""
        if steps_per_epoch < 1:
            raise UserError("steps_per_epoch must be >= 1")
        self.backend, self.loader, self.schedule = backend, loader, schedule
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
        self.global_batch_size = global_batch_size
        self.nan_policy, self.max_skipped_steps = nan_policy, max_skipped_steps
        self.checkpoints, self.checkpoint_every, self.save_at_end = checkpoints, checkpoint_every, save_at_end
        self.logger, self.print_every, self.loss_curve = logger, print_every, loss_curve
        self.world_size, self.config, self.on_step = world_size, config, on_step
        self.agree = agree or (lambda value: value)
        self.rank = rank
        self.accumulation = backend.accumulation
        if hasattr(backend, "check_finite"):
            backend.check_finite = nan_policy == "skip"
        self._pending = _Pending()
        self._last_saved_step = -1
        self._last_flush_time = time.perf_counter()
        self._last_flush_step = 0
        self._sec_per_step = 0.0

    # ---------------------------------------------------------------- resume
    def resume(self, ckpt_dir, rank: int) -> TrainState:
        st = read_trainer_state(ckpt_dir)
        facts = self.backend.engine_facts()
        saved = st.get("engine", {})
        for key in ("mode", "zero_stage", "world_size", "accumulation_steps"):
            if key in saved and saved[key] != facts[key]:
                raise UserError(f"cannot resume from {ckpt_dir}: it was written with {key} = {saved[key]!r}, "
                                 f"this run has {facts[key]!r}; resume with the same engine.mode, "
                                 f"engine.zero_stage, number of ranks and batch sizes (or --resume none)")
        if st.get("steps_per_epoch") != self.steps_per_epoch:
            raise UserError(f"cannot resume from {ckpt_dir}: it has {st.get('steps_per_epoch')} steps per epoch, "
                             f"this run has {self.steps_per_epoch} (different dataset or batch size)")
        try:
            self.backend.read_state(ckpt_dir)
        except Exception as e:  # noqa: BLE001 - a file that passed verification but does not load
            raise CheckpointError(f"cannot load the model/optimiser state of {ckpt_dir}: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        rng = ckpt_dir / "rng" / f"rank_{rank:05d}.pt"
        if not rng.is_file():  # resuming without it would silently change the random stream
            raise CheckpointError(f"{rng} is missing: the checkpoint cannot restore this rank's RNG state")
        try:
            restore_rng(torch.load(rng, map_location="cpu", weights_only=False))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{rng} is unreadable: {type(e).__name__}: {e}") from e
        state = TrainState(**st["state"])
        self._last_flush_step = self._last_saved_step = state.step
        return state

    # ---------------------------------------------------------------- loop
    def fit(self, state: Optional[TrainState] = None) -> TrainState:
        with StopSignals(self.rank) as signals:
            return self._fit(state or TrainState(), signals)

    def _fit(self, state: TrainState, signals: StopSignals) -> TrainState:
        self._last_flush_step = state.step
        self._last_flush_time = time.perf_counter()
        while state.step < self.total_steps:
            micro_start = state.step_in_epoch * self.accumulation
            batches = iter(self.loader.epoch(state.epoch, start_batch=micro_start))
            while state.step_in_epoch < self.steps_per_epoch and state.step < self.total_steps:
                self._one_step(state, batches)
                stop = self.agree(signals.signum)  # every rank, every step: all stop after the same step
                stop = stop if state.step < self.total_steps else 0  # the last step: end as usual
                scalars = self._call_on_step(state)
                if state.step % self.print_every == 0 or scalars is not None:
                    self._flush(state)
                if state.step % self.checkpoint_every == 0 or stop:
                    self.save(state)
                if stop:
                    self.logger.close()
                    raise RunStopped(
                        f"stopped by {signal.Signals(stop).name} after step {state.step}: checkpoint "
                        f"{self.checkpoints.root / tag_for_step(state.step)} saved; the same command resumes from it",
                        exit_code_for_signal(stop), prefix="")
            if state.step_in_epoch >= self.steps_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
        self._flush(state)
        if self.save_at_end:
            self.save(state)
        self.logger.close()
        return state

    def _call_on_step(self, state: TrainState) -> Optional[Dict[str, float]]:
        """Run the job's callback; scalars it returns join this step's record, which is logged at once.
        Its time stays in the img/s of its interval: on CUDA it first waits for the queued steps, which
        the host cannot tell apart from its own time without a sync per step."""
        if self.on_step is None:
            return None
        scalars = self.on_step(state)
        if scalars is not None:
            self._pending.extras.update(scalars)
        return scalars

    def _micro_batches(self, batches: Iterator) -> Iterator[Any]:
        for i in range(self.accumulation):
            try:
                batch = next(batches)  # loaders must not draw from the global RNG (resume equality)
                yield batch
            except StopIteration:
                raise RuntimeError(f"the loader ended after {i} of {self.accumulation} micro-batches of a step; "
                                   f"loader.micro_batches_per_epoch must cover steps_per_epoch x accumulation") from None

    def _one_step(self, state: TrainState, batches: Iterator) -> None:
        lr = self.schedule(state.step)
        result = self.backend.train_step(self._micro_batches(batches), lr)
        p = self._pending
        p.steps.append(state.step + 1)
        p.epochs.append(state.epoch)
        p.losses.append(result.loss)
        p.lrs.append(lr)
        p.skipped.append(False)
        p.norm = result.grad_norm
        state.step += 1
        state.step_in_epoch += 1
        state.samples += self.global_batch_size
        if self.nan_policy == "skip":
            finite = bool(torch.isfinite(self._global_mean(result.loss.reshape(1))).item())
            if result.applied is True and not finite:
                raise NonFiniteLossError(
                    f"step {state.step}: the loss is not finite but the engine applied the update; nan_policy "
                    f"'skip' cannot be honoured by this engine configuration")
            if not finite or result.applied is False:
                state.skipped_steps += 1
                state.skipped_in_a_row += 1
                p.losses[-1] = torch.full_like(result.loss, float("nan"))
                p.skipped[-1] = True
                self.logger.message(f"step {state.step}: non-finite loss, update skipped "
                                    f"({state.skipped_steps} skipped so far)")
                if state.skipped_in_a_row >= self.max_skipped_steps:
                    self._flush(state)  # the skipped steps are logged before stopping
                    first = state.step - state.skipped_in_a_row + 1
                    raise NonFiniteLossError(
                        f"{state.skipped_in_a_row} steps in a row had a non-finite loss (steps {first}-{state.step}, "
                        f"train.max_skipped_steps = {self.max_skipped_steps}); training stopped, their updates were "
                        f"not applied. Last checkpoint: {self._last_checkpoint()}. Lower train.base_lr (or raise "
                        f"train.warmup_epochs), check the data, or raise train.max_skipped_steps; the same command "
                        f"resumes from the last checkpoint")
            else:
                state.skipped_in_a_row = 0

    def _global_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            torch_dist.all_reduce(t)
            t /= self.world_size
        return t

    def _flush(self, state: TrainState) -> None:
        """Fetch the pending losses (one sync, one all-reduce), check them, log them."""
        p = self._pending
        if not p.steps:
            return
        losses = self._global_mean(torch.stack(p.losses)).cpu().tolist()
        norm = float(p.norm) if p.norm is not None else None
        bad = [s for s, l in zip(p.steps, losses) if not math.isfinite(l)] if self.nan_policy == "stop" else []
        now = time.perf_counter()
        n = state.step - self._last_flush_step
        dt = now - self._last_flush_time
        img_s = n * self.global_batch_size / dt if dt > 0 and n > 0 else 0.0
        self._sec_per_step = dt / n if n > 0 else self._sec_per_step
        for i, (s, e, l, lr, skipped) in enumerate(zip(p.steps, p.epochs, losses, p.lrs, p.skipped)):
            last = i == len(p.steps) - 1
            rec = {"step": s, "epoch": e, "loss": l if math.isfinite(l) else None, "lr": lr,
                   "img_per_s": round(img_s, 2), "grad_norm": norm if last else None, "skipped": skipped,
                   "skipped_steps": state.skipped_steps, "samples": state.samples - (len(p.steps) - 1 - i)
                   * self.global_batch_size, "time": round(now, 3)}
            if last:
                rec.update(p.extras)
            self.logger.log(rec)
        finite = [x for x in losses if math.isfinite(x)]
        self.logger.progress(state.step, {**rec, "loss": sum(finite) / len(finite) if finite else None,
                                          "skipped_now": sum(p.skipped)}, self._sec_per_step)
        self._pending = _Pending()
        self._last_flush_step, self._last_flush_time = state.step, time.perf_counter()
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad[0]} (train.nan_policy = 'stop'); training stopped and nothing was "
                f"saved after it. Last checkpoint: {self._last_checkpoint()}. Lower train.base_lr (or raise "
                f"train.warmup_epochs), check the data, or set train.nan_policy=skip; the same command resumes from "
                f"the last checkpoint")

    def _last_checkpoint(self) -> str:
        """The checkpoint this run last saved or resumed from."""
        if self._last_saved_step < 0:
            return "none"
        return str(self.checkpoints.root / tag_for_step(self._last_saved_step))

    # ---------------------------------------------------------------- checkpoints
    def save(self, state: TrainState) -> None:
        if state.step == self._last_saved_step:
            return
        self._flush(state)  # never save after an unchecked loss
        trainer_state = {"state": asdict(state), "steps_per_epoch": self.steps_per_epoch,
                         "total_steps": self.total_steps, "engine": self.backend.engine_facts()}
        t0 = time.perf_counter()
        path = self.checkpoints.save(state.step, self.config, trainer_state, self.backend.write_state)
        self._last_saved_step = state.step
        self.logger.message(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        if self.loss_curve and self.logger.enabled:
            plot_loss_curve(self.logger.jsonl, self.logger.output_dir / "loss_curve.png", self.logger.name,
                            self.logger.loss_label)
        # saving is not training: keep it out of the next img/s figure
        self._last_flush_time += time.perf_counter() - t0
