"""Reconstruction grid PNG: input, masked input, reconstruction (masked patches predicted)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["save_reconstruction_grid"]


def save_reconstruction_grid(images: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor, cfg, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    p = cfg.model.patch_size
    x = images.detach().float().cpu()
    m = mask.detach().cpu().float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    r = rec.detach().float().cpu()
    unnorm = lambda t: (t * std + mean).clamp(0, 1)  # noqa: E731
    xd = unnorm(x)
    if cfg.model.norm_targets:  # the prediction is a locally normalised image: rescale it per image to [0, 1]
        lo, hi = r.amin((1, 2, 3), keepdim=True), r.amax((1, 2, 3), keepdim=True)
        rd = (r - lo) / (hi - lo + 1e-6)
    else:
        rd = unnorm(r)
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    cols = [hwc(xd), hwc(xd * (1 - m)), hwc(xd * (1 - m) + rd * m)]
    n = x.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), dpi=80, squeeze=False)
    for i in range(n):
        for j, title in enumerate(("input", "masked", "reconstruction")):
            axes[i][j].imshow(cols[j][i])
            axes[i][j].axis("off")
            if i == 0:
                axes[i][j].set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
