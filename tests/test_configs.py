"""Every experiment config loads, is locked, and plans (model + optimizer phases) as written."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest
from PIL import Image

from tlflax import config_lib, experiment
from tlflax.data import build_datasets

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("[!_]*.py"))
ARGS = {"folder.py": "path=/data/photos", "vgg16_produce.py": "path=/data/produce"}


def load(path: pathlib.Path, arg):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.py", "folder.py", "flowers102.py"}


@pytest.mark.parametrize("runlocal", [False, True])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_locked_and_plans(path, runlocal):
    arg = ",".join(a for a in (ARGS.get(path.name, ""), "runlocal" if runlocal else "") if a)
    config = load(path, arg or None)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.optim.no_such_key = 1
    text = path.read_text()
    assert text.startswith('"""') and "tlflax train --config configs/" in text.split('"""')[1]
    assert "import jax" not in text  # configs import ml_collections and config_lib only
    spec = experiment.build_model(config, num_classes=10)
    prep = spec.preprocessing
    if config.data.image_size:
        prep = prep.at_resolution(config.data.image_size)
    run = experiment.plan(config, num_classes=10, steps_per_epoch=7, prep=prep)
    assert run.total_steps >= 1 and run.phases[-1].end_step == run.total_steps


def test_config_arguments_are_checked():
    folder = next(p for p in CONFIGS if p.name == "folder.py")
    with pytest.raises(KeyError, match=r"'pth' is unknown; known: \['aug', 'model'"):
        load(folder, "pth=/x")
    with pytest.raises(ValueError, match="aug='maybe': use true or false"):
        load(folder, "path=/x,aug=maybe")
    assert load(folder, "path=/x,val_fraction=0.2,aug=false").data.val_fraction == 0.2


def test_folder_config_carves_a_validation_split_only_when_the_folder_has_none(tmp_path):
    """val_fraction auto (-1): decided by the data layer on the final config, so an
    --config.data.eval_split=val override still finds val/."""
    folder = next(p for p in CONFIGS if p.name == "folder.py")
    for split, n in (("train", 10), ("val", 3)):
        for name in ("cat", "dog"):
            (tmp_path / "split" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(
                    tmp_path / "split" / split / name / f"{i}.png"
                )
    shutil.copytree(tmp_path / "split" / "train", tmp_path / "plain")

    def counts(path, **data_overrides):
        config = load(folder, f"path={path}")
        assert config.data.val_fraction == -1.0
        config.data.update(dict(workers=1, **data_overrides))
        ds = build_datasets(config.data, image_size=8, resize=8, seed=0, workdir=str(tmp_path))
        return ds.train.n_examples, ds.eval.n_examples

    assert counts(tmp_path / "plain") == (16, 4)  # <class>/*: 20 % carved, per class
    assert counts(tmp_path / "split", eval_split="val") == (20, 6)  # the folder's own val/
    assert counts(tmp_path / "split") == (20, 6)  # val/ found by itself, nothing carved
    shutil.move(tmp_path / "split" / "val", tmp_path / "split_val")
    assert counts(tmp_path / "split") == (16, 4)  # train/ alone: carved out of train/


def test_parse_arg_types():
    got = config_lib.parse_arg(
        "n=3,x=0.5,runlocal,name=a b", {"n": 1, "x": 0.0, "runlocal": False, "name": ""}
    )
    assert got == {"n": 3, "x": 0.5, "runlocal": True, "name": "a b"}


def test_every_package_and_the_configs_install():
    """pyproject lists the packages by hand (configs/ maps to tlflax.configs): one that is
    forgotten would be missing from the wheel and only fail for users."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = pathlib.Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "tlflax").rglob("__init__.py")
    }
    assert set(setup["packages"]) == found | {"tlflax.configs"}
    assert setup["package-dir"] == {"tlflax.configs": "configs"}
    assert (root / "configs" / "__init__.py").is_file()
    from tlflax import help as help_lib

    assert {"demo", "folder"} <= set(help_lib.builtin_configs())
    assert help_lib.resolve_config_arg("folder:path=X").endswith("folder.py:path=X")
