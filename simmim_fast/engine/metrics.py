"""Rank-0 training logs: progress bar (or log lines), metrics.jsonl, TensorBoard scalars and images, the
experiment trackers (W&B, MLflow), loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["MetricsLogger", "read_metrics", "record_scalars", "plot_loss_curve", "format_eta", "TRAIN_SCALARS"]


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Records of metrics.jsonl; where a resumed run logged a step again, the later record wins."""
    by_step: Dict[int, Dict[str, Any]] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "step" in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "", loss_label: str = "loss") -> Optional[Path]:
    recs = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(loss_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


# Keys of a step record: the training scalars (TensorBoard tags train/<key>) and the bookkeeping that is not
# plotted; any other number in a record (an on_step callback's, e.g. probe/knn_top1) is plotted under its own name.
TRAIN_SCALARS = ("loss", "lr", "img_per_s", "grad_norm")
BOOKKEEPING = ("step", "epoch", "skipped", "skipped_now", "skipped_steps", "samples", "time")


def record_scalars(rec: Dict[str, Any]) -> Dict[str, float]:
    """{tag: value} of a step record, as TensorBoard and the trackers get them (None values left out)."""
    out = {f"train/{k}": rec[k] for k in TRAIN_SCALARS if rec.get(k) is not None}
    out.update({k: v for k, v in rec.items() if k not in TRAIN_SCALARS and k not in BOOKKEEPING
                and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


class MetricsLogger:
    """Does nothing on ranks other than 0.

    ``trackers``: objects with ``log_scalars(scalars, step)``, ``log_image(tag, image, step)`` and
    ``close()`` (simmim_fast.engine.trackers) that get what TensorBoard gets."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar, name: str = "", loss_label: str = "loss", trackers: Sequence[Any] = ()):
        self.enabled = enabled
        self.trackers = list(trackers) if enabled else []
        self._images: List[tuple] = []  # (tag, image, step) waiting for that step's record (trackers)
        self.loss_label = loss_label  # what the loss is, for the loss curve's axis
        self.output_dir = Path(output_dir)
        self.total_steps, self.name = total_steps, name
        self.jsonl = self.output_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.t_start = time.perf_counter()
        self.start_step = start_step
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=start_step or None)
        use_bar = sys.stderr.isatty() if progress_bar == "auto" else bool(progress_bar)
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name or "train", dynamic_ncols=True,
                            unit="step", file=sys.stderr)

    def log(self, rec: Dict[str, Any]) -> None:
        """One record per logged step: step, epoch, loss, lr, img_per_s, grad_norm, skipped_steps, time."""
        if not self.enabled:
            return
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        with open(self.jsonl, "a") as f:  # strict JSON: a non-finite number is written as null
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        scalars = record_scalars(rec)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, rec["step"])
        for tracker in self.trackers:
            tracker.log_scalars(scalars, rec["step"])
        self._send_images(rec["step"])

    def log_image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image (numpy array or PIL image) of ``step``: TensorBoard now; the trackers
        after that step's record (W&B takes steps in increasing order only)."""
        if not self.enabled:
            return
        image = np.asarray(image)
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
        if self.trackers:
            self._images.append((tag, image, step))

    def _send_images(self, up_to_step: Optional[int]) -> None:
        keep = []
        for tag, image, step in self._images:
            if up_to_step is None or step <= up_to_step:
                for tracker in self.trackers:
                    tracker.log_image(tag, image, step)
            else:
                keep.append((tag, image, step))
        self._images = keep

    def progress(self, step: int, rec: Dict[str, Any], sec_per_step: float) -> None:
        if not self.enabled:
            return
        eta = format_eta(sec_per_step * (self.total_steps - step))
        # rec['loss']: the mean of the finite losses since the last line, None if every step was skipped
        loss = "loss skipped" if rec["loss"] is None else f"loss {rec['loss']:.4f}"
        if rec.get("skipped_now") and rec["loss"] is not None:
            loss += f" ({rec['skipped_now']} skipped)"
        if self.bar is not None:
            self.bar.n = step
            extra = "".join(f" {k} {v:.4g}" for k, v in record_scalars(rec).items() if not k.startswith("train/"))
            self.bar.set_postfix_str(f"{loss} lr {rec['lr']:.2e} {rec['img_per_s']:.1f} img/s"
                                     f"{extra} ETA {eta}", refresh=True)
        else:
            gn = rec.get("grad_norm")
            extra = "".join(f" {k} {v:.4g}" for k, v in record_scalars(rec).items() if not k.startswith("train/"))
            print(f"[{self.name}] step {step}/{self.total_steps} epoch {rec['epoch']} {loss} "
                  f"lr {rec['lr']:.3e} {rec['img_per_s']:.1f} img/s"
                  + (f" grad_norm {gn:.3f}" if gn is not None and math.isfinite(gn) else
                     " grad_norm non-finite" if gn is not None else "")
                  + (f" skipped {rec['skipped_steps']}" if rec.get("skipped_steps") else "") + extra + f" ETA {eta}",
                  flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, failed: bool = False) -> None:
        """Idempotent; ``failed``: the run ended by an error (MLflow marks the run FAILED)."""
        if self.trackers:
            if not failed:
                self._send_images(None)
            for tracker in self.trackers:
                tracker.close(failed)
            self.trackers = []
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
