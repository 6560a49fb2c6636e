"""model.init_weights across window sizes: relative position tables resized as `export` resizes them,
geometry buffers never taken from the file, strict loading still refuses anything else."""
import pytest
import torch
from safetensors.torch import save_file

from simmim_fast import SimMIM, load_config
from simmim_fast.errors import UserError
from simmim_fast.models.init_weights import resize_rel_pos_table

from helpers import tiny_vit_config


def _swin(window, tmp_path, weights=None, strict=False):
    m = dict(encoder="swin", img_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
             window_size=window)
    if weights is not None:
        m.update(init_weights=str(weights), init_strict=strict)
    return load_config({"model": m, "mask": {"mask_patch_size": 8}})


@pytest.mark.parametrize("src_window,dst_window", [(4, 2), (2, 4)])
def test_swin_window_change_resizes_the_tables(tmp_path, src_window, dst_window):
    torch.manual_seed(0)
    src = SimMIM.from_config(_swin(src_window, tmp_path)).encoder.state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "w.safetensors"))
    enc = SimMIM.from_config(_swin(dst_window, tmp_path, tmp_path / "w.safetensors", strict=True)).encoder
    tables = 0
    for k, v in enc.state_dict().items():
        if k.endswith("relative_position_bias_table"):
            assert v.shape[0] == (2 * dst_window - 1) ** 2
            assert torch.equal(v, resize_rel_pos_table(src[k], v.shape[0]))
            tables += 1
        elif k.endswith(("relative_position_index", "attn_mask")):
            fresh = SimMIM.from_config(_swin(dst_window, tmp_path)).encoder.state_dict()[k]
            assert torch.equal(v, fresh), k  # the model's own geometry, not the file's
        else:
            assert torch.equal(v, src[k]), k
    assert tables == 2


def test_vit_shared_table_keeps_its_cls_rows(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit_config()
    src = SimMIM.from_config(base).encoder.state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "v.safetensors"))
    bigger = load_config(base, overrides=[f"model.img_size={base.model.img_size * 2}",
                                          f"model.init_weights=\"{tmp_path / 'v.safetensors'}\"",
                                          "model.init_strict=true"])
    enc = SimMIM.from_config(bigger).encoder
    key = "rel_pos_bias.relative_position_bias_table"
    got, table = enc.state_dict()[key], src[key]
    assert got.shape[0] > table.shape[0]
    assert torch.equal(got, resize_rel_pos_table(table, got.shape[0], num_extra=3))
    assert torch.equal(got[-3:], table[-3:])


def test_strict_still_refuses_other_mismatches(tmp_path):
    torch.manual_seed(0)
    src = SimMIM.from_config(_swin(4, tmp_path)).encoder.state_dict()
    src["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="1 mismatched"):
        SimMIM.from_config(_swin(2, tmp_path, tmp_path / "w.safetensors", strict=True))
