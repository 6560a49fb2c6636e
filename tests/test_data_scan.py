"""``simmim-fast scan``: what training would skip, convert or use; the index it caches is the loader's."""
from data_helpers import data_config, make_odd_files, make_photo_tree
from simmim_fast.cli import main
from simmim_fast.data import PretrainLoader


def test_scan_reports_and_caches(tmp_path, capsys):
    root = tmp_path / "ds"
    make_photo_tree(root / "photos", 6)
    odd = make_odd_files(root / "odd")
    cache = tmp_path / "cache"
    listing = tmp_path / "skipped.tsv"
    assert main(["scan", str(root), "--cache-dir", str(cache), "--workers", "2", "--list", str(listing)]) == 0
    out = capsys.readouterr().out
    assert "scanned 22 files" in out and "usable: 18" in out and "would skip: 4 (18.18%)" in out
    for line in ("1 truncated JPEG", "1 empty file", "1 not an image", "1 corrupt JPEG data", "2 16-bit PNG", "1 CMYK",
                 "1 GIF (DALI reads a PNG copy)", "1 RGBA (alpha dropped)", "training would refuse to start"):
        assert line in out, line
    assert f"{odd['bad_truncated']}: truncated JPEG (no end-of-image marker)" in out
    rows = listing.read_text().splitlines()
    assert rows[0] == "path\treason" and len(rows) == 5
    # The loader takes the scan's index from the cache instead of checking the files again.
    loader = PretrainLoader(data_config(root, tmp_path, max_skipped_fraction=0.5))
    assert loader.index.checked == 0 and len(loader.index.bad) == 4

    assert main(["scan", str(root), "--cache-dir", str(cache), "--workers", "2", "--check", "decode",
                 "--strict", "--show", "1"]) == 1
    out = capsys.readouterr().out
    assert "would skip: 5" in out and "1 decode failed" in out and "... and 4 more" in out

    assert main(["scan", str(root / "photos"), "--cache-dir", str(cache), "--strict"]) == 0
    assert "would skip: 0" in capsys.readouterr().out


def test_scan_errors(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)]) == 2
    assert "data.path does not exist" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--set", "data.check=quick"]) == 2
    assert "data.check" in capsys.readouterr().err
