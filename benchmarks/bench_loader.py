"""Training loader throughput: dcssdae's WebDataset pipeline vs torchvision's ImageFolder, same images.

Writes N JPEGs (default 200 at 500 x 375, ImageNet's typical size, cut from the default real photos
with random crops and quality 90) as an ImageFolder tree and as shards, then times images/s of:
  * dcssdae ImageNetDataModule.train_dataloader() (shards, shuffle buffer, decode + crop in workers);
  * ImageFolder + the same decode and transform functions (only the data path differs);
  * ImageFolder + stock torchvision transforms (Resize bicubic, RandomCrop, RandomHorizontalFlip,
    ToTensor, Normalize), the usual reference pipeline.
All use the same batch size and workers. The first epoch (worker start-up) is reported apart;
the epochs of the three loaders interleave.

    python benchmarks/bench_loader.py --images 200 --size 256 --workers 2 --epochs 3
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from dcssdae.data import ImageNetDataModule, collate, decode_image, train_transform
from dcssdae.photos import PHOTOS, photo_file
from dcssdae.shards import list_folder, write_shards


def write_images(root: Path, n: int, width: int, height: int, classes: int = 10) -> None:
    """n JPEGs cut from the default photos (random window, resized to width x height), in class folders."""
    rng = random.Random(0)
    photos = [Image.open(photo_file(k)).convert("RGB") for k in PHOTOS]
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0) * min(photo.width / width, photo.height / height)
        w, h = width * scale, height * scale
        left, top = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
        img = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i:05d}.jpg", quality=90)


def epoch_rate(loader) -> float:
    """Images/s of one pass over `loader`."""
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]
    return images / (time.perf_counter() - start)


def time_loaders(loaders: dict, epochs: int) -> list[tuple[str, float, float]]:
    """(name, first-epoch images/s, mean images/s of later epochs); epochs interleave across loaders so
    that load from other processes hits all of them alike."""
    rates = {name: [] for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader))
    return [(name, r[0], float(np.mean(r[1:] or r))) for name, r in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp, "folder"), Path(tmp, "shards")
        write_images(folder, args.images, args.width, args.height)
        items, classes = list_folder(folder)
        manifest = write_shards(
            items, out, "train", max(1, args.images // 8), classes, progress=False, workers=args.workers
        )
        pattern = str(out / manifest["pattern"])
        size, bs, workers = args.size, args.batch_size, args.workers

        dm = ImageNetDataModule(
            pattern,
            pattern,
            image_size=size,
            batch_size=bs,
            num_workers=workers,
            train_epoch_size=args.images,
            shuffle_buffer=1000,
            pin_memory=False,
        )
        dm.setup("fit")
        ours = dm.train_dataloader()

        same = datasets.ImageFolder(
            folder,
            loader=lambda path: decode_image(Path(path).read_bytes()),
            transform=lambda img: train_transform(img, size, 1.0, random),
        )
        same_loader = DataLoader(
            same,
            batch_size=bs,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
            collate_fn=lambda b: collate([x for x, _ in b], [y for _, y in b], [""] * len(b)),
        )
        stock = datasets.ImageFolder(
            folder,
            transform=transforms.Compose(
                [
                    transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                    transforms.RandomCrop(size),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize([0.5] * 3, [0.5] * 3),
                ]
            ),
        )
        stock_loader = DataLoader(
            stock,
            batch_size=bs,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        )

        loaders = {
            "dcssdae shards (ImageNetDataModule)": ours,
            "ImageFolder, same decode + transforms": same_loader,
            "ImageFolder, torchvision transforms": stock_loader,
        }
        rows = time_loaders(loaders, args.epochs)

    reference = rows[1][2]
    print(
        f"\n{args.images} JPEGs {args.width}x{args.height} -> {size}px crops, batch {bs}, {workers} workers, "
        f"{args.epochs} epochs, torch threads 1"
    )
    print(
        f"| {'loader':<38} | {'first epoch img/s':>17} | {'later epochs img/s':>18} "
        f"| {'vs ImageFolder':>14} |"
    )
    print(f"|{'-' * 40}|{'-' * 19}|{'-' * 20}|{'-' * 16}|")
    for name, first, later in rows:
        print(f"| {name:<38} | {first:>17.1f} | {later:>18.1f} | {later / reference:>13.2f}x |")


if __name__ == "__main__":
    main()
