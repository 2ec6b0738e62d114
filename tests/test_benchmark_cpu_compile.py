"""benchmarks/cpu_compile.py: both levels compiled, timed and compared; the level restored."""

import importlib.util
import json
import math
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_eval_step_at_both_levels():
    spec = importlib.util.spec_from_file_location("cpu_compile", ROOT / "benchmarks/cpu_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    level = bench.sharding.CPU_BACKEND_OPT_LEVEL
    result = bench.run("--models resnet_tiny@32:2 --kinds eval --levels 1 --steps 1".split())
    (row,) = json.loads(json.dumps(result))["rows"]
    assert (row["model"], row["step"], row["level"]) == ("resnet_tiny", "eval", 1)
    assert row["compile_s"] > 0 and row["default_compile_s"] > 0 and row["step_s"] > 0
    assert row["max_diff"] < 1e-5  # the same losses
    assert bench.sharding.CPU_BACKEND_OPT_LEVEL == level
    bench.print_table(result)
    # What is compared depends on the backbone: not the zero head's log(10) everywhere.
    probe = bench.measure("resnet_tiny", 32, 2, "eval", None, steps=1)["probe"]
    assert probe.shape == (2,) and np.all(np.abs(probe - math.log(10)) > 1e-4), probe
