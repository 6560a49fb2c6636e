"""Any channel count: 4-band uint16 TIFF and 1-channel PNG datasets through the torch backend, a
short training whose loss falls, and a loss that reads every band."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import load_config
from simmim_fast.config import ConfigError
from simmim_fast.data.loader import PretrainLoader
from simmim_fast.data.transforms import load_channels
from simmim_fast.models import SimMIM

tifffile = pytest.importorskip("tifffile")


def _smooth(rng, h, w, c):
    """Images with structure (smooth gradients + blobs) that a model can learn to inpaint."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    bands = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))
             for _ in range(c)]
    return (np.stack(bands, -1) + 1) / 2  # 0..1


def make_tiff4(root: Path, n=8):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = (_smooth(rng, 72, 80, 4) * 65535).astype(np.uint16)
        tifffile.imwrite(root / f"im{i}.tif", a, photometric="minisblack", planarconfig="contig")
    return root


def make_png1(root: Path, n=8):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((_smooth(rng, 70, 76, 1)[..., 0] * 255).astype(np.uint8), mode="L").save(root / f"g{i}.png")
    return root


def tiny_cfg(path, tmp_path, c, mean, std, **data):
    over = {"backend": "torch", "path": str(path), "num_workers": 0, "cache_dir": str(tmp_path / "cache"),
            "mean": mean, "std": std}
    over.update(data)
    return load_config({"model": dict(encoder="swin", img_size=32, patch_size=4, in_chans=c, embed_dim=16,
                                      depths=[1, 1], num_heads=[1, 2], window_size=4, drop_path_rate=0.0),
                        "mask": {"mask_patch_size": 8, "mask_ratio": 0.6},
                        "data": over,
                        "train": {"micro_batch_size": 4, "global_batch_size": 4, "seed": 3}})


def test_mean_std_length_must_match_in_chans():
    with pytest.raises(ConfigError, match=r"data\.mean.*data\.std.*model\.in_chans = 4"):
        load_config({"model": {"in_chans": 4}})
    load_config({"model": {"in_chans": 1}, "data": {"mean": [0.5], "std": [0.25]}})
    load_config({})  # ImageNet defaults for 3 channels


def test_load_channels_scaling_and_axes(tmp_path):
    a = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(5, 6, 4) * 500
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack", planarconfig="contig")
    t = load_channels(tmp_path / "a.tif", 4)
    assert t.shape == (4, 5, 6)
    np.testing.assert_allclose(t.numpy(), np.moveaxis(a, -1, 0) / 65535.0, rtol=1e-6)
    np.save(tmp_path / "b.npy", np.moveaxis(a, -1, 0).astype(np.float32))
    assert torch.equal(load_channels(tmp_path / "b.npy", 4), torch.from_numpy(np.moveaxis(a, -1, 0).astype(np.float32)))
    g = (np.arange(30).reshape(5, 6) * 8).astype(np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    np.testing.assert_allclose(load_channels(tmp_path / "g.png", 1).numpy()[0], g / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="4 channels, model.in_chans is 3|no axis of 3"):
        load_channels(tmp_path / "a.tif", 3)


@pytest.mark.parametrize("kind", ["tiff4", "png1"])
def test_twenty_steps_loss_falls(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "tiff4":
        path, c = make_tiff4(tmp_path / "d"), 4
    else:
        path, c = make_png1(tmp_path / "d"), 1
    cfg = tiny_cfg(path, tmp_path, c, [0.5] * c, [0.35] * c)
    loader = PretrainLoader(cfg, 0, 1, "cpu")
    model = SimMIM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    epoch = 0
    while len(losses) < 20:
        for images, mask in loader.epoch(epoch):
            assert images.shape == (4, c, 32, 32)
            loss = model(images, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == 20:
                break
        epoch += 1
    loader.close()
    assert np.mean(losses[-5:]) < 0.97 * np.mean(losses[:5]), losses


def test_loss_uses_every_band():
    from simmim_fast.kernels import masked_l1_loss
    torch.manual_seed(0)
    b, c, s, p = 2, 4, 16, 4
    target = torch.randn(b, c, s, s)
    rec = torch.randn(b, c, s, s)
    mask = torch.zeros(b, s // p, s // p)
    mask[:, 0, 0] = 1
    base = masked_l1_loss(rec, target, mask, p)
    masked, visible = rec.clone(), rec.clone()
    masked[0, 3, 1, 1] += 5.0      # band 4, a pixel inside the masked token (0, 0)
    visible[0, 3, s - 1, s - 1] += 5.0  # band 4, a visible pixel
    assert masked_l1_loss(masked, target, mask, p).item() != pytest.approx(base.item())
    assert masked_l1_loss(visible, target, mask, p).item() == base.item()
    # divided by C: the same per-pixel error over 4 bands as over 1 gives the same loss
    one = masked_l1_loss(rec[:, :1], target[:, :1], mask, p)
    rep = masked_l1_loss(rec[:, :1].repeat(1, c, 1, 1), target[:, :1].repeat(1, c, 1, 1), mask, p)
    assert rep.item() == pytest.approx(one.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["tiff4", "png1"])
def test_stats_equals_numpy(tmp_path, kind, capsys):
    import json
    from simmim_fast.cli import main
    if kind == "tiff4":
        path, c = make_tiff4(tmp_path / "d", n=5), 4
        pix = [np.moveaxis(tifffile.imread(p), -1, 0).reshape(4, -1) / 65535.0 for p in sorted(path.iterdir())]
    else:
        path, c = make_png1(tmp_path / "d", n=5), 1
        pix = [np.asarray(Image.open(p), np.float64).reshape(1, -1) / 255.0 for p in sorted(path.iterdir())]
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    allp = np.concatenate(pix, axis=1)
    rc = main(["stats", str(path), "--in-chans", str(c), "--json", "--set", f"data.cache_dir=\"{tmp_path / 'c'}\""])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(out["mean"], allp.mean(1), atol=2e-6)
    np.testing.assert_allclose(out["std"], allp.std(1), atol=2e-6)
    assert out["files"] == 5 and out["skipped"] == 1
    rc = main(["stats", str(path), "--in-chans", str(c), "--set", f"data.cache_dir=\"{tmp_path / 'c'}\""])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("--set data.mean=[") and " --set data.std=[" in line
    sets = line.replace("--set ", "").split(" ")
    load_config({"model": {"in_chans": c}}, overrides=sets)


def test_visualize_grey_and_false_colour(tmp_path):
    from simmim_fast.visualization import save_reconstruction_grid, to_uint8_rgb
    x = torch.rand(2, 4, 8, 8)
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
    rgb = to_uint8_rgb(x, mean, std, bands=(3, 2, 1))
    want = ((x[:, [3, 2, 1]] * torch.tensor([0.8, 0.7, 0.6]).view(1, 3, 1, 1)
             + torch.tensor([0.4, 0.3, 0.2]).view(1, 3, 1, 1)).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
    assert np.array_equal(rgb, want.to(torch.uint8).numpy())
    g = to_uint8_rgb(x[:, :1], [0.5], [0.25])
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    cfg = tiny_cfg(None, tmp_path, 4, mean, std)
    model = SimMIM.from_config(cfg).eval()
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    out = save_reconstruction_grid(model, torch.randn(1, 4, 32, 32), mask, tmp_path / "g.png", mean, std)
    assert Image.open(out).mode == "RGB"


def test_init_weights_from_timm_file(tmp_path):
    from safetensors.torch import save_file
    from timm.models import adapt_input_conv
    from simmim_fast.errors import UserError
    torch.manual_seed(0)
    src = SimMIM.from_config(tiny_cfg(None, tmp_path, 3, [0.5] * 3, [0.3] * 3)).encoder
    state = {k: v.clone().contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))

    def cfg(c, **m):
        base = tiny_cfg(None, tmp_path, c, [0.5] * c, [0.3] * c)
        return load_config(base, overrides=[f"model.init_weights=\"{tmp_path / 'w.safetensors'}\""] +
                           [f"model.{k}={str(v).lower()}" for k, v in m.items()])
    enc = SimMIM.from_config(cfg(3, init_strict=True)).encoder
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k
    enc4 = SimMIM.from_config(cfg(4)).encoder
    w = enc4.state_dict()["patch_embed.proj.weight"]
    assert w.shape[1] == 4
    assert torch.equal(w, adapt_input_conv(4, state["patch_embed.proj.weight"].clone()))
    assert torch.allclose(w[:, 3], state["patch_embed.proj.weight"][:, 0] * 3 / 4)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="1 unexpected"):
        SimMIM.from_config(cfg(3, init_strict=True))


def test_export_four_bands_loads_strictly_in_timm(tmp_path):
    import timm
    from simmim_fast.tools.export import build_timm_model, convert_to_timm, encoder_state_dict, timm_target
    c = 4
    cfg = load_config("configs/swin_b.json", overrides=["model.in_chans=4", "data.mean=[0.5,0.5,0.5,0.5]",
                                                        "data.std=[0.2,0.2,0.2,0.2]"])
    with torch.device("meta"):
        state = SimMIM.from_config(cfg).state_dict()
    name, kwargs = timm_target(cfg)
    assert kwargs.get("in_chans") == c
    weights = convert_to_timm(encoder_state_dict(state), build_timm_model(name, kwargs))
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(weights, strict=True, assign=True)
    assert model.patch_embed.proj.weight.shape[1] == c
