"""Default data: the real photos that ship inside the scikit-image, scikit-learn and matplotlib wheels.

No download: the files are read from the installed packages (not through `skimage.data` functions,
some of which fetch over the network), keeping their original bytes, and written as shards with the
same writer as ImageNet (`dcssdae.shards.write_shards`).

Split (12 photos; the stereo pair stays together so validation never sees a training view):
  * train: 10 photos (chelsea, rocket, hubble_deep_field, immunohistochemistry, retina, the two
    stereo_motorcycle views, china, flower, grace_hopper), 4 per shard;
  * val: astronaut and coffee, each whole (original bytes) plus its 256 x 256 tiles at native
    resolution on an evenly spaced grid covering the photo (astronaut 2 x 2, coffee 3 x 2, stored as
    lossless PNG): 12 validation images, 6 per shard. The whole photos test the resize path; the tiles
    give enough distinct 256-px targets for PSNR/SSIM/LPIPS (rFID over 12 images is only indicative).

Labels are -1 (no classes). Location: `$DCSSDAE_DATA/photos`, or `data/photos` under the current
directory. `dcssdae photos [OUT]` writes them; `ensure_default_photos()` writes them on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from dcssdae.shards import Item, read_manifest, write_shards

SOURCE = "dcssdae default photos v1"
TILE = 256

# key -> (package, path inside the package, credit / licence)
PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png", "NASA (Eileen Collins), public domain"),
    "chelsea": ("skimage", "data/chelsea.png", "Stefan van der Walt, CC0"),
    "coffee": ("skimage", "data/coffee.png", "Rachel Michetti, CC0"),
    "rocket": ("skimage", "data/rocket.jpg", "SpaceX, public domain"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "NASA, public domain"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "CMMI, no known copyright restrictions"),
    "retina": ("skimage", "data/retina.jpg", "Mikael Haggstrom, CC0"),
    "motorcycle_left": (
        "skimage",
        "data/motorcycle_left.png",
        "Middlebury 2014 stereo benchmark (Scharstein et al.)",
    ),
    "motorcycle_right": (
        "skimage",
        "data/motorcycle_right.png",
        "Middlebury 2014 stereo benchmark (Scharstein et al.)",
    ),
    "china": ("sklearn", "datasets/images/china.jpg", "danielbuechele (Flickr), CC BY 2.0"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "vultilion (Flickr), CC BY 2.0"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "US Navy, public domain"),
}
VAL_PHOTOS = ("astronaut", "coffee")


def default_photos_root() -> Path:
    """`$DCSSDAE_DATA/photos` if DCSSDAE_DATA is set, else `data/photos` under the current directory."""
    return Path(os.environ.get("DCSSDAE_DATA", "data"), "photos")


def photo_file(key: str) -> Path:
    """Path of a photo inside its installed package (found without importing the package)."""
    package, rel, _ = PHOTOS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default photo {key!r} needs the package {package!r}: pip install the project's dependencies"
        )
    path = Path(spec.submodule_search_locations[0], rel)
    if not path.is_file():
        raise FileNotFoundError(f"default photo {key!r} not found at {path} (package {package} changed?)")
    return path


def tile_positions(length: int, tile: int = TILE) -> list[int]:
    """Offsets of ceil(length / tile) tiles spread evenly from 0 to length - tile."""
    n = max(1, math.ceil(length / tile))
    return [(length - tile) // 2] if n == 1 else [round(i * (length - tile) / (n - 1)) for i in range(n)]


def photo_items() -> tuple[list[Item], list[Item]]:
    """(train items, val items) of the default photos, as described in the module docstring."""
    train, val = [], []
    for key, (package, _, credit) in PHOTOS.items():
        path = photo_file(key)
        meta = {"credit": credit, "package": package}
        item = Item(key, -1, str(path), path.read_bytes(), meta)
        if key not in VAL_PHOTOS:
            train.append(item)
            continue
        val.append(item)
        img = Image.open(path).convert("RGB")
        for r, top in enumerate(tile_positions(img.height)):
            for c, left in enumerate(tile_positions(img.width)):
                buf = io.BytesIO()
                img.crop((left, top, left + TILE, top + TILE)).save(buf, "PNG")
                tile_meta = {**meta, "crop": [left, top, TILE, TILE]}
                val.append(
                    Item(f"{key}_tile_r{r}c{c}", -1, f"{path} crop {left},{top}", buf.getvalue(), tile_meta)
                )
    return train, val


@contextmanager
def _locked(root: Path):
    """Hold an exclusive lock on `root/.lock` (so concurrent first runs do not both write the shards)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): unlocked
            pass
        yield


def _urls(root: Path) -> tuple[str, str] | None:
    """Shard patterns of complete default photo shards under `root`, or None."""
    urls = []
    for split in ("train", "val"):
        manifest = read_manifest(root / split)
        complete = manifest.get("complete") and manifest.get("source") == SOURCE
        if not complete or not all((root / split / name).is_file() for name in manifest["shards"]):
            return None
        urls.append(str((root / split / manifest["pattern"]).resolve()))
    return urls[0], urls[1]


def ensure_default_photos(root: str | Path | None = None, force: bool = False) -> tuple[str, str]:
    """Write the default photo shards under `root` unless already there; return (train_urls, val_urls).

    The URLs are absolute brace patterns ("/.../photos/train/train-{000000..000002}.tar").
    """
    root = Path(root) if root is not None else default_photos_root()
    if not force and (urls := _urls(root)):
        return urls
    with _locked(root):
        if not force and (urls := _urls(root)):  # written by another process while we waited
            return urls
        train, val = photo_items()
        write_shards(train, root / "train", "train", 4, source=SOURCE, progress=False)
        write_shards(val, root / "val", "val", 6, source=SOURCE, progress=False)
    return _urls(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae photos",
        description="Write the default real-photo shards (12 photos shipped in the scikit-image, "
        "scikit-learn and matplotlib wheels: 10 train, 2 val + their 256-px tiles). No download.",
    )
    parser.add_argument(
        "out", nargs="?", help="output folder (default: $DCSSDAE_DATA/photos or ./data/photos)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite even if the shards exist")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else default_photos_root()
    train, val = ensure_default_photos(root, force=args.force)
    for split, url in (("train", train), ("val", val)):
        print(f"{split}: {read_manifest(root / split)['total']} images: {url}")
    print("credits: " + "; ".join(f"{k}: {c}" for k, (_, _, c) in PHOTOS.items()))
    return 0
