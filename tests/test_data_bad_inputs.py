"""Every kind of bad input the folder source meets: decoded to RGB, or skipped and listed."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tlflax import config_lib, data
from tlflax.data import decode

R = 16  # stored size: small keeps the test fast
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _rgb(path, colour=RED, size=(30, 20), fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt, **kw)


def _jpeg_bytes(seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_readable(folder: pathlib.Path) -> dict:
    """One file per readable kind; returns name -> what its centre pixel must be."""
    folder.mkdir(parents=True, exist_ok=True)
    _rgb(folder / "plain.jpg", RED, quality=95)
    _rgb(folder / "plain.png", BLUE)
    _rgb(folder / "plain.bmp", RED)
    _rgb(folder / "lossless.webp", BLUE, lossless=True)
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, BLUE)]  # animated: first frame
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.new("L", (30, 20), 77).save(folder / "grey.jpg", quality=95)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    rgba.save(folder / "transparent.png")
    Image.fromarray(np.full((20, 30), 32896, np.uint16)).save(folder / "sixteen_bit.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(folder / "palette_transparent.png", transparency=0)
    # EXIF orientation 6 (display = stored turned 90 degrees clockwise): stored left half
    # red, right half blue, so the displayed image is red on top, blue below.
    halves = np.zeros((30, 60, 3), np.uint8)
    halves[:, :30], halves[:, 30:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(halves).save(folder / "rotated.jpg", quality=95, exif=exif)
    return {
        "plain.jpg": RED,
        "plain.png": BLUE,
        "plain.bmp": RED,
        "lossless.webp": BLUE,
        "anim.gif": RED,
        "grey.jpg": (77, 77, 77),
        "cmyk.jpg": RED,
        "transparent.png": WHITE,
        "sixteen_bit.png": (128, 128, 128),
        "palette_transparent.png": WHITE,
    }


def write_unreadable(folder: pathlib.Path, big: int) -> dict:
    """name -> the reasons it may be given."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    broken = bytearray(good)
    broken[200:600] = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (folder / "corrupt.jpg").write_bytes(bytes(broken))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    Image.new("L", (big, big), 0).save(folder / "bomb.png")  # compresses to a few KB
    return {
        "truncated.jpg": {"truncated"},
        "corrupt.jpg": {"corrupt", "not_an_image"},
        "empty.jpg": {"empty_file"},
        "notes.txt": {"not_an_image"},
        "bomb.png": {"too_large"},
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    readable = write_readable(root / "train" / "good")
    unreadable = write_unreadable(root / "train" / "broken", big=1100)
    for i in range(2):
        _rgb(root / "train" / "broken" / f"fine{i}.png", BLUE)
        _rgb(root / "train" / "other" / f"o{i}.png", RED)
        _rgb(root / "test" / "good" / f"g{i}.png", RED)
    (root / "test" / "broken").mkdir()  # empty: the class is missing from validation
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "README.txt").write_text("class folders below\n")
    return root, readable, unreadable


def folder_config(root, **overrides):
    config = config_lib.get_base_config().data
    config.path = str(root)
    config.workers = 1
    config.max_image_pixels = 1_000_000
    config.max_bad_fraction = 0.5
    for key, value in overrides.items():
        config[key] = value
    return config


def test_readable_kinds_become_rgb(messy):
    root, readable, _ = messy
    for name, colour in readable.items():
        image = data.load_image(root / "train" / "good" / name, resize=R, max_pixels=10**6)
        assert image.shape == (R, R, 3) and image.dtype == np.uint8, name
        np.testing.assert_allclose(image[R // 2, R // 2], colour, atol=6, err_msg=name)


def test_exif_orientation_is_applied(messy):
    root, _, _ = messy
    image = data.load_image(root / "train" / "good" / "rotated.jpg", resize=R)
    np.testing.assert_allclose(image[1, R // 2], RED, atol=20)  # top: red
    np.testing.assert_allclose(image[-2, R // 2], BLUE, atol=20)  # bottom: blue


def test_unreadable_kinds_raise_with_a_reason(messy):
    root, _, unreadable = messy
    for name, reasons in unreadable.items():
        with pytest.raises(data.BadImageError) as info:
            data.load_image(root / "train" / "broken" / name, resize=R, max_pixels=10**6)
        assert info.value.reason in reasons, (name, info.value)


def test_messy_folder_counts_and_manifest(messy, tmp_path):
    root, readable, unreadable = messy
    ds = data.build_datasets(
        folder_config(root), image_size=R, resize=R, seed=0, workdir=str(tmp_path)
    )
    assert ds.class_names == ["broken", "good", "other"]
    n_good = len(readable) + 1  # + rotated.jpg
    assert ds.train.n_examples == n_good + 2 + 2
    assert ds.eval.n_examples == 2
    manifest = json.loads((tmp_path / data.MANIFEST).read_text())
    assert manifest == ds.manifest
    train = manifest["splits"]["train"]
    assert train["n_files"] == n_good + len(unreadable) + 4
    assert train["n_bad"] == len(unreadable) == len(manifest["bad"])
    assert train["images_per_class"] == {"broken": 2, "good": n_good, "other": 2}
    for entry in manifest["bad"]:
        name = pathlib.Path(entry["path"]).name
        assert entry["reason"] in unreadable[name] and entry["split"] == "train"
    ignored = {pathlib.Path(e["path"]).name: e["reason"] for e in manifest["ignored"]}
    assert ignored == {".DS_Store": "hidden", "README.txt": "not in a class folder"}
    assert manifest["warnings"] == ["classes with no validation images: ['broken', 'other']"]
    assert manifest["class_to_index"] == {"broken": 0, "good": 1, "other": 2}
    batch = next(ds.train.iterate(global_batch=4, epoch=0, shuffle=True, drop_remainder=True))
    assert batch["image"].shape == (4, R, R, 3) and batch["image"].dtype == np.uint8


def test_worker_processes_decode_the_same(messy, tmp_path):
    root, _, _ = messy
    paths = sorted((root / "train").glob("*/*"))  # the files in class folders
    one = decode.decode_files(paths, resize=R, max_pixels=10**6, workers=1, chunk=3)
    two = decode.decode_files(paths, resize=R, max_pixels=10**6, workers=2, chunk=3)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert one[2] == two[2] and len(one[2]) == 5


def test_too_many_bad_files_is_an_error(messy, tmp_path):
    root, _, _ = messy
    with pytest.raises(data.DataError, match=r"5 of 20 files .* config.data.max_bad_fraction=0.1"):
        data.build_datasets(
            folder_config(root, max_bad_fraction=0.1),
            image_size=R,
            resize=R,
            seed=0,
            workdir=str(tmp_path),
        )
    manifest = json.loads((tmp_path / data.MANIFEST).read_text())
    assert "max_bad_fraction" in manifest["error"] and len(manifest["bad"]) == 5


def test_empty_training_class_is_an_error(tmp_path):
    for i in range(2):
        _rgb(tmp_path / "data" / "train" / "cat" / f"{i}.png")
        _rgb(tmp_path / "data" / "test" / "cat" / f"{i}.png")
    (tmp_path / "data" / "train" / "dog").mkdir()
    with pytest.raises(data.DataError, match=r"class 'dog' has no training images: .*train/dog"):
        data.build_datasets(
            folder_config(tmp_path / "data"), image_size=R, resize=R, seed=0, workdir=str(tmp_path)
        )


def test_class_with_only_bad_files_is_an_error(tmp_path):
    for i in range(3):
        _rgb(tmp_path / "data" / "train" / "cat" / f"{i}.png")
        (tmp_path / "data" / "train" / "dog").mkdir(exist_ok=True)
        (tmp_path / "data" / "train" / "dog" / f"{i}.jpg").write_bytes(b"")
    _rgb(tmp_path / "data" / "test" / "cat" / "0.png")
    with pytest.raises(data.DataError, match=r"class 'dog' .* all 3 files in .*train/dog"):
        data.build_datasets(
            folder_config(tmp_path / "data", max_bad_fraction=0.9),
            image_size=R,
            resize=R,
            seed=0,
            workdir=str(tmp_path),
        )


def test_single_class_is_an_error(tmp_path):
    for i in range(4):
        _rgb(tmp_path / "data" / "only" / f"{i}.png")
    with pytest.raises(data.DataError, match=r"1 class\(es\) \['only'\].*at least 2"):
        data.build_datasets(
            folder_config(tmp_path / "data", val_fraction=0.25),
            image_size=R,
            resize=R,
            seed=0,
            workdir=str(tmp_path),
        )


def test_class_only_in_validation_is_an_error(tmp_path):
    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "emu")):
        _rgb(tmp_path / "data" / split / name / "0.png")
    with pytest.raises(data.DataError, match=r"class folders \['emu'\]"):
        data.build_datasets(
            folder_config(tmp_path / "data"), image_size=R, resize=R, seed=0, workdir=str(tmp_path)
        )
