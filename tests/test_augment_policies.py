"""Named augmentation policies on the device: RandAugment, TrivialAugmentWide, AugMix and
random erasing, against torchvision.

Tolerance for the op-by-op comparisons with torchvision (uint8 photos from
../shared/data/flowers12): max abs diff <= 1 on the 0..255 scale at every pixel, with no
exceptions, border pixels included. Every op runs in torchvision's float32 order of
operations, and the geometric maps are built on the host in float64 as torchvision builds
them, so nearest-pixel ties fall the same way; with nearest interpolation (torchvision's
default for these policies) the 14 ops came out bit-exact in a sweep of every bin and sign at
96, 97, 101 and 224 px. A difference of 1 is what a float32 product rounded another way (a
fused multiply-add, a different summation order for Contrast's mean or Sharpness's smoothing)
can move across a uint8 truncation; bilinear resampling differs by 1 on some pixels for that
reason. On top of that bound, at most 0.2 % of an op's pixels may differ at all (measured on
the CPU: none), so that a systematic slip that stays within 1 (a wrong grey weight) fails.
No op of the RandAugment / TrivialAugmentWide set is left out: all 14 are defined the same
way on tensors.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import config_lib
from tlflax import preprocessing as pp
from tlflax.data import augment
from tlflax.errors import ConfigError

torch = pytest.importorskip("torch")
F = pytest.importorskip("torchvision.transforms.functional")
autoaugment = pytest.importorskip("torchvision.transforms.autoaugment")
InterpolationMode = pytest.importorskip("torchvision.transforms").InterpolationMode

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 96
PLAIN = pp.Preprocessing((0.0,) * 3, (1.0,) * 3, SIZE, SIZE)  # identity normalisation


def aug(**overrides):
    config = config_lib.get_base_config().aug
    config.flip = False
    for key, value in overrides.items():
        config[key] = value
    return config


def settings(**overrides):
    return augment.AugSettings.from_config(aug(**overrides))


def photos(shared_data, size, n=4):
    from PIL import Image

    files = sorted((shared_data / "flowers12" / "train").glob("*/*.jpg"))[::97][:n]
    images = [Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC) for f in files]
    return np.stack([np.asarray(im) for im in images])


def random_images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- reference


def torchvision_op(image, name, magnitude, *, interpolation="nearest", fill=0.0):
    """One op through torchvision.transforms.functional, as its RandAugment applies it."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    mode = InterpolationMode.NEAREST if interpolation == "nearest" else InterpolationMode.BILINEAR
    geometry = dict(interpolation=mode, fill=[fill] * 3 if fill else None)
    shear = math.degrees(math.atan(magnitude))
    calls = {
        "Identity": lambda: t,
        "ShearX": lambda: F.affine(t, 0.0, [0, 0], 1.0, [shear, 0.0], center=[0, 0], **geometry),
        "ShearY": lambda: F.affine(t, 0.0, [0, 0], 1.0, [0.0, shear], center=[0, 0], **geometry),
        "TranslateX": lambda: F.affine(t, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], **geometry),
        "TranslateY": lambda: F.affine(t, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], **geometry),
        "Rotate": lambda: F.rotate(t, magnitude, **geometry),
        "Brightness": lambda: F.adjust_brightness(t, 1.0 + magnitude),
        "Color": lambda: F.adjust_saturation(t, 1.0 + magnitude),
        "Contrast": lambda: F.adjust_contrast(t, 1.0 + magnitude),
        "Sharpness": lambda: F.adjust_sharpness(t, 1.0 + magnitude),
        "Posterize": lambda: F.posterize(t, int(magnitude)),
        "Solarize": lambda: F.solarize(t, magnitude),
        "AutoContrast": lambda: F.autocontrast(t),
        "Equalize": lambda: F.equalize(t),
    }
    return calls[name]().permute(1, 2, 0).numpy()


def torchvision_space(policy, size, bins=31):
    """{op: (magnitudes, signed)} of torchvision's policy classes."""
    if policy == "randaugment":
        return autoaugment.RandAugment()._augmentation_space(bins, (size, size))
    if policy == "trivialaugment":
        return autoaugment.TrivialAugmentWide()._augmentation_space(bins)
    return autoaugment.AugMix()._augmentation_space(10, (size, size))


@pytest.fixture(scope="module")
def tlflax_op():
    def run(x, op, magnitude, matrix, interpolation, fill):
        return augment.apply_op(x, op, magnitude, matrix, interpolation=interpolation, fill=fill)

    return jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None, None)), static_argnums=(4, 5))


def ours(tlflax_op, images, name, magnitude, *, interpolation="nearest", fill=0.0):
    height, width = images.shape[1:3]
    matrix = augment.op_matrix(name, magnitude, height, width)
    out = tlflax_op(
        jnp.asarray(images, jnp.float32),
        augment.OPS.index(name),
        np.float32(magnitude),
        matrix,
        interpolation,
        fill,
    )
    return np.asarray(out)


def cases(policy, bins, size):
    """(op, signed magnitude) at the given bins, both signs where torchvision draws one."""
    space = torchvision_space(policy, size)
    for name in augment.OPS:
        magnitudes, signed = space[name]
        for b in bins if magnitudes.ndim else [None]:
            value = 0.0 if b is None else float(magnitudes[b].item())
            for sign in (1.0, -1.0) if signed else (1.0,):
                yield name, sign * value


# ----------------------------------------------------------------------------- op by op


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "policy, bins, size",
    [("randaugment", (9, 30), 96), ("randaugment", (4, 20), 97), ("trivialaugment", (7, 30), 96)],
    ids=["randaugment_96px", "randaugment_97px", "trivialaugment_96px"],
)
def test_each_op_matches_torchvision_on_photos(shared_data, tlflax_op, policy, bins, size):
    images = photos(shared_data, size)
    checked = set()
    for name, magnitude in cases(policy, bins, size):
        out = ours(tlflax_op, images, name, magnitude)
        assert out.shape == images.shape and out.dtype == np.float32
        np.testing.assert_array_equal(out, np.round(out))  # integers, as a uint8 image
        ref = np.stack([torchvision_op(im, name, magnitude) for im in images])
        diff = np.abs(out.astype(np.int64) - ref.astype(np.int64))
        assert diff.max() <= 1, (name, magnitude, int(diff.max()), int((diff > 1).sum()))
        # Rare: a systematic slip (0.299 for torchvision's 0.2989 grey) moves 0.4-3 % of them.
        assert (diff > 0).mean() <= 0.002, (name, magnitude, float((diff > 0).mean()))
        if name != "Identity":
            assert not np.array_equal(ref, images), (name, magnitude)  # the op does something
        checked.add(name)
    assert checked == set(augment.OPS)


@pytest.mark.shared_data
@pytest.mark.parametrize("interpolation, fill", [("nearest", 128.0), ("bilinear", 0.0)])
def test_geometric_ops_with_fill_and_bilinear_match_torchvision(
    shared_data, tlflax_op, interpolation, fill
):
    images = photos(shared_data, SIZE, n=3)
    for name, magnitude in cases("trivialaugment", (12, 30), SIZE):
        if name not in augment.OPS[:6]:
            continue
        out = ours(tlflax_op, images, name, magnitude, interpolation=interpolation, fill=fill)
        ref = np.stack(
            [
                torchvision_op(im, name, magnitude, interpolation=interpolation, fill=fill)
                for im in images
            ]
        )
        diff = np.abs(out.astype(np.int64) - ref.astype(np.int64))
        assert diff.max() <= 1, (name, magnitude, interpolation, int(diff.max()))


@pytest.mark.shared_data
def test_augmix_mix_matches_torchvision_arithmetic(shared_data, tlflax_op):
    image = photos(shared_data, SIZE, n=1)
    chain_ops = [("Rotate", 20.0), ("Equalize", 0.0), ("ShearX", -0.2)]
    chains = np.concatenate([ours(tlflax_op, image, n, m) for n, m in chain_ops])
    share, weights = np.float32(0.35), np.asarray([0.3, 0.15, 0.2], np.float32)
    out = np.asarray(augment.augmix_mix(jnp.asarray(image[0], jnp.float32), chains, share, weights))
    # torchvision's AugMix.forward: m0 * img, then += w_i * aug_i, then .to(uint8).
    mix = torch.tensor(share) * torch.from_numpy(image[0])
    for w, chain in zip(weights, chains, strict=True):
        mix.add_(torch.tensor(w) * torch.from_numpy(chain.astype(np.uint8)))
    ref = mix.to(torch.uint8).numpy()
    assert np.abs(out.astype(np.int64) - ref).max() <= 1


def test_magnitude_tables_are_torchvisions():
    for policy, bins, size in [
        ("randaugment", 31, 224),
        ("randaugment", 11, 97),
        ("randaugment", 7, 33),
        ("trivialaugment", 31, 64),
        ("augmix", 10, 96),
    ]:
        table = augment.magnitude_table(policy, bins=bins, size=size)
        space = torchvision_space(policy, size, bins)
        for i, name in enumerate(augment.OPS):
            if name not in space:  # AugMix has no Identity
                assert name == "Identity" and policy == "augmix"
                continue
            magnitudes, signed = space[name]
            assert bool(augment.SIGNED[i]) == signed, name
            ref = magnitudes.numpy() if magnitudes.ndim else np.zeros(bins)
            # Bit for bit: int(magnitude) of Posterize and Translate bins must agree.
            np.testing.assert_array_equal(table[i], ref.astype(np.float32), err_msg=name)


def test_op_matrix_is_torchvisions_inverse_affine():
    from torchvision.transforms.functional import _get_inverse_affine_matrix

    h, w = 97, 96
    corner = [-w * 0.5, -h * 0.5]  # center=[0, 0] in torchvision's centred coordinates
    m = 0.2700000107288361
    refs = {
        "ShearX": ([*corner], 0.0, [0, 0], [math.degrees(math.atan(m)), 0.0]),
        "ShearY": ([*corner], 0.0, [0, 0], [0.0, math.degrees(math.atan(m))]),
        "TranslateX": ([0.0, 0.0], 0.0, [13, 0], [0.0, 0.0]),
        "Rotate": ([0.0, 0.0], -30.0, [0, 0], [0.0, 0.0]),
    }
    magnitude = {"ShearX": m, "ShearY": m, "TranslateX": 13.7, "Rotate": 30.0}
    for name, (centre, angle, shift, shear) in refs.items():
        theta = np.asarray(_get_inverse_affine_matrix(centre, angle, shift, 1.0, shear), np.float32)
        ref = theta.reshape(2, 3) / np.asarray([[w / 2], [h / 2]], np.float32)
        np.testing.assert_array_equal(augment.op_matrix(name, magnitude[name], h, w), ref)


# ----------------------------------------------------------------------------- policies


def policy_batch(config, keys, images):
    fn = augment.make_policy(augment.AugSettings.from_config(config), images.shape[1])
    return np.asarray(jax.jit(jax.vmap(fn))(keys, jnp.asarray(images, jnp.float32)))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "augmix"])
def test_policy_under_jit_is_keyed_per_example(policy):
    images = np.repeat(random_images(1, 32), 16, axis=0)
    keys = jax.random.split(jax.random.key(0), 16)
    config = aug(policy=policy)
    a, b = policy_batch(config, keys, images), policy_batch(config, keys, images)
    np.testing.assert_array_equal(a, b)  # same keys, same images
    assert a.shape == images.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.clip(np.round(a), 0, 255))
    assert len({a[i].tobytes() for i in range(16)}) >= 8  # one image, different ops per key
    other = policy_batch(config, jax.random.split(jax.random.key(1), 16), images)
    assert not np.array_equal(a, other)


def test_randaugment_applies_one_of_torchvisions_ops_at_magnitude_m():
    images = random_images(48, 24, seed=3)
    config = aug(policy="randaugment", randaugment_n=1, randaugment_m=12)
    out = policy_batch(config, jax.random.split(jax.random.key(5), 48), images)
    table = augment.magnitude_table("randaugment", bins=31, size=24)
    op_fn = jax.jit(
        augment.table_op_fn(table, 24, interpolation="nearest", fill=0.0), static_argnums=(1,)
    )
    found = []
    for i in range(48):
        x = jnp.asarray(images[i], jnp.float32)
        matches = [
            (op, sign)
            for op in range(len(augment.OPS))
            for sign in (False, True)
            if np.array_equal(out[i], np.asarray(op_fn(x, op, 12, jnp.asarray(sign))))
        ]
        assert matches, f"example {i} is none of the 14 ops at magnitude bin 12"
        found.append(matches[0])
    assert len({op for op, _ in found}) >= 9
    assert any(sign for _, sign in found)  # negative magnitudes are drawn too


def test_randaugment_with_no_ops_is_the_rounded_crop():
    images = random_images(4, 16)
    out = policy_batch(
        aug(policy="randaugment", randaugment_n=0), jax.random.split(jax.random.key(0), 4), images
    )
    np.testing.assert_array_equal(out, images)


def test_draws_are_uniform_over_ops_bins_and_signs():
    keys = jax.random.split(jax.random.key(0), 5600)
    ops, bins, negate = (
        np.asarray(a) for a in jax.vmap(lambda k: augment.draw_op(k, n_bins=31))(keys)
    )
    counts = np.bincount(ops, minlength=14)
    assert counts.min() > 0.75 * 400 and counts.max() < 1.25 * 400, counts
    assert set(np.unique(bins)) == set(range(31))
    signed = augment.SIGNED[ops]
    assert not negate[~signed].any()
    assert 0.45 < negate[signed].mean() < 0.55
    fixed = jax.vmap(lambda k: augment.draw_op(k, n_bins=31, bin_=9))(keys[:50])
    assert (np.asarray(fixed[1]) == 9).all()
    augmix = jax.vmap(lambda k: augment.draw_op(k, n_bins=3, ops=augment._AUGMIX_OPS))(keys)
    assert augment.OPS.index("Identity") not in set(np.asarray(augmix[0]))
    assert set(np.unique(np.asarray(augmix[1]))) == {0, 1, 2}


def test_augmix_mixes_the_image_with_its_chains():
    images = random_images(8, 32, seed=1)
    out = policy_batch(aug(policy="augmix"), jax.random.split(jax.random.key(2), 8), images)
    assert out.shape == images.shape
    np.testing.assert_array_equal(out, np.clip(np.round(out), 0, 255))
    assert not np.array_equal(out, images)
    # A convex mix of the image and its augmented chains stays near the image on average.
    assert np.abs(out - images).mean() < np.abs(images - images[::-1]).mean()


# ----------------------------------------------------------------------------- the pipeline


def transform(config, images, rng=0, prep=PLAIN, size=SIZE):
    fn = augment.make_train_transform(config, image_size=size, num_classes=4, preprocessing=prep)
    labels = np.arange(len(images), dtype=np.int32) % 4
    x, t = jax.jit(fn)(jax.random.key(rng), images, labels)
    return np.asarray(x), np.asarray(t)


def test_policy_runs_on_the_uint8_crop_before_normalisation():
    images = random_images(8, 40)
    prep = pp.imagenet(32)
    config = aug(policy="trivialaugment", crop="inception", flip=True)
    x, t = transform(config, images, prep=prep, size=32)
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and t.shape == (8, 4)
    pixels = x * np.asarray(pp.IMAGENET_STD) + np.asarray(pp.IMAGENET_MEAN)
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)  # integers before normalising
    plain, _ = transform(aug(crop="inception", flip=True), images, prep=prep, size=32)
    assert not np.allclose(x, plain)


def test_erasing_changes_only_its_box():
    images = np.random.default_rng(2).integers(1, 256, (16, 40, 40, 3), dtype=np.uint8)
    plain, _ = transform(aug(crop="inception", flip=True), images, size=32)
    erased, _ = transform(aug(crop="inception", flip=True, erasing_prob=1.0), images, size=32)
    box = np.all(erased == 0.0, axis=-1, keepdims=True) & ~np.all(plain == 0.0, -1, keepdims=True)
    assert box.any(axis=(1, 2, 3)).mean() > 0.9
    np.testing.assert_array_equal(np.where(box, plain, erased), plain)  # same crops elsewhere


def erased_boxes(x):
    """(top, left, h, w) of each example's zero box (the images hold no zeros)."""
    boxes = []
    for image in x:
        zero = np.all(image == 0.0, axis=-1)
        if not zero.any():
            boxes.append(None)
            continue
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert zero.sum() == h * w  # one filled rectangle
        boxes.append((rows[0], cols[0], h, w))
    return boxes


def test_random_erasing_box_area_and_aspect_in_range():
    images = np.random.default_rng(0).integers(1, 256, (256, 64, 64, 3), dtype=np.uint8)
    config = aug(erasing_prob=1.0, erasing_scale=(0.05, 0.3), erasing_ratio=(0.4, 1.2))
    x, _ = transform(config, images, size=64)
    boxes = [b for b in erased_boxes(x) if b is not None]
    assert len(boxes) >= 250  # p = 1: erased unless no draw fitted
    fractions, ratios = [], []
    for _, _, h, w in boxes:
        rounding = (0.5 * (h + w + 1) + 0.25) / (64 * 64)  # h, w are rounded to whole pixels
        fraction = h * w / (64 * 64)
        assert 0.05 - rounding <= fraction <= 0.3 + rounding, (h, w)
        # h / w is the drawn ratio in [0.4, 1.2] up to rounding of each side.
        assert (h + 0.5) / (w - 0.5) >= 0.4 and (h - 0.5) / (w + 0.5) <= 1.2, (h, w)
        fractions.append(fraction)
        ratios.append(h / w)
    assert min(fractions) < 0.08 and max(fractions) > 0.27  # spans the range
    assert min(ratios) < 0.55 and max(ratios) > 1.0  # height / width, as torchvision's ratio
    assert all(h < 64 and w < 64 for _, _, h, w in boxes)


def test_random_erasing_probability_and_random_values():
    images = np.random.default_rng(1).integers(1, 256, (200, 32, 32, 3), dtype=np.uint8)
    x, _ = transform(aug(erasing_prob=0.5), images, size=32)
    erased = np.mean([b is not None for b in erased_boxes(x)])
    assert 0.38 < erased < 0.62
    x, _ = transform(aug(erasing_prob=0.0), images, size=32)
    np.testing.assert_array_equal(x, images.astype(np.float32))
    x, _ = transform(aug(erasing_prob=1.0, erasing_value="random"), images, size=32)
    noise = x[np.abs(x - images) > 0]  # normal values replace pixels in 1..255
    assert noise.size > 0.02 * x.size
    assert abs(noise.mean()) < 0.1 and 0.8 < noise.std() < 1.2


def test_random_erasing_acts_after_normalisation():
    images = np.full((64, 32, 32, 3), 200, np.uint8)
    prep = pp.imagenet(32)
    x, _ = transform(aug(erasing_prob=1.0), images, prep=prep, size=32)
    kept = (200.0 - np.asarray(pp.IMAGENET_MEAN)) / np.asarray(pp.IMAGENET_STD)
    erased = np.all(x == 0.0, axis=-1)  # 0 in normalised units, not pixel value 0
    assert erased.mean() > 0.02
    np.testing.assert_allclose(x[~erased], np.broadcast_to(kept, x[~erased].shape), rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(policy="autoaugment"), "config.aug.policy"),
        (dict(randaugment_m=31), "config.aug.randaugment_m"),
        (dict(randaugment_m=-1), "config.aug.randaugment_m"),
        (dict(randaugment_n=-2), "config.aug.randaugment_n"),
        (dict(magnitude_bins=1, randaugment_m=0), "config.aug.magnitude_bins"),
        (dict(policy_interpolation="bicubic"), "config.aug.policy_interpolation"),
        (dict(policy_fill=300.0), "config.aug.policy_fill"),
        (dict(augmix_severity=11), "config.aug.augmix_severity"),
        (dict(augmix_width=0), "config.aug.augmix_width"),
        (dict(augmix_depth=0), "config.aug.augmix_depth"),
        (dict(augmix_alpha=0.0), "config.aug.augmix_alpha"),
        (dict(erasing_prob=1.5), "config.aug.erasing_prob"),
        (dict(erasing_scale=(0.3, 0.1)), "config.aug.erasing_scale"),
        (dict(erasing_scale=(0.1, 1.0)), "config.aug.erasing_scale"),
        (dict(erasing_ratio=(0.0, 3.3)), "config.aug.erasing_ratio"),
        (dict(erasing_value="mean"), "config.aug.erasing_value"),
    ],
)
def test_bad_policy_settings_name_key_and_value(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        settings(**overrides)
    value = next(iter(overrides.values()))
    assert repr(value) in str(info.value) or str(value) in str(info.value)


# ----------------------------------------------------------------------------- training


@pytest.mark.shared_data
@pytest.mark.slow
def test_randaugment_run_trains_on_flowers12(shared_data, tmp_path, monkeypatch):
    import importlib.util
    import json

    from tlflax import train

    built = []
    make_policy = augment.make_policy
    monkeypatch.setattr(
        augment, "make_policy", lambda s, size: built.append(s.policy) or make_policy(s, size)
    )
    spec = importlib.util.spec_from_file_location("folder", ROOT / "configs" / "folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"path={shared_data / 'flowers12'}")
    config.data.image_size = SIZE
    config.optim.strategy = "linear_probe"
    config.optim.lr = 3e-3
    config.train.epochs, config.train.steps = 0.0, 40  # feature extraction, 40 steps of 32
    config.train.log_every = 5
    config.aug.policy = "randaugment"
    summary = train.train_and_evaluate(config, tmp_path)
    assert built and set(built) == {"randaugment"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    # The first row averages steps 1-5 (step 0 is log(12) = 2.48); measured 1.95 -> 0.40.
    assert losses[0] > 1.5 and losses[-1] < 0.5 * losses[0], losses
    assert summary["final"]["val/top1"] >= 0.75, summary["final"]  # chance 1/12; measured 91 %
