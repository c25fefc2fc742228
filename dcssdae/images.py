"""One image: bytes -> RGB PIL image (`decode_image`, any mode and bit depth; `ImageDecodeError` otherwise), and the
train / validation transforms of the SSDD / DC-AE recipe (PIL -> PIL, size x size).

Pure functions, imported by the data sets (`data.py`), the shard writer (`shards.py`, which checks that every stored
image decodes) and the exporters; imports nothing of ours.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, UnidentifiedImageError

# File extensions under which a shard sample may hold its image (the writer uses the format PIL detects).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jp2")

# ------------------------------------------------------------------------------------------------
# Decoding: bytes -> RGB PIL image, or ImageDecodeError. Pure, so it can be fuzzed.


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, unknown format, corrupt or truncated)."""


def _to_8bit(a: np.ndarray, full_scale: float) -> np.ndarray:
    """Scale integers or floats in [0, full_scale] to uint8 with rounding (65535 -> 255, 32768 -> 128)."""
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha onto a white background (what a browser shows on a white page)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB.

    * 16-bit grey ("I;16*") is rescaled to 8 bits (v * 255 / 65535, rounded). 32-bit integer grey ("I")
      is read as 16-bit data unless all values fit in 8 bits; float grey ("F") as [0, 1] if its
      maximum is <= 1, else as [0, 255]. 16-bit RGB(A) PNGs are already reduced to 8 bits by PIL.
    * CMYK (including Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV, 1-bit and grey go through PIL's
      conversion. ICC profiles and EXIF orientation are ignored, as in torchvision's ImageFolder.
    * Alpha (RGBA, LA, PA, palette with a transparent colour) is composited onto white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img), 65535.0)).convert("RGB")
    if mode == "I":
        a = np.asarray(img)
        return Image.fromarray(_to_8bit(a, 65535.0 if a.size and a.max() > 255 else 255.0)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        return Image.fromarray(_to_8bit(a, 1.0 if a.size and a.max() <= 1.0 else 255.0)).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _on_white(img)
    return img.convert("RGB")


# Magic numbers, to tell a damaged image file from a file that is no image at all, and to name the format of a file
# PIL could not open.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG2000",
    b"\xff\x4f\xff\x51": "JPEG2000",
}


def _sniff(data: bytes) -> str | None:
    """The image format `data` starts like (its magic number, or a file cut inside it), else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic) or (len(data) >= 2 and magic.startswith(data)):
            return fmt
    return None


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (any format PIL reads) into an RGB PIL image; raise `ImageDecodeError` otherwise.

    The full pixel data is decoded here (`load()`), so a truncated file fails now, not later. The error names the
    format: the one PIL detected, or, when PIL fails before detecting it (a header cut short), the one its magic
    number says. Multi-frame files (GIF, TIFF, MPO) give their first frame.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    img = None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)
    except UnidentifiedImageError:
        sniffed = _sniff(data)
        if sniffed:
            raise ImageDecodeError(f"corrupt or truncated {sniffed} (PIL cannot read its header)") from None
        raise ImageDecodeError("not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"too many pixels: {e}") from None
    except Exception as e:  # noqa: BLE001 (PIL raises OSError, ValueError, SyntaxError, struct.error, ...)
        fmt = (img.format if img is not None else None) or _sniff(data) or "image (unknown format)"
        raise ImageDecodeError(f"corrupt or truncated {fmt}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Transforms (SSDD / DC-AE recipe). Resampling is bicubic with PIL's antialiasing; the resize reads
# only the crop window (`resize(box=...)`), which equals "resize, then crop" but costs S*S outputs.


def _resized_size(img: Image.Image, short_side: int) -> tuple[int, int]:
    """(width, height) of `img` resized so that its short side is `short_side` (rounded like torchvision)."""
    w, h = img.size
    if w <= h:
        return short_side, max(short_side, round(h * short_side / w))
    return max(short_side, round(w * short_side / h)), short_side


def _resize_crop(img: Image.Image, resized: tuple[int, int], left: int, top: int, size: int) -> Image.Image:
    """The size x size window at (left, top) of `img` resized to `resized`, resampling only that window."""
    sx, sy = resized[0] / img.width, resized[1] / img.height
    box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
    return img.resize((size, size), Image.BICUBIC, box=box)


def color_matrix(hue: float, saturation: float) -> np.ndarray:
    """3x3 RGB matrix that rotates hue by `hue` radians about the grey axis and scales saturation (the distance
    from that axis) by `saturation`: M = P + saturation * R (I - P), P the projection on (1, 1, 1) / sqrt(3), R the
    rotation about it (Rodrigues' formula). Grey stays grey; brightness (the channel mean) is kept."""
    k = np.full(3, 1 / math.sqrt(3))
    p = np.outer(k, k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = math.cos(hue) * np.eye(3) + math.sin(hue) * cross + (1 - math.cos(hue)) * p
    return p + saturation * rotation @ (np.eye(3) - p)


def train_transform(img: Image.Image, size: int, aug_scale: float, rng: random.Random,
                    aug_color: float = 0.0, aug_permute: float = 0.0) -> Image.Image:
    """Short side scaled to s ~ U[size, size * aug_scale], random size x size crop, flip with p = 1/2; with
    aug_color = a > 0, hue rotated by U[-pi a, pi a] and saturation scaled by exp(U[-a, a]) (`color_matrix`); with
    aug_permute = p > 0, the RGB channels put in a random order (one of the 6, identity included) with
    probability p. Both change colours in ways a photo's own statistics cannot undo, so that a small photo set
    teaches the whole palette rather than its own."""
    w, h = _resized_size(img, round(rng.uniform(size, size * aug_scale)))
    img = _resize_crop(img, (w, h), rng.randint(0, w - size), rng.randint(0, h - size), size)
    img = img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
    if aug_color > 0:
        matrix = color_matrix(rng.uniform(-math.pi, math.pi) * aug_color, math.exp(rng.uniform(-1, 1) * aug_color))
        rgb = np.asarray(img, dtype=np.float32) @ matrix.T.astype(np.float32)
        img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    if aug_permute > 0 and rng.random() < aug_permute:
        order = rng.sample(range(3), 3)
        img = Image.merge("RGB", [img.getchannel(c) for c in order])
    return img


def val_transform(img: Image.Image, size: int) -> Image.Image:
    """Short side resized to `size`, centre crop size x size (images smaller than that are upscaled)."""
    w, h = _resized_size(img, size)
    return _resize_crop(img, (w, h), round((w - size) / 2), round((h - size) / 2), size)
