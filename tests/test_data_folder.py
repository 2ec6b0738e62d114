"""Folder and digits sources: layouts, class order, the decode cache, no TensorFlow needed."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tlflax import config_lib, data
from tlflax.data import decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**overrides):
    config = config_lib.get_base_config().data
    for key, value in overrides.items():
        config[key] = value
    return config


def write_class_folders(root, counts: dict, size=(24, 18)):
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            colour = (40 * c % 256, 7 * i % 256, 200)
            Image.new("RGB", size, colour).save(root / name / f"{i:03d}.png")


@pytest.mark.shared_data
def test_flowers12_counts_order_and_cache_reuse(shared_data, tmp_path):
    config = data_config(path=str(shared_data / "flowers12"), cache_dir=str(tmp_path / "cache"))
    before = decode.N_DECODED
    first = data.build_datasets(config, image_size=48, resize=56, seed=0, workdir=str(tmp_path))
    assert decode.N_DECODED - before == 960
    assert first.num_classes == 12
    assert first.class_names == sorted(first.class_names)
    assert first.class_names[:3] == ["bluebell", "buttercup", "colts-foot"]
    assert (first.train.n_examples, first.eval.n_examples) == (720, 240)
    assert first.manifest["splits"]["train"]["images_per_class"] == dict.fromkeys(
        first.class_names, 60
    )
    assert first.manifest["bad"] == [] and first.manifest["splits"]["eval"]["n_images"] == 240

    second = data.build_datasets(
        config, image_size=48, resize=56, seed=1, workdir=str(tmp_path / "run2")
    )
    assert decode.N_DECODED - before == 960  # nothing decoded again
    assert second.manifest["splits"]["train"]["cache"]["status"] == "loaded"
    assert second.class_names == first.class_names
    np.testing.assert_array_equal(second.train.images, first.train.images)
    np.testing.assert_array_equal(second.eval.labels, first.eval.labels)
    saved = json.loads((tmp_path / "run2" / data.MANIFEST).read_text())
    assert saved["class_to_index"]["windflower"] == 11

    batch = next(second.eval.iterate(global_batch=64, epoch=0, shuffle=False, drop_remainder=False))
    assert batch["image"].shape == (64, 56, 56, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool


def test_class_layout_with_seeded_stratified_validation(tmp_path):
    write_class_folders(tmp_path / "pets", {"cat": 10, "dog": 5, "emu": 3})
    config = data_config(path=str(tmp_path / "pets"), val_fraction=0.2, workers=1)
    ds = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.manifest["splits"]["eval"]["images_per_class"] == {"cat": 2, "dog": 1, "emu": 1}
    assert ds.train.n_examples + ds.eval.n_examples == 18
    again = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    np.testing.assert_array_equal(again.eval.images, ds.eval.images)
    same = data.build_datasets(config, image_size=8, resize=8, seed=5, workdir=str(tmp_path))
    np.testing.assert_array_equal(same.eval.images, ds.eval.images)  # the seed keeps the split
    config.split_seed = 5  # data.split_seed carves another
    other = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    assert not np.array_equal(other.eval.images, ds.eval.images)


def test_layout_errors_say_what_to_set(tmp_path):
    write_class_folders(tmp_path / "pets", {"cat": 2, "dog": 2})
    config = data_config(path=str(tmp_path / "pets"), workers=1)
    with pytest.raises(data.DataError, match="val_fraction"):
        data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    write_class_folders(tmp_path / "split" / "train", {"cat": 2, "dog": 2})
    config = data_config(path=str(tmp_path / "split"), workers=1)
    no_val = r"none of the validation folders .* \(found \['train'\]\)"
    with pytest.raises(data.DataError, match=no_val):
        data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    with pytest.raises(data.DataError, match="config.data.path"):
        data.build_datasets(
            data_config(path=str(tmp_path / "nowhere")),
            image_size=8,
            resize=8,
            seed=0,
            workdir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="image_size <= resize"):
        data.build_datasets(config, image_size=16, resize=8, seed=0, workdir=str(tmp_path))


def test_changed_folder_builds_a_new_cache(tmp_path):
    write_class_folders(tmp_path / "pets", {"cat": 4, "dog": 4})
    config = data_config(path=str(tmp_path / "pets"), val_fraction=0.25, workers=1)
    build = lambda: data.build_datasets(
        config, image_size=8, resize=8, seed=0, workdir=str(tmp_path)
    )  # noqa: E731
    assert build().manifest["splits"]["train"]["cache"]["status"] == "built"
    assert build().manifest["splits"]["train"]["cache"]["status"] == "loaded"
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "pets" / "dog" / "new.png")
    rebuilt = build()
    assert rebuilt.manifest["splits"]["train"]["cache"]["status"] == "built"
    assert rebuilt.train.n_examples + rebuilt.eval.n_examples == 9


def test_digits_demo_dataset(tmp_path):
    config = data_config(source="digits", val_fraction=0.2)
    ds = data.build_datasets(config, image_size=12, resize=16, seed=0, workdir=str(tmp_path))
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.train.n_examples + ds.eval.n_examples == 1797
    assert abs(ds.eval.n_examples - 360) <= 5
    assert ds.train.images.shape[1:] == (16, 16, 3) and ds.train.images.dtype == np.uint8
    grey = ds.train.images
    assert (grey[..., 0] == grey[..., 1]).all() and grey.max() > 200
    counts = np.bincount(ds.eval.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class


def test_folder_path_and_augment_run_without_tensorflow(tmp_path):
    write_class_folders(tmp_path / "pets", {"cat": 6, "dog": 6})
    script = textwrap.dedent(
        f"""
        import sys
        import jax
        from tlflax import config_lib, data
        from tlflax import preprocessing as pp
        config = config_lib.get_base_config()
        config.data.path = {str(tmp_path / "pets")!r}
        config.data.val_fraction = 0.25
        config.data.workers = 2
        for _ in range(2):  # cold, then warm from the cache
            ds = data.build_datasets(config.data, image_size=8, resize=10, seed=0,
                                     workdir={str(tmp_path / "work")!r})
        batch = next(ds.train.iterate(global_batch=4, epoch=0, shuffle=True, drop_remainder=True))
        prep = pp.imagenet(8, crop_pct=0.8)
        train_fn = data.augment.make_train_transform(
            config.aug, image_size=8, num_classes=2, preprocessing=prep)
        x, t = jax.jit(train_fn)(jax.random.key(0), batch["image"], batch["label"])
        eval_fn = data.augment.make_eval_transform(image_size=8, preprocessing=prep)
        assert x.shape == (4, 8, 8, 3) and eval_fn(batch["image"]).shape == (4, 8, 8, 3)
        data.load_image({str(tmp_path / "pets" / "cat" / "000.png")!r}, resize=10)
        tf = ("tensorflow", "tensorflow_datasets")
        print("TF_MODULES", sorted(m for m in sys.modules if m.split(".")[0] in tf))
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TF_MODULES []" in out.stdout


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "test"])
def test_train_plus_any_validation_folder_validates_on_it(tmp_path, val_name, caplog):
    """The PyTorch tutorials' train/ + val/, Keras' validation/: every file of the folder
    validates, none is carved out of train/ (the default config, val_fraction auto too)."""
    write_class_folders(tmp_path / "d" / "train", {"cat": 5, "dog": 4})
    write_class_folders(tmp_path / "d" / val_name, {"cat": 2, "dog": 3})
    for val_fraction in (0.0, -1.0):
        config = data_config(path=str(tmp_path / "d"), workers=1, val_fraction=val_fraction)
        ds = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
        assert (ds.train.n_examples, ds.eval.n_examples) == (9, 5)
        assert ds.test is None
        roles = ds.manifest["roles"]
        assert roles["eval"] == str(tmp_path / "d" / val_name) and roles["unused"] == []
        assert data.eval_split_name(config) == val_name
    assert "not used" not in caplog.text


def test_train_val_test_validates_on_val_and_keeps_test_apart(tmp_path, caplog):
    write_class_folders(tmp_path / "d" / "train", {"cat": 5, "dog": 4})
    write_class_folders(tmp_path / "d" / "val", {"cat": 2, "dog": 3})
    write_class_folders(tmp_path / "d" / "test", {"cat": 1, "dog": 2})
    write_class_folders(tmp_path / "d" / "extra", {"cat": 1, "dog": 1})
    config = data_config(path=str(tmp_path / "d"), workers=1, val_fraction=-1.0)
    ds = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    assert (ds.train.n_examples, ds.eval.n_examples, ds.test.n_examples) == (9, 5, 3)
    np.testing.assert_array_equal(ds.test.labels, [0, 1, 1])
    test_files = [str(tmp_path / "d" / "test" / c / f"{i:03d}.png") for c, i in
                  (("cat", 0), ("dog", 0), ("dog", 1))]  # fmt: skip
    assert list(ds.test.names) == test_files  # error lists name the files
    assert all(n.startswith(str(tmp_path / "d" / "val")) for n in ds.eval.names)
    roles = ds.manifest["roles"]
    assert roles["eval"].endswith("val") and roles["test"].endswith("test")
    # A split folder that exists and serves no role is named, never silently dropped.
    assert roles["unused"] == [str(tmp_path / "d" / "extra")]
    assert any("extra is not used" in w for w in ds.manifest["warnings"])
    assert "extra is not used" in caplog.text
    saved = json.loads((tmp_path / data.MANIFEST).read_text())
    assert saved["splits"]["test"]["n_images"] == 3 and saved["roles"] == roles

    # Carving validation out of train/ keeps test/ as the final test split.
    config = data_config(path=str(tmp_path / "d"), workers=1, val_fraction=0.25, test_split="")
    ds = data.build_datasets(config, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
    assert ds.test is None and ds.manifest["roles"]["eval"] == "carved from train"
    assert sorted(ds.manifest["roles"]["unused"]) == [
        str(tmp_path / "d" / n) for n in ("extra", "test", "val")
    ]
    with pytest.raises(data.DataError, match="no 'holdout' folder for config.data.test_split"):
        data.build_datasets(
            data_config(path=str(tmp_path / "d"), workers=1, test_split="holdout"),
            image_size=8,
            resize=8,
            seed=0,
            workdir=str(tmp_path),
        )
