"""Rank-0 training logs: progress bar (or log lines), metrics.jsonl, TensorBoard scalars, loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["MetricsLogger", "read_metrics", "plot_loss_curve", "format_eta"]


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


class MetricsLogger:
    """Does nothing on ranks other than 0."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar, name: str = "", loss_label: str = "loss"):
        self.enabled = enabled
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
        if self.tb is not None:
            for k in ("loss", "lr", "img_per_s", "grad_norm"):
                if rec.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", rec[k], rec["step"])

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
            self.bar.set_postfix_str(f"{loss} lr {rec['lr']:.2e} {rec['img_per_s']:.1f} img/s "
                                     f"ETA {eta}", refresh=True)
        else:
            gn = rec.get("grad_norm")
            print(f"[{self.name}] step {step}/{self.total_steps} epoch {rec['epoch']} {loss} "
                  f"lr {rec['lr']:.3e} {rec['img_per_s']:.1f} img/s"
                  + (f" grad_norm {gn:.3f}" if gn is not None and math.isfinite(gn) else
                     " grad_norm non-finite" if gn is not None else "")
                  + (f" skipped {rec['skipped_steps']}" if rec.get("skipped_steps") else "") + f" ETA {eta}",
                  flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
