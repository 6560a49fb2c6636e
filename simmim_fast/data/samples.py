"""The embedded default dataset: real photographs that scikit-image ships inside its wheel.

Used when ``data.path`` is null, so the README's main job runs right after ``pip install`` with no
download. Only real photographs (and micrographs / astronomy images) are listed, never synthetic
test patterns.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from ..errors import UserError

# File names inside skimage/data; greyscale ones are converted to RGB by the loaders.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg",
)


def sample_photo_dir() -> Path:
    try:
        import skimage
    except ImportError as e:  # scikit-image is an install requirement; this only happens in a broken env
        raise UserError("data.path is null, which means the sample photos of scikit-image, but scikit-image "
                           "is not installed: pip install scikit-image, or set data.path") from e
    return Path(os.path.dirname(skimage.__file__)) / "data"


def sample_photo_paths() -> List[Path]:
    """Absolute paths of the shipped sample photos that exist in this scikit-image install."""
    d = sample_photo_dir()
    paths = [d / n for n in SKIMAGE_PHOTOS if (d / n).is_file()]
    if not paths:
        raise UserError(f"no sample photos found in {d}; set data.path to your own images")
    return paths
