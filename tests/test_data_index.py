"""The file index: bad-file checks, conversion to RGB, the cache, and deterministic stand-ins."""
import os

import numpy as np
import pytest
from PIL import Image

from data_helpers import make_odd_files, photo
from simmim_fast.data.index import BAD, CONVERT, OK, FileResolver, build_index, check_image_file
from simmim_fast.data.transforms import load_rgb


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_files(tmp_path_factory.mktemp("odd"))


def test_header_check_classifies_every_kind(odd):
    results = {name: check_image_file(p) for name, p in odd.items()}
    for name, r in results.items():
        expected = (BAD if name.startswith("bad_") or name == "deep_huffman" else CONVERT if name == "ok_anim"
                    else OK)
        assert r.status == expected, (name, r)
    assert "truncated JPEG" in results["bad_truncated"].reason
    assert "empty file" in results["bad_empty"].reason
    assert "not an image" in results["bad_text"].reason
    notes = {n: results[n].note for n in ("ok_grey", "ok_cmyk", "ok_grey16", "ok_rgb16", "ok_rgba", "ok_palette")}
    assert notes == {"ok_grey": "greyscale", "ok_cmyk": "CMYK", "ok_grey16": "16-bit PNG", "ok_rgb16": "16-bit PNG",
                     "ok_rgba": "RGBA (alpha dropped)", "ok_palette": "palette"}
    assert "GIF (DALI reads a PNG copy)" in results["ok_anim"].note
    assert (results["ok_small"].width, results["ok_small"].height) == (20, 20)
    # A wrecked Huffman table makes libjpeg-turbo complain: the JPEG stream check of every level finds it.
    assert "corrupt JPEG data" in results["deep_huffman"].reason
    # The header check cannot see a wrecked zlib stream; the decode check can.
    assert results["deep_idat"].status == OK
    full = check_image_file(odd["deep_idat"], "decode")
    assert full.status == BAD and "decode failed" in full.reason


def test_decodable_odd_files_become_plain_rgb(odd):
    ref = np.asarray(load_rgb(odd["ok_cat"]), dtype=np.float64)
    for name in ("ok_rgba", "ok_rgb16", "ok_palette", "ok_anim", "ok_cmyk"):
        img = load_rgb(odd[name])
        assert img.mode == "RGB" and img.size == (ref.shape[1], ref.shape[0])
        err = np.abs(np.asarray(img, dtype=np.float64) - ref).mean()
        assert err < (4 if name in ("ok_palette", "ok_anim", "ok_cmyk") else 0.5), name
    grey = np.asarray(photo("camera.png"), dtype=np.float64)
    g16 = np.asarray(load_rgb(odd["ok_grey16"]), dtype=np.float64)
    assert np.abs(g16 - grey[..., None]).max() <= 0  # 16-bit scaled to 8 bits, not clipped at 255


def test_cache_is_reused_and_invalidated(tmp_path):
    files = []
    for i, name in enumerate(("chelsea.png", "coffee.png", "rocket.jpg")):
        p = tmp_path / "ds" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        photo(name).convert("RGB").save(p)
        files.append(p)
    cache = tmp_path / "cache"
    a = build_index(files, "ds", cache_dir=cache)
    assert a.checked == 3 and a.cache_file is not None and a.cache_file.is_file()
    b = build_index(files, "ds", cache_dir=cache)
    assert b.checked == 0
    assert np.array_equal(a.width, b.width) and np.array_equal(a.status, b.status)
    os.utime(files[0], ns=(1, 1))  # touched (same size): checked again
    assert build_index(files, "ds", cache_dir=cache).checked == 1
    photo("astronaut.png").convert("RGB").resize((50, 40)).save(files[1])  # rewritten: checked again
    c = build_index(files, "ds", cache_dir=cache)
    assert c.checked == 1 and (c.width[1], c.height[1]) == (50, 40)
    assert build_index(files, "ds", check="decode", cache_dir=cache).checked == 3  # a stronger check redoes all
    assert build_index(files, "ds", check="header", cache_dir=cache).checked == 0  # ... and satisfies a weaker one
    assert build_index(files, "other", cache_dir=cache).checked == 3  # another dataset key, another cache


def _index(status):
    from simmim_fast.data.index import ImageIndex
    n = len(status)
    return ImageIndex(paths=[f"f{i}" for i in range(n)], width=np.ones(n, np.int64), height=np.ones(n, np.int64),
                      status=np.array(status, np.int8), reasons={i: "bad" for i, s in enumerate(status) if s == BAD})


def test_stand_ins_are_deterministic_and_never_bad():
    status = [OK] * 40
    for i in (3, 4, 5, 17):
        status[i] = BAD
    r = FileResolver(_index(status), seed=0)
    slots = np.arange(40)
    files = r.resolve(slots)
    assert np.array_equal(files, FileResolver(_index(status), seed=0).resolve(slots))
    assert not r.is_bad[files].any()
    ok = np.array(status) != BAD
    assert np.array_equal(files[ok], slots[ok])
    assert len(set(files[[3, 4, 5]].tolist())) == 3  # neighbouring bad files get different stand-ins
    # Finding bad files during training, in either order, gives the stand-ins a full check would give.
    r1, r2 = FileResolver(_index([OK] * 40), 0), FileResolver(_index([OK] * 40), 0)
    for i in (3, 4, 5, 17):
        r1.mark_bad(i, "x")
    for i in (17, 5, 4, 3):
        r2.mark_bad(i, "x")
    assert np.array_equal(r1.resolve(slots), files) and np.array_equal(r2.resolve(slots), files)
    assert not np.array_equal(files, FileResolver(_index(status), seed=1).resolve(slots))
    with pytest.raises(ValueError, match="none of the 2 files"):
        FileResolver(_index([BAD, BAD]), 0)


def test_min_side_and_unreadable_listing(tmp_path):
    p = tmp_path / "small.png"
    Image.new("RGB", (30, 50)).save(p)
    idx = build_index([p], "x", cache_dir=tmp_path / "c")
    idx.restrict_min_side(31)
    assert idx.status[0] == BAD and "data.min_image_side" in idx.reasons[0]
    gone = build_index([tmp_path / "missing.jpg"], "y", cache_dir=tmp_path / "c")
    assert gone.status[0] == BAD and "FileNotFoundError" in gone.reasons[0]
