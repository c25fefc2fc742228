"""Fuzzing (hypothesis) the two places where outside bytes enter: image decoding and the shard readers.

`decode_image` must return an RGB image or raise ImageDecodeError, whatever the bytes. The training stream must
skip (and count) what it cannot read and either yield batches or stop with its clear RuntimeError; it must
never hang or fail with another exception. Validation must skip and log unreadable data."""

import io
import logging
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dcssdae.data import ImageDecodeError, TrainShards, ValShards, decode_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on damaged files

S = 32
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])


def encode(fmt: str, mode: str = "RGB", size=(24, 20), seed: int = 0) -> bytes:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(a[..., 0] if channels == 1 else a, mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


VALID = [encode("JPEG"), encode("PNG"), encode("PNG", "RGBA"), encode("GIF", "L"), encode("BMP"),
         encode("WEBP"), encode("TIFF"), encode("JPEG", "L", (7, 300))]


@st.composite
def mutated(draw, originals=VALID):
    """A valid image's bytes with random byte flips, a truncation, an insertion or a splice."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[pos : pos + draw(st.integers(1, 64))] = draw(st.binary(max_size=64))
    return bytes(data)


def check_decode(data: bytes) -> None:
    try:
        img = decode_image(data)
    except ImageDecodeError as e:
        assert str(e)  # a reason
        return
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width > 0 and img.height > 0
    np.asarray(img)  # the pixels are there (decoded, not lazily pending)


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_random_bytes(data):
    check_decode(data)


@FUZZ
@given(mutated())
def test_decode_mutated_images(data):
    check_decode(data)


def test_decode_valid_images_and_known_failures():
    for data in VALID:
        assert decode_image(data).mode == "RGB"
    for data, reason in [(b"", "empty"), (b"hello", "not an image"), (VALID[0][:40], "corrupt or truncated")]:
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(data)


# ------------------------------------------------------------------------------------------------
# Shard readers over random and mutated tar files.


def tar_bytes(samples: list[tuple[str, str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, data in samples:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD_SHARD = tar_bytes([(f"img{i}", ext, data) for i, (ext, data) in enumerate(
    [("jpg", VALID[0]), ("png", VALID[1]), ("jpg", VALID[7]), ("webp", VALID[5])])]
    + [(f"img{i}", "cls", str(i).encode()) for i in range(4)])


@st.composite
def shard_bytes(draw):
    """Random bytes, a mutated valid shard, or a valid tar whose members are random / mutated images."""
    kind = draw(st.sampled_from(["random", "mutated_tar", "odd_members"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "mutated_tar":
        return draw(mutated(originals=[GOOD_SHARD]))
    members = []
    for i in range(draw(st.integers(0, 4))):
        ext = draw(st.sampled_from(["jpg", "png", "cls", "json", "txt", "jpeg"]))
        data = draw(st.one_of(st.binary(max_size=256), mutated(), st.sampled_from(VALID)))
        members.append((draw(st.sampled_from([f"k{i}", "k0", "a.b", "dir/k"])), ext, data))
    return tar_bytes(members)


@FUZZ
@given(shard_bytes(), st.booleans())
def test_train_stream_skips_or_stops_cleanly(tmp_path, data, with_good_shard):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    urls = [str(bad)]
    if with_good_shard:
        (tmp_path / "good.tar").write_bytes(GOOD_SHARD)
        urls.append(str(tmp_path / "good.tar"))
    stream = TrainShards(urls, S, 1.0, batch_size=2, batches_per_rank=3, shuffle_buffer=4)
    stream.max_consecutive_skips = 50  # give up sooner than in real runs (1000+), to keep the test fast
    logging.disable(logging.WARNING)
    try:
        batches = list(stream)
    except RuntimeError as e:  # the stream's own, clear reason to give up
        assert not with_good_shard, e  # with a readable shard beside it, it must not give up
        assert "no readable training shards" in str(e) or "failed to decode" in str(e)
        return
    finally:
        logging.disable(logging.NOTSET)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (2, 3, S, S) and batch["skipped"] >= 0


@FUZZ
@given(shard_bytes())
def test_validation_reader_skips_unreadable_data(tmp_path, data):
    bad = tmp_path / "val.tar"
    bad.write_bytes(data)
    logging.disable(logging.WARNING)
    try:
        batches = list(ValShards([str(bad)], S, batch_size=2, rank=0, world_size=1))
    finally:
        logging.disable(logging.NOTSET)
    for batch in batches:
        assert batch["image"].shape[1:] == (3, S, S) and batch["image"].shape[0] <= 2


def test_train_stream_survives_a_vanishing_shard(tmp_path, caplog):
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(GOOD_SHARD)
    stream = TrainShards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], S, 1.0, batch_size=2,
                         batches_per_rank=40, shuffle_buffer=4)
    batches = iter(stream)
    next(batches)
    (tmp_path / "b.tar").unlink()  # deleted while the run reads it (a cleaned-up scratch disk)
    assert len(list(batches)) == 39
    assert "skipped unreadable shard data" in caplog.text and "b.tar" in caplog.text
    (tmp_path / "a.tar").unlink()
    with pytest.raises(RuntimeError, match="no readable training shards"):
        list(stream)


@pytest.mark.parametrize("members", [[], [("a", "json", b"{}"), ("b", "cls", b"1")], [("c", "jpg", b"junk")]])
def test_train_stream_without_any_image_stops_instead_of_hanging(tmp_path, members):
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    stream = TrainShards([str(tmp_path / "s.tar")], S, 1.0, batch_size=2, batches_per_rank=3, shuffle_buffer=4)
    with pytest.raises(RuntimeError, match="no readable training shards|failed to decode"):
        list(stream)
