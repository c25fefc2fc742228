"""The shard writer (`dcssdae shards`) and image decoding, on good and deliberately broken files."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from dcssdae import shards
from dcssdae.data import ImageDecodeError, decode_image

RNG = np.random.default_rng(0)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), built chunk by chunk."""
    h, w, _ = a.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def rgba_half_transparent() -> Image.Image:
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 200  # red
    a[:, 8:, 3] = 255  # right half opaque, left half transparent
    return Image.fromarray(a, "RGBA")


GOOD = {  # relative path -> (bytes, format PIL must detect)
    "cls_a/good.jpg": (encode(rgb(40, 30), "JPEG"), "JPEG"),
    "cls_a/cmyk.jpg": (encode(rgb(24, 20).convert("CMYK"), "JPEG"), "JPEG"),
    "cls_a/gray16.png": (encode(Image.fromarray(np.full((12, 10), 40000, np.uint16)), "PNG"), "PNG"),
    "cls_a/rgb16.png": (png16_rgb(np.full((9, 11, 3), 65535, np.uint16)), "PNG"),
    "cls_a/tiny.png": (encode(rgb(8, 8), "PNG"), "PNG"),
    "cls_b/alpha.png": (encode(rgba_half_transparent(), "PNG"), "PNG"),
    "cls_b/palette.png": (encode(rgb(20, 20).convert("P"), "PNG"), "PNG"),
    "cls_b/png_named.jpg": (encode(rgb(30, 30), "PNG"), "PNG"),
    "cls_b/name.with.dots.webp": (encode(rgb(32, 24), "WEBP"), "WEBP"),
}
good_jpeg = encode(rgb(64, 48), "JPEG")
BAD = {  # relative path -> (bytes, expected words in the reason)
    "cls_b/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
    "cls_b/empty.jpg": (b"", "empty"),
    "cls_b/text.jpg": (b"this is not an image\n" * 20, "not an image"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for rel, (data, _) in {**GOOD, **BAD}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "cls_a" / ".DS_Store").write_bytes(b"hidden files are ignored")
    return src


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_decode_modes():
    def pixel(data, xy=(0, 0)):
        img = decode_image(data)
        assert img.mode == "RGB"
        return img.getpixel(xy)

    assert pixel(GOOD["cls_a/gray16.png"][0]) == (156,) * 3  # 40000 * 255 / 65535 = 155.6
    assert pixel(encode(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG")) == (255,) * 3
    assert pixel(GOOD["cls_a/rgb16.png"][0]) == (255,) * 3
    white = encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100)
    assert min(pixel(white)) >= 250
    alpha = GOOD["cls_b/alpha.png"][0]
    assert pixel(alpha, (0, 0)) == (255, 255, 255)  # transparent -> white
    assert pixel(alpha, (15, 0)) == (200, 0, 0)  # opaque kept
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert pixel(encode(p, "PNG", transparency=1)) == (255, 255, 255)
    assert pixel(encode(p, "PNG")) == (10, 20, 30)
    assert pixel(encode(Image.new("LA", (4, 4), (0, 0)), "PNG")) == (255, 255, 255)
    assert decode_image(GOOD["cls_a/tiny.png"][0]).size == (8, 8)


@pytest.mark.parametrize("rel", sorted(BAD))
def test_decode_errors(rel):
    data, words = BAD[rel]
    with pytest.raises(ImageDecodeError, match=words):
        decode_image(data)


def test_folder_to_shards(folder, tmp_path, capsys):
    out = tmp_path / "train"
    assert shards.main([str(folder), str(out), "--shard-size", "3", "--workers", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["classes"] == ["cls_a", "cls_b"]
    assert manifest["inputs"] == len(GOOD) + len(BAD) and manifest["total"] == len(GOOD)
    assert manifest["pattern"] == "train-{000000..000003}.tar"
    assert sum(manifest["shards"].values()) == len(GOOD) and len(manifest["shards"]) == 4
    # every bad file reported, with path and reason, in the manifest and on stderr
    reasons = {s["path"].split("/src")[-1].split("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(BAD)
    err = capsys.readouterr().err
    for rel, (_, words) in BAD.items():
        assert words in reasons[rel] and rel in err

    samples = {}
    for name in manifest["shards"]:
        for member, data in read_tar(out / name).items():
            key, ext = member.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    assert len(samples) == len(GOOD)
    for rel, (data, fmt) in GOOD.items():
        key = rel.rsplit(".", 1)[0].replace("/", "_").replace(".", "_")
        ext = shards.EXTENSIONS[fmt]
        assert samples[key][ext] == data, rel  # original bytes, extension from the content
        assert int(samples[key]["cls"]) == (0 if rel.startswith("cls_a") else 1)
        meta = json.loads(samples[key]["json"])
        assert meta["format"] == fmt and meta["source"].endswith(rel)
        decode_image(samples[key][ext])


def test_resume_and_determinism(folder, tmp_path):
    out = tmp_path / "out"
    args = [str(folder), str(out), "--shard-size", "4", "--workers", "1", "--no-progress"]
    shards.main(args)
    names = sorted(p.name for p in out.glob("out-*.tar"))
    first = {n: (out / n).read_bytes() for n in names}
    stamp = {n: (out / n).stat().st_mtime_ns for n in names}

    shards.main(args)  # nothing changed: every shard kept
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamp

    (out / names[1]).unlink()  # interrupted run: one shard missing
    shards.main(args)
    assert {n: (out / n).read_bytes() for n in names} == first  # rewritten identically
    assert all((out / n).stat().st_mtime_ns == stamp[n] for n in names if n != names[1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == len(GOOD) and len(manifest["skipped"]) == len(BAD)


def test_class_order_and_unlabelled(folder, tmp_path):
    (tmp_path / "classes.txt").write_text("cls_b\ncls_a\nextra\n")
    items, classes = shards.list_folder(folder, shards._read_classes(str(tmp_path / "classes.txt")))
    assert classes == ["cls_b", "cls_a", "extra"]
    assert {i.label for i in items if "cls_a" in i.source} == {1}
    with pytest.raises(ValueError, match="cls_a"):
        shards.list_folder(folder, ["cls_b"])
    items, classes = shards.list_folder(folder, labels=False)
    assert classes == [] and {i.label for i in items} == {-1}


def test_unique_keys(tmp_path):
    for name in ("a.jpg", "a.png", "a_png.jpg"):
        (tmp_path / name).write_bytes(encode(rgb(8, 8), "PNG"))
    items, _ = shards.list_folder(tmp_path)
    assert len({i.key for i in items}) == 3


def test_parquet_to_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = [encode(rgb(20 + i, 16), "JPEG") for i in range(4)]
    images.append(images[0][: len(images[0]) // 2])  # truncated
    rows = {
        "image": [{"bytes": b, "path": f"n0{i}_{i}.JPEG" if i != 2 else None} for i, b in enumerate(images)],
        "label": [3, 1, 0, 2, 1],
    }
    hf = {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"_type": "ClassLabel", "names": ["tench", "goldfish", "shark", "hen"]},
            }
        }
    }
    table = pa.Table.from_pydict(rows).replace_schema_metadata({"huggingface": json.dumps(hf)})
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    pq.write_table(table.slice(0, 3), data / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(3), data / "train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 1), data / "validation-00000-of-00001.parquet")

    out = tmp_path / "train"
    shards.main(
        [
            str(tmp_path / "hf"),
            str(out),
            "--split",
            "train",
            "--shard-size",
            "3",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "parquet" and manifest["classes"] == ["tench", "goldfish", "shark", "hen"]
    assert (
        manifest["inputs"] == 5
        and manifest["total"] == 4
        and manifest["shards"] == {"train-000000.tar": 3, "train-000001.tar": 1}
    )
    assert "row1" in manifest["skipped"][0]["path"] and "truncated" in manifest["skipped"][0]["reason"]
    members = {**read_tar(out / "train-000000.tar"), **read_tar(out / "train-000001.tar")}
    assert members["n00_0.jpg"] == images[0] and members["n00_0.cls"] == b"3"
    assert members["train-00000-of-00002_0000002.cls"] == b"0"  # no path: file stem + row
    assert members["n03_3.jpg"] == images[3] and members["n03_3.cls"] == b"2"
