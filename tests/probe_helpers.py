"""The tiny pretraining run and generated labelled folder that the online-probe and tracker tests share."""
import json

import numpy as np
from PIL import Image

STEPS = 12
BASE = ["--config", "configs/swin_tiny_cpu.json",
        "--set", "model.img_size=64", "--set", "model.embed_dim=16", "--set", "model.depths=[1,1,1,1]",
        "--set", "model.num_heads=[1,2,2,4]", "--set", "model.window_size=4", "--set", "model.drop_path_rate=0.1",
        "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4", "--set", "train.epochs=10",
        "--set", "train.warmup_epochs=1", "--set", "train.base_lr=0.05", "--set", f"train.max_steps={STEPS}",
        "--set", "data.num_workers=0", "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep_last=10",
        "--set", "logging.print_every=1", "--set", "logging.tensorboard=false", "--set", "logging.visualize_every=0",
        "--set", "logging.loss_curve=false", "--set", "engine.mode=torch", "--set", "engine.zero_stage=0"]
PROBE_EVERY = 2
TRAIN_LIMIT, VAL_LIMIT, K = 20, 10, 5


def write_probe_folder(root):
    """3 classes told apart by a faint colour shift under random per-image colour casts and noise (kNN top-1
    between chance and 100, and it moves with the subsets and the weights)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 5)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 100, (40, 40, 3)) + rng.integers(0, 120, (1, 1, 3))
                img[..., c] += 20
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


def probe_args(folder):
    return ["--set", f"logging.probe.data={json.dumps(str(folder))}", "--set", f"logging.probe.every_steps={PROBE_EVERY}",
            "--set", f"logging.probe.train_limit={TRAIN_LIMIT}", "--set", f"logging.probe.val_limit={VAL_LIMIT}",
            "--set", f"logging.probe.k={K}", "--set", "logging.probe.seed=3", "--set", "logging.probe.batch_size=8"]
