"""visualize: panel contents, PNG geometry, user-mask snapping, the CLI end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import BatchMaskGenerator, SimMIM
from simmim_fast.cli import main as cli_main
from simmim_fast.visualization import PANEL_GAP, save_reconstruction_grid, snap_mask, to_uint8_rgb
from simmim_fast.weights import save_state_file

from helpers import tiny_swin_config, tiny_vit_config


def _panels(png, n_panels, size, scale=1, top=0):
    a = np.asarray(Image.open(png).convert("RGB"))
    step = size * scale + PANEL_GAP
    return [a[top:top + size * scale, i * step:i * step + size * scale][::scale, ::scale] for i in range(n_panels)]


@pytest.mark.parametrize("make", [tiny_swin_config, tiny_vit_config])
def test_grid_size_and_visible_patches_equal_input(make, tmp_path):
    cfg = make()
    torch.manual_seed(0)
    model = SimMIM.from_config(cfg).train()
    s, p = cfg.model.img_size, cfg.model.patch_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, s, s, generator=g).clamp(-2, 2)
    mask = BatchMaskGenerator(s, cfg.mask.mask_patch_size, p, cfg.mask.mask_ratio)(3, generator=g)
    mean, std = cfg.data.mean, cfg.data.std
    path = save_reconstruction_grid(model, images, mask, tmp_path / "grid.png", mean, std, max_rows=2)
    assert model.training, "the model's mode must be restored"
    w, h = Image.open(path).size
    assert (w, h) == (4 * s + 3 * PANEL_GAP, 2 * s + PANEL_GAP)  # 2 rows: max_rows

    original = to_uint8_rgb(images, mean, std)
    with torch.no_grad():
        rec = to_uint8_rgb(model.eval().reconstruct(images, mask), mean, std)
    hidden = mask.bool().repeat_interleave(p, 1).repeat_interleave(p, 2).numpy()
    a = np.asarray(Image.open(path).convert("RGB"))
    for i in range(2):
        row = a[i * (s + PANEL_GAP):i * (s + PANEL_GAP) + s]
        orig, masked, recon, pasted = [row[:, k * (s + PANEL_GAP):k * (s + PANEL_GAP) + s] for k in range(4)]
        vis = ~hidden[i]
        assert np.array_equal(orig, original[i])
        assert np.array_equal(pasted[vis], original[i][vis]), "visible patches must be the input"
        assert np.array_equal(pasted[hidden[i]], rec[i][hidden[i]])
        assert np.array_equal(recon, rec[i])
        assert (masked[hidden[i]] == 128).all() and np.array_equal(masked[vis], original[i][vis])


def test_snap_mask_by_hand():
    drawing = np.zeros((8, 8), np.float32)
    drawing[0:4, 0:2] = 1.0      # half of cell (0, 0)
    drawing[4:8, 4:8] = 0.9      # all of cell (1, 1)
    drawing[0:1, 4:8] = 1.0      # a quarter of cell (0, 1)
    assert snap_mask(drawing, 4).tolist() == [[1, 0], [0, 1]]
    assert snap_mask(drawing, 4, threshold=0.25).tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="not divisible by the snap size 3"):
        snap_mask(drawing, 3)


def test_bad_inputs_are_named(tmp_path):
    cfg = tiny_swin_config()
    model = SimMIM.from_config(cfg)
    with pytest.raises(ValueError, match="mask must be"):
        save_reconstruction_grid(model, torch.zeros(2, 3, 64, 64), torch.zeros(2, 16), tmp_path / "x.png",
                                 cfg.data.mean, cfg.data.std)


def test_cli_with_user_mask(tmp_path):
    cfg = tiny_swin_config()   # 64 px, mask patch 16, model patch 4
    torch.manual_seed(0)
    state = SimMIM.from_config(cfg).state_dict()
    ckpt = tmp_path / "simmim.safetensors"
    save_state_file(str(ckpt), state, cfg)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    drawing = np.zeros((80, 64), np.uint8)       # centre view of 64 x 80 = rows 8..72
    drawing[8 + 16:8 + 32, 32:48] = 255          # exactly cell (1, 2)
    drawing[8 + 48:8 + 52, 0:16] = 255           # a quarter of cell (3, 0): below the threshold
    Image.fromarray(drawing).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert cli_main(["visualize", str(ckpt), "--images", str(tmp_path / "img.png"), "--mask",
                     str(tmp_path / "mask.png"), "--scale", "2", "-o", str(out)]) == 0
    png = out / "img.png"
    size = 64 * 2
    assert Image.open(png).size == (5 * size + 4 * PANEL_GAP, 12 + size)    # 5 panels + captions
    orig, masked = _panels(png, 2, 64, scale=2, top=12)
    hidden = np.zeros((64, 64), bool)
    hidden[16:32, 32:48] = True
    assert (masked[hidden] == 128).all()
    assert np.array_equal(masked[~hidden], orig[~hidden])


def test_cli_combined_grid_with_random_masks(tmp_path):
    cfg = tiny_vit_config()
    torch.manual_seed(0)
    ckpt = tmp_path / "simmim.pt"
    save_state_file(str(ckpt), SimMIM.from_config(cfg).state_dict(), cfg)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "all.png"
    assert cli_main(["visualize", str(ckpt), "--images", *map(str, paths), "--combined", str(out), "--scale", "1"]) == 0
    assert Image.open(out).size == (4 * 64 + 3 * PANEL_GAP, 3 * 64 + 2 * PANEL_GAP)
    a = np.asarray(Image.open(out).convert("RGB"))
    rows = [a[r * (64 + PANEL_GAP):r * (64 + PANEL_GAP) + 64, 64 + PANEL_GAP:2 * 64 + PANEL_GAP] for r in range(3)]
    hidden = [(row == 128).all(axis=2).mean() for row in rows]
    assert all(abs(h - 10 / 16) < 0.05 for h in hidden)     # ceil(16 * 0.6) = 10 of 16 mask patches
    assert not np.array_equal(rows[0] == 128, rows[1] == 128)  # a fresh mask per image


def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    cfg = tiny_swin_config()
    ckpt = tmp_path / "bare.pt"
    torch.save(SimMIM.from_config(cfg).state_dict(), ckpt)     # no config stored with it
    assert cli_main(["visualize", str(ckpt)]) == 2
    assert "pass --config" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text('{"model": {"embed_dim": 48}}')
    assert cli_main(["knn", str(ckpt), "--config", str(tmp_path / "cfg.json")]) == 2
    assert "do not fit the config's model" in capsys.readouterr().err
