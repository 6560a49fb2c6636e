"""Small configs shared by the tests (kept tiny so the CPU suite stays fast)."""
from simmim_fast import load_config


def tiny_swin_config(**model):
    m = dict(encoder="swin", img_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
             window_size=4)
    m.update(model)
    return load_config({"model": m, "mask": {"mask_patch_size": 16, "mask_ratio": 0.6}})


def tiny_vit_config(**model):
    m = dict(encoder="vit", img_size=64, patch_size=8, embed_dim=32, depths=[2], num_heads=[2], drop_path_rate=0.0)
    m.update(model)
    return load_config({"model": m, "mask": {"mask_patch_size": 16, "mask_ratio": 0.6}})
