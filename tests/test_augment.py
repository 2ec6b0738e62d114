"""Device-side augmentation: exact flips, in-bounds crops, determinism, soft targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import config_lib
from tlflax import preprocessing as pp
from tlflax.data import augment

S, SIZE, K = 40, 32, 5
PLAIN = pp.Preprocessing((0.0,) * 3, (1.0,) * 3, SIZE, S)  # identity normalisation


def aug(**overrides):
    config = config_lib.get_base_config().aug
    config.flip = False
    for key, value in overrides.items():
        config[key] = value
    return config


def images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def labels(n=16):
    return np.arange(n, dtype=np.int32) % K


def run(config, rng=0, batch=None, prep=PLAIN):
    fn = augment.make_train_transform(config, image_size=SIZE, num_classes=K, preprocessing=prep)
    batch = images() if batch is None else batch
    x, t = jax.jit(fn)(jax.random.key(rng), batch, labels(len(batch)))
    return np.asarray(x), np.asarray(t)


def centre(batch):
    o = (S - SIZE) // 2
    return batch[:, o : o + SIZE, o : o + SIZE].astype(np.float32)


def test_flip_is_exact_and_random():
    batch = images()
    x, _ = run(aug(flip=True), batch=batch)
    crop = centre(batch)
    same = [np.array_equal(x[i], crop[i]) for i in range(len(batch))]
    mirrored = [np.array_equal(x[i], crop[i][:, ::-1]) for i in range(len(batch))]
    assert all(a or b for a, b in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_vertical_flip_is_exact():
    batch = images()
    x, _ = run(aug(vflip=True), batch=batch)
    crop = centre(batch)
    flipped = [np.array_equal(x[i], crop[i][::-1]) for i in range(len(batch))]
    assert all(flipped[i] or np.array_equal(x[i], crop[i]) for i in range(len(batch)))
    assert any(flipped)


def test_random_crop_is_a_slice_of_the_stored_image():
    batch = images(8)
    x, _ = run(aug(crop="random"), batch=batch)
    offsets = set()
    for i in range(len(batch)):
        found = [
            (top, left)
            for top in range(S - SIZE + 1)
            for left in range(S - SIZE + 1)
            if np.array_equal(x[i], batch[i, top : top + SIZE, left : left + SIZE])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 1


def test_inception_boxes_stay_in_bounds_and_in_range():
    settings = augment.AugSettings.from_config(aug(crop="inception", crop_scale=(0.2, 1.0)))
    keys = jax.random.split(jax.random.key(1), 2000)
    boxes = np.asarray(jax.vmap(lambda k: augment.crop_box(k, (S, S), settings, SIZE))(keys))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= S + 1e-4).all() and (left + w <= S + 1e-4).all()
    area = h * w / (S * S)
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1.0 + 1e-4
    ratio = w / h
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert area.std() > 0.1  # really random


def test_inception_crop_samples_no_fill():
    # Constant fill 0 would show up in a white image if any sample fell outside it.
    white = np.full((16, S, S, 3), 255, np.uint8)
    config = aug(crop="inception", fill_mode="constant", fill_value=0.0, flip=True)
    x, _ = run(config, batch=white)
    np.testing.assert_allclose(x, 255.0, atol=1e-3)


def test_same_seed_same_batch_different_steps_differ():
    config = aug(crop="inception", flip=True, rotation=20.0, brightness=0.3, mixup_alpha=0.4)
    fn = augment.make_train_transform(config, image_size=SIZE, num_classes=K, preprocessing=PLAIN)
    fn = jax.jit(fn)
    a, ta = fn(jax.random.key(3), images(), labels())
    b, tb = fn(jax.random.key(3), images(), labels())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ta), np.asarray(tb))
    step_keys = [jax.random.fold_in(jax.random.key(3), step) for step in (1, 2)]
    x1, _ = fn(step_keys[0], images(), labels())
    x2, _ = fn(step_keys[1], images(), labels())
    assert not np.allclose(np.asarray(x1), np.asarray(x2))


def test_examples_get_their_own_randomness():
    same = np.repeat(images(1), 8, axis=0)
    x, _ = run(aug(crop="inception"), batch=same)
    assert len({x[i].tobytes() for i in range(8)}) == 8


def test_targets_one_hot_and_smoothed():
    _, t = run(aug())
    np.testing.assert_array_equal(t, np.eye(K)[labels()])
    _, t = run(aug(label_smoothing=0.1))
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t.max(1), 0.9 + 0.1 / K, rtol=1e-6)


def test_mixup_blends_images_and_labels_alike():
    batch = images()
    x, t = run(aug(mixup_alpha=0.4), batch=batch)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)
    crop, y = centre(batch), labels()
    partner = np.arange(len(batch))[::-1]
    for i in range(len(batch)):
        if y[i] == y[partner[i]]:
            continue
        lam = t[i, y[i]]
        np.testing.assert_allclose(x[i], lam * crop[i] + (1 - lam) * crop[partner[i]], atol=1e-3)
    assert 0 < t.max(1).min() < 1  # something was mixed


def test_cutmix_pastes_an_area_matching_the_label_weight():
    batch = images()
    x, t = run(aug(cutmix_alpha=1.0), batch=batch)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)
    crop, y = centre(batch), labels()
    partner = np.arange(len(batch))[::-1]
    for i in range(len(batch)):
        if y[i] == y[partner[i]]:
            continue
        own = np.all(x[i] == crop[i], axis=-1)
        pasted = np.all(x[i] == crop[partner[i]], axis=-1)
        assert (own | pasted).all()
        np.testing.assert_allclose(own.mean(), t[i, y[i]], atol=1e-6)


def test_mix_prob_zero_leaves_batch_alone():
    batch = images()
    x, t = run(aug(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0), batch=batch)
    np.testing.assert_array_equal(x, centre(batch))
    np.testing.assert_array_equal(t, np.eye(K)[labels()])


def test_eval_transform_centre_crop_normalised_and_deterministic():
    prep = pp.lite(SIZE, crop_pct=SIZE / S)
    fn = jax.jit(augment.make_eval_transform(image_size=SIZE, preprocessing=prep))
    batch = images()
    a, b = np.asarray(fn(batch)), np.asarray(fn(batch))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, (centre(batch) - 127.0) / 128.0, rtol=1e-6)


def test_normalisation_comes_from_preprocessing():
    batch = images()
    x_in, _ = run(aug(), batch=batch, prep=pp.imagenet(SIZE))
    mean, std = np.asarray(pp.IMAGENET_MEAN), np.asarray(pp.IMAGENET_STD)
    np.testing.assert_allclose(x_in, (centre(batch) - mean) / std, rtol=1e-5, atol=1e-5)


def test_quarter_turn_rotates_exactly():
    image = images(1)[0]
    settings = augment.AugSettings.from_config(aug())
    box = augment.crop_box(jax.random.key(0), (S, S), settings, SIZE)
    ys, xs = augment._source_coordinates(
        box, SIZE, flip=False, vflip=False, angle=jnp.pi / 2, shift=jnp.zeros(2)
    )
    out = np.asarray(augment._bilinear(image, ys, xs, fill_mode="constant", fill_value=0.0))
    turned = [np.rot90(centre(image[None])[0], k) for k in (1, 3)]
    assert any(np.allclose(out, r, atol=1e-3) for r in turned)


def test_shift_moves_content_and_fills():
    image = images(1)[0]
    box = jnp.asarray([0, 0, S, S], jnp.float32)  # the whole stored image, no scaling
    ys, xs = augment._source_coordinates(
        box, S, flip=False, vflip=False, angle=0.0, shift=jnp.asarray([0.0, 5.0])
    )
    out = np.asarray(augment._bilinear(image, ys, xs, fill_mode="constant", fill_value=7.0))
    np.testing.assert_allclose(out[:, 5:], image[:, :-5], atol=1e-3)
    np.testing.assert_array_equal(out[:, :5], 7.0)
    near = np.asarray(augment._bilinear(image, ys, xs, fill_mode="nearest", fill_value=7.0))
    np.testing.assert_allclose(near[:, :5], np.repeat(image[:, :1], 5, axis=1), atol=1e-3)
    mirror = np.asarray(augment._bilinear(image, ys, xs, fill_mode="reflect", fill_value=7.0))
    np.testing.assert_allclose(mirror[:, :5], image[:, 4::-1], atol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(flip=True, rotation=36.0, fill_mode="reflect"),  # Keras RandomRotation(0.1)
        dict(rotation=20.0, width_shift=0.2, height_shift=0.2, flip=True, fill_mode="nearest"),
        dict(
            crop="inception",
            flip=True,
            rotation=15.0,
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
        ),
    ],
)
def test_seed_recipes_run_with_fixed_shapes(overrides):
    x, t = run(aug(**overrides))
    assert x.shape == (16, SIZE, SIZE, 3) and x.dtype == np.float32
    assert t.shape == (16, K)
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255


def test_colour_jitter_keeps_grey_grey_and_scales_brightness():
    grey = np.full((8, S, S, 3), 100, np.uint8)
    x, _ = run(aug(saturation=0.9, hue=0.5), batch=grey)
    np.testing.assert_allclose(x, 100.0, atol=1e-3)
    x, _ = run(aug(brightness=0.5), batch=grey)
    factors = x[:, 0, 0, 0] / 100.0
    assert ((factors >= 0.5 - 1e-6) & (factors <= 1.5 + 1e-6)).all() and factors.std() > 0.01
    np.testing.assert_allclose(
        x, np.broadcast_to(factors[:, None, None, None] * 100.0, x.shape), rtol=1e-5
    )


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="config.aug.crop"):
        augment.make_train_transform(
            aug(crop="zoom"), image_size=SIZE, num_classes=K, preprocessing=PLAIN
        )
    fn = augment.make_eval_transform(image_size=S + 1, preprocessing=PLAIN)
    with pytest.raises(ValueError, match="stored size"):
        fn(images())


def test_hue_shift_matches_colorsys():
    import colorsys

    pixels = np.random.default_rng(0).uniform(0, 255, (200, 3)).astype(np.float32)
    for turn in (1 / 3, -0.2, 0.5):
        out = np.asarray(augment._shift_hue(jnp.asarray(pixels), turn))
        ref = [
            colorsys.hsv_to_rgb((h + turn) % 1.0, s, v)
            for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels / 255.0)
        ]
        np.testing.assert_allclose(out, np.asarray(ref) * 255.0, atol=1e-3)
