"""The tools with model.in_chans = 4: knn, linear-probe and finetune read the bands and the normalisation
from the checkpoint's config, exports record the normalisation, visualize --bands de-normalises with it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import SimMIM, load_config
from simmim_fast.cli import main as cli
from simmim_fast.tools.export import normalisation, read_normalisation
from simmim_fast.tools.images import load_image
from simmim_fast.visualization import to_uint8_rgb
from simmim_fast.weights import save_state_file

tifffile = pytest.importorskip("tifffile")

MEAN, STD = [0.3, 0.35, 0.4, 0.45], [0.2, 0.21, 0.22, 0.23]
ARCH = ["--set", "model.patch_size=4", "--set", "model.embed_dim=16", "--set", "model.depths=[1,1]",
        "--set", "model.num_heads=[1,2]", "--set", "model.window_size=4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 4-band SimMIM state file (random init) whose stored config records the normalisation."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config({"model": dict(encoder="swin", img_size=32, patch_size=4, in_chans=4, embed_dim=16,
                                     depths=[1, 1], num_heads=[1, 2], window_size=4),
                       "mask": {"mask_patch_size": 8}, "data": {"backend": "torch", "mean": MEAN, "std": STD}})
    torch.manual_seed(0)
    save_state_file(str(root / "pre.safetensors"), SimMIM.from_config(cfg).state_dict(), cfg)
    return root / "pre.safetensors"


@pytest.fixture(scope="module")
def bands_folder(tmp_path_factory):
    """train/ and val/ ImageFolder splits of 4-band uint16 TIFFs: class a bright in band 1, b in band 4."""
    root = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, band in (("a", 0), ("b", 3)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 20000, (36, 40, 4), dtype=np.uint16)
                a[..., band] += 40000
                tifffile.imwrite(root / split / c / f"{i}.tif", a, photometric="minisblack", planarconfig="contig")
    return root


def test_knn_and_linear_probe_read_the_bands(checkpoint, bands_folder, tmp_path):
    for tool, extra in (("knn", ["--k", "3"]), ("linear-probe", ["--epochs", "20", "--lr", "0.5"])):
        out = tmp_path / f"{tool}.json"
        assert cli([tool, str(checkpoint), "--data", str(bands_folder), "--workers", "0", "--device", "cpu",
                    "--json", str(out)] + extra) == 0
        top1 = json.loads(out.read_text())["top1"]["last"]
        assert top1 >= 75.0, (tool, top1)  # the band that tells the classes apart reaches the features


def test_export_records_the_normalisation(checkpoint, tmp_path, capsys):
    assert cli(["export", str(checkpoint), "-o", str(tmp_path / "exp")]) == 0
    want = {"in_chans": 4, "mean": MEAN, "std": STD, "value_range": None}
    assert json.loads((tmp_path / "exp.json").read_text())["normalisation"] == want
    assert read_normalisation(tmp_path / "exp.safetensors") == want
    (tmp_path / "exp.json").unlink()
    assert read_normalisation(tmp_path / "exp.safetensors") == want  # from the safetensors metadata
    assert read_normalisation(checkpoint) == want  # a SimMIM state file: from its stored config
    # continuing from it with other statistics says so
    from simmim_fast.jobs.pretrain import _compare_normalisation
    cfg = load_config({"model": {"in_chans": 4, "init_weights": str(tmp_path / "exp.safetensors")},
                       "data": {"mean": [0.5] * 4, "std": STD}})
    capsys.readouterr()
    _compare_normalisation(cfg)
    assert "was trained with mean [0.3, 0.35, 0.4, 0.45]" in capsys.readouterr().out
    assert normalisation(cfg)["mean"] == [0.5] * 4


def test_visualize_false_colour_denormalised_with_the_recorded_statistics(checkpoint, bands_folder, tmp_path):
    images = sorted((bands_folder / "val" / "b").glob("*.tif"))[:2]
    out = tmp_path / "grid.png"
    assert cli(["visualize", str(checkpoint), "--images", *map(str, images), "--bands", "4,2,1", "--scale", "1",
                "--combined", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    x = load_image(images[0], 32, MEAN, STD)
    want = to_uint8_rgb(x[None], MEAN, STD, [3, 1, 0])[0]
    assert np.array_equal(grid[:32, :32], want)  # row 1, panel 'original'
    assert want[..., 0].mean() > want[..., 1].mean() + 50  # band 4 (bright for class b) is shown as red
    assert cli(["visualize", str(checkpoint), "--images", str(images[0]), "--bands", "5,2,1", "-o",
                str(tmp_path / "x")]) == 2
    assert cli(["visualize", str(checkpoint), "-o", str(tmp_path / "x")]) == 2  # RGB sample photos: refused


def test_finetune_takes_in_chans_and_normalisation_from_the_checkpoint(checkpoint, bands_folder, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli(["finetune", str(checkpoint), "--config", "configs/finetune_fmnist_cpu.json", "--output-dir", str(out),
                "--set", f"finetune.data={json.dumps(str(bands_folder))}", "--set", "finetune.num_classes=2",
                "--set", "finetune.train_limit=null", "--set", "finetune.val_limit=null", "--set", "finetune.mixup=0",
                "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=8", "--set", "train.epochs=1",
                "--set", "train.warmup_epochs=0", "--set", "logging.print_every=1"] + ARCH) == 0
    text = capsys.readouterr().out
    assert "model.in_chans, data.mean, data.std taken from the pretraining checkpoint" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["in_chans"] == 4 and saved["data"]["mean"] == MEAN and saved["data"]["std"] == STD
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["model_kwargs"]["in_chans"] == 4
    assert best["normalisation"] == {"in_chans": 4, "mean": MEAN, "std": STD, "value_range": None}
    assert read_normalisation(out / "best" / "model.safetensors")["mean"] == MEAN
