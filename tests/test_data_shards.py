"""WebDataset shards (`simmim-fast shard`): the format DALI reads, batches bit-identical to the folder they
came from (torch and dali_cpu), disjoint ranks, kill -9 and resume on shards, damaged shards."""
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from data_helpers import data_config, make_photo_tree
from engine_subprocess import ROOT, one_thread, subprocess_env  # noqa: F401
from simmim_fast.cli import main as cli
from simmim_fast.data import PretrainLoader, list_images
from simmim_fast.data.shard import sample_key
from simmim_fast.data.webdataset import MANIFEST, Member, read_idx, scan_tar


def _dali():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


requires_dali = pytest.mark.skipif(not _dali(), reason="NVIDIA DALI is not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_tree(root, 12, max_side=128)
    (root / "class_a" / "a file.v2.png").write_bytes((root / "class_a" / "001_chelsea.jpg").read_bytes())  # odd name
    return root


def _shard(src, out, mb="0.03"):
    assert cli(["shard", str(src), str(out), "--shard-size-mb", mb]) == 0
    return out


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return _shard(folder, tmp_path_factory.mktemp("s") / "shards")


def _batches(cfg, epoch=0, start=0, **kw):
    loader = PretrainLoader(cfg, **kw)
    try:
        return [(x.clone(), m.clone()) for x, m in loader.epoch(epoch, start)], loader
    finally:
        loader.close()


def test_shards_hold_the_files_in_order_with_dali_index_files(folder, shards):
    files = list_images(str(folder))
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["samples"] == len(files) == 13 and len(manifest["shards"]) >= 3
    assert sum(s["samples"] for s in manifest["shards"]) == 13
    members = []
    for s in manifest["shards"]:
        idx = read_idx(shards / s["idx"])
        assert len(idx) == s["samples"] and (shards / s["tar"]).stat().st_size == s["bytes"]
        with tarfile.open(shards / s["tar"]) as t:  # a plain tar any tool reads
            assert [m.name for m in t.getmembers()] == [n for n, _, _ in idx]
            assert [m.offset_data for m in t.getmembers()] == [o for _, o, _ in idx]
        assert scan_tar(shards / s["tar"]) == idx
        members += [Member(str(shards / s["tar"]), o, n, name) for name, o, n in idx]
    for f, m in zip(files, members):  # same order, same bytes, sanitised keys
        assert m.read() == f.read_bytes()
        key, ext = m.name.split(".", 1)
        assert " " not in key and "." not in key and ext == f.suffix.lower()[1:]
    assert sample_key(7, "class_a/a file.v2.png") == "00000007_class_a_a_file_v2"
    assert cli(["shard", str(folder), str(shards)]) == 2  # refuses to write over shards


@requires_dali
def test_dali_webdataset_reader_reads_the_index_files(folder, shards):
    """DALI's own readers.webdataset, given our .idx files, yields the source files' bytes in order."""
    from nvidia.dali import fn, pipeline_def
    manifest = json.loads((shards / MANIFEST).read_text())
    tars = [str(shards / s["tar"]) for s in manifest["shards"]]
    idxs = [str(shards / s["idx"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=13, num_threads=1, device_id=None)
    def pipe():
        return fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg;png"], random_shuffle=False)
    p = pipe()
    p.build()
    (out,) = p.run()
    got = [np.array(out[i]).tobytes() for i in range(13)]
    assert got == [f.read_bytes() for f in list_images(str(folder))]


@pytest.mark.parametrize("backend", ["torch", "dali_cpu"])
def test_batches_from_shards_equal_the_folder(backend, folder, shards, tmp_path):
    if backend == "dali_cpu" and not _dali():
        pytest.skip("NVIDIA DALI is not installed")
    a_cfg = data_config(folder, tmp_path, backend)
    b_cfg = data_config(shards, tmp_path, backend)  # layout auto finds the manifest
    for epoch, start in ((0, 0), (1, 1)):  # another epoch, and one entered mid-way
        a, la = _batches(a_cfg, epoch, start)
        b, lb = _batches(b_cfg, epoch, start)
        assert len(a) == len(b) == 3 - start
        for (xa, ma), (xb, mb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ma, mb)  # bit for bit
        for step in range(3):
            pa, pb = la.plan(epoch, step), lb.plan(epoch, step)
            assert np.array_equal(pa.files, pb.files)
            assert all(np.array_equal(u, v) for u, v in zip(pa.views, pb.views))
    manifest_cfg = data_config(shards / MANIFEST, tmp_path, backend, layout="webdataset")
    c, _ = _batches(manifest_cfg, 1, 1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(b, c))


def test_two_ranks_read_disjoint_shares_covering_the_epoch(folder, shards, tmp_path):
    cfg = data_config(shards, tmp_path, "torch", batch=2)
    seen = []
    for rank in (0, 1):
        loader = PretrainLoader(cfg, rank=rank, world_size=2)
        steps = loader.micro_batches_per_epoch
        assert steps == 3
        seen.append([int(s) for k in range(steps) for s in loader.plan(0, k).slots])
        x, _ = next(iter(loader.epoch(0)))
        y, _ = next(iter(PretrainLoader(data_config(folder, tmp_path, "torch", batch=2), rank=rank,
                                        world_size=2).epoch(0)))
        assert torch.equal(x, y)
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 12  # 13 samples: one left out of this epoch's whole batches


def _damage(shards):
    """Shard 1: cut the end-of-image marker of its first JPEG member and wreck its second member's tar header."""
    manifest = json.loads((shards / MANIFEST).read_text())
    s = manifest["shards"][1]
    tar = shards / s["tar"]
    idx = read_idx(shards / s["idx"])
    data = bytearray(tar.read_bytes())
    jpg = next(k for k, (n, _, _) in enumerate(idx) if n.endswith(".jpg"))
    other = next(k for k in range(len(idx)) if k != jpg)
    name, off, size = idx[jpg]
    data[off + size - 2:off + size] = b"\0\0"
    data[idx[other][1] - 512 + 10] ^= 0xFF  # inside the name field: the header checksum no longer matches
    tar.write_bytes(bytes(data))
    before = sum(x["samples"] for x in manifest["shards"][:1])
    return before + jpg, before + other


def test_damaged_shard_is_read_member_by_member(folder, tmp_path, caplog):
    shards = _shard(folder, tmp_path / "shards")
    cut, lost = _damage(shards)
    cfg = data_config(shards, tmp_path, "torch", max_skipped_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="simmim_fast.data"):
        loader = PretrainLoader(cfg, log_dir=tmp_path / "log")
    assert "no longer matches the checksum" in caplog.text
    bad = set(loader.index.bad.tolist())
    assert bad == {cut, lost}
    assert loader.index.reasons[cut].startswith("truncated JPEG")
    assert loader.index.reasons[lost].startswith("member missing from damaged shard")
    table = (tmp_path / "log" / "data_bad_files.tsv").read_text()
    assert f"{loader.index.paths[cut]}\t" in table and ".tar:" in table  # named shard:member
    batches = [x for x, _ in loader.epoch(0)]
    skipped = loader.stats()["epochs"][0]
    assert len(batches) == 3 and skipped["skipped"] == sum(int(s in bad) for k in range(3)
                                                             for s in loader.plan(0, k).slots)
    good, _ = _batches(data_config(folder, tmp_path, "torch"))
    compared = 0
    for k in range(3):  # every other sample, of the damaged shard too, is read as from the folder
        for j, s in enumerate(loader.plan(0, k).slots):
            if s not in bad:
                assert torch.equal(batches[k][j], good[k][0][j])
                compared += 1
    assert compared >= 10

ARGS = ["--config", "configs/swin_tiny_cpu.json",
        "--set", "model.img_size=64", "--set", "model.embed_dim=16", "--set", "model.depths=[1,1,1,1]",
        "--set", "model.num_heads=[1,2,2,4]", "--set", "model.window_size=4", "--set", "model.drop_path_rate=0.1",
        "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4", "--set", "train.epochs=10",
        "--set", "train.warmup_epochs=1", "--set", "train.base_lr=0.05", "--set", "train.max_steps=12",
        "--set", "data.num_workers=0", "--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep_last=2",
        "--set", "logging.print_every=1", "--set", "logging.tensorboard=false", "--set", "logging.visualize_every=0",
        "--set", "engine.mode=torch", "--set", "engine.zero_stage=0"]


def _losses(out):
    from simmim_fast.engine.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def _last_step(out):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    return max((json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip().endswith("}")),
               default=0)


def test_kill_and_resume_on_shards_gives_the_same_losses(folder, shards, tmp_path, one_thread, capsys):
    """kill -9 mid-epoch (3 steps an epoch, checkpoints every 4) and resume: per-step losses bit-identical."""
    from simmim_fast.cli import train_main
    args = ARGS + ["--set", f"data.path={json.dumps(str(shards))}",
                   "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'c'))}"]
    train = [sys.executable, str(ROOT / "train.py")] + args
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_main(args + ["--output-dir", str(full)]) == 0  # in-process: one interpreter start less
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 13))
    proc = subprocess.Popen(train + ["--output-dir", str(cut)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _last_step(cut) < 5 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = _last_step(cut)
    assert 5 <= killed_at < 12, "the run must be killed between a checkpoint and the end"
    saved = int((cut / "checkpoints/latest").read_text().strip()[len("step_"):])
    assert saved % 3, "the checkpoint resumed from must lie mid-epoch"
    capsys.readouterr()
    assert train_main(args + ["--output-dir", str(cut)]) == 0  # --resume auto
    assert f"at step {saved} " in capsys.readouterr().out
    assert _losses(cut) == reference


@pytest.mark.parametrize("backend", ["torch", "dali_cpu"])
def test_shard_cut_short_during_training_skips_its_members(backend, folder, tmp_path):
    if backend == "dali_cpu" and not _dali():
        pytest.skip("NVIDIA DALI is not installed")
    shards = _shard(folder, tmp_path / "shards")
    loader = PretrainLoader(data_config(shards, tmp_path, backend, max_skipped_fraction=1.0))
    last = shards / json.loads((shards / MANIFEST).read_text())["shards"][-1]["tar"]
    with open(last, "r+b") as f:  # after the index was built: found only when the members are read
        f.truncate(512)
    batches = [x for x, _ in loader.epoch(0)]
    assert len(batches) == 3 and all(b.shape[0] == 4 for b in batches)
    record = loader.stats()["epochs"][0]
    lost = {r["path"] for r in record["files"]}
    assert record["skipped"] >= 1 and all(p.startswith(str(last) + ":") for p in lost)
    assert all(str(last) not in r["stand_in"] for r in record["files"])
