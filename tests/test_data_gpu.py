"""The 'dali' backend (GPU decode): run where a CUDA GPU and DALI are present (the data part of
benchmarks/gpu_deepspeed_dali.sh).

Skipped elsewhere; the pipeline it builds is the one the 'dali_cpu' tests exercise on the CPU, with
the decoder on the GPU ("mixed") and the resize/flip/normalise ops following it there.
"""
import numpy as np
import pytest
import torch

from data_helpers import colour_ids, data_config, make_colour_files, make_odd_files, make_photo_tree

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_DALI), reason="needs a CUDA GPU and DALI")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_photo_tree(root, 12)
    return root, make_odd_files(root / "odd")


def _run(cfg, epoch=0, start_batch=0, device="cuda", **kw):
    from simmim_fast.data import PretrainLoader
    loader = PretrainLoader(cfg, device=device, **kw)
    out = [(x.clone(), m.clone()) for x, m in loader.epoch(epoch, start_batch)]
    loader.close()
    return out, loader


def test_dali_gpu_matches_cpu_backends_and_skips_bad_files(mixed, tmp_path):
    root, odd = mixed
    gpu, gl = _run(data_config(root, tmp_path, "dali", max_skipped_fraction=0.5), epoch=2)
    cpu, cl = _run(data_config(root, tmp_path, "dali_cpu", max_skipped_fraction=0.5), epoch=2, device="cpu")
    assert len(gpu) == 7
    for step, ((gx, gm), (cx, cm)) in enumerate(zip(gpu, cpu)):
        assert gx.device.type == "cuda" and gm.device.type == "cuda"
        assert gx.shape == (4, 3, 96, 96) and gx.dtype == torch.float32 and gm.dtype == torch.uint8
        assert torch.isfinite(gx).all()
        assert np.array_equal(gl.plan(2, step).files, cl.plan(2, step).files)
        diff = (gx.cpu() - cx).abs().flatten(1).mean(1)
        assert diff.max() < 0.05, (step, diff)  # nvJPEG + GPU resize vs libjpeg-turbo + CPU resize
    rec = gl.stats()["epochs"][2]
    expected = {str(p) for n, p in odd.items() if n.startswith(("bad_", "deep_"))}
    assert rec["skipped"] == 5 and {r["path"] for r in rec["files"]} == expected


def test_dali_gpu_resume_dtypes_and_sharding(mixed, tmp_path):
    root, _ = mixed
    cfg = data_config(root, tmp_path, "dali", batch=2, max_skipped_fraction=0.5)
    full, _ = _run(cfg, epoch=1)
    tail, _ = _run(cfg, epoch=1, start_batch=10)
    for (a, ma), (b, mb) in zip(full[10:], tail):
        assert torch.equal(a, b) and torch.equal(ma, mb)
    for dtype in ("float16", "bfloat16"):
        low, _ = _run(data_config(root, tmp_path, "dali", batch=2, output_dtype=dtype, max_skipped_fraction=0.5),
                      epoch=1)
        assert low[0][0].dtype == getattr(torch, dtype) and (low[0][0].float() - full[0][0]).abs().max() < 0.02
    make_colour_files(tmp_path / "colours", 16)
    seen = []
    for rank in range(2):
        out, loader = _run(data_config(tmp_path / "colours", tmp_path, "dali", batch=2), epoch=0, rank=rank,
                           world_size=2)
        for step, (x, _) in enumerate(out):
            assert colour_ids(x, MEAN, STD) == loader.plan(0, step).files.tolist()
            seen += colour_ids(x, MEAN, STD)
    assert sorted(seen) == list(range(16))


def test_dali_gpu_on_shards_equals_the_folder(tmp_path):
    """WebDataset shards of a folder: the 'dali' backend yields the folder's batches bit for bit."""
    from simmim_fast.cli import main as cli
    root = tmp_path / "photos"
    make_photo_tree(root, 12)
    assert cli(["shard", str(root), str(tmp_path / "shards"), "--shard-size-mb", "0.1"]) == 0
    a, la = _run(data_config(root, tmp_path, "dali"), epoch=1)
    b, lb = _run(data_config(tmp_path / "shards", tmp_path, "dali"), epoch=1)
    assert len(a) == len(b) == 3
    for step, ((xa, ma), (xb, mb)) in enumerate(zip(a, b)):
        assert np.array_equal(la.plan(1, step).files, lb.plan(1, step).files)
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
