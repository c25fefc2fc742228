"""The default photos: three splits with no photo and no near-duplicate in two of them, stored sizes, and the colour
augmentation meant for small photo sets."""

import random

import numpy as np
import pytest
from PIL import Image

from dcssdae import photos
from dcssdae.images import decode_image, train_transform


@pytest.fixture(scope="module")
def stored():
    """{key: decoded RGB image as stored in the shards} for every default photo."""
    return {key: photos.stored_photo(key)[1] for key in photos.PHOTOS}


def test_splits_partition_the_photos_and_keep_groups_together():
    split_of = photos.SPLIT_OF
    assert set(split_of) == set(photos.PHOTOS) and set(split_of.values()) == {"train", "dev", "test"}
    assert len(set(photos.DEV)) == len(photos.DEV) >= 6 and len(set(photos.TEST)) == len(photos.TEST) >= 20
    assert not set(photos.DEV) & set(photos.TEST)
    assert sum(s == "train" for s in split_of.values()) >= 50
    for group in photos.GROUPS:
        assert {split_of[key] for key in group} and len({split_of[key] for key in group}) == 1, group
    items = photos.photo_items(("dev", "test"))
    assert [i.key for i in items["dev"]] == [k for k in photos.PHOTOS if k in photos.DEV]
    assert sorted(i.key for i in items["test"]) == sorted(photos.TEST)
    assert all(i.meta["credit"] and i.meta["package"] for i in items["test"])


def test_no_near_duplicate_across_splits(stored):
    assert photos.near_duplicates(stored, photos.SPLIT_OF) == []


def test_near_duplicate_check_finds_stereo_pairs_and_crops(stored):
    """The check above could fail: it flags the stereo pair and views of one photo placed in different splits."""
    left, right = stored["motorcycle_left"], stored["motorcycle_right"]
    sail = stored["sail"]
    w, h = sail.size
    half = sail.crop((w // 4, h // 5, w // 4 + w // 2 + 40, h // 5 + h // 2 + 40)).resize((400, 300), Image.BICUBIC)
    images = {"left": left, "right": right, "sail": sail, "sail_view": half, "tulips": stored["tulips"]}
    split_of = {"left": "train", "right": "test", "sail": "test", "sail_view": "dev", "tulips": "train"}
    found = {(a, b) for a, b, _ in photos.near_duplicates(images, split_of)}
    assert found == {("left", "right"), ("sail", "sail_view")}


def test_large_photos_are_stored_at_a_bounded_size():
    data, img = photos.stored_photo("interior_2416933")  # 1920 x 1320 in its package
    assert min(img.size) == photos.MAX_SHORT_SIDE and img.size == (1117, 768)
    assert data[:3] == b"\xff\xd8\xff" and decode_image(data).size == img.size
    data, img = photos.stored_photo("kiwi")  # 320 x 320: the file's own bytes
    assert data == photos.photo_file("kiwi").read_bytes() and img.size == (320, 320)


def test_channel_permutation_reorders_the_channels_of_the_same_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    orders = set()
    for seed in range(40):
        plain = np.asarray(train_transform(img, 64, 1.5, random.Random(seed)))
        permuted = np.asarray(train_transform(img, 64, 1.5, random.Random(seed), aug_permute=1.0))
        order = [next(c for c in range(3) if np.array_equal(permuted[..., k], plain[..., c])) for k in range(3)]
        assert sorted(order) == [0, 1, 2]
        orders.add(tuple(order))
    assert len(orders) == 6  # every order, the identity included
    never = [np.asarray(train_transform(img, 64, 1.5, random.Random(s), aug_permute=0.0)) for s in range(3)]
    assert all(np.array_equal(a, np.asarray(train_transform(img, 64, 1.5, random.Random(s))))
               for s, a in enumerate(never))
