"""benchmarks/fold_bn.py: the three frozen-BatchNorm forms run the trainer's steps, agree,
and are timed and sized; the switch is restored."""

import json
import math

import refs


def _benchmark():
    return refs.load_benchmark("fold_bn")


def test_tiny_run_times_three_forms_that_agree(capsys):
    bench = _benchmark()
    bench.main(["--models", "efficientnet_lite_tiny@32:4", "--kinds", "full,eval", "--iters", "1"])
    out = capsys.readouterr().out
    result = json.loads(out.split("RESULT ", 1)[1])
    rows = result["rows"]
    assert [(r["kind"], r["side"]) for r in rows] == [
        (kind, side) for kind in ("full", "eval") for side in ("batchnorm", "fold", "scaled")
    ]
    for kind in ("full", "eval"):
        values = [r["value"] for r in rows if r["kind"] == kind]
        assert abs(max(values) - min(values)) < 1e-4
        assert abs(values[0] - math.log(10)) > 1e-4  # a random head: not log(classes)
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert bench.layers.FROZEN_BN == "scaled"
    assert "efficientnet_lite_tiny | 32 | 4 | full |" in out


def test_bad_arguments_exit_with_usage():
    bad = (["--models", "lite0@x"], ["--models", "lite0:8/16"], ["--kinds", "train"],
           ["--iters", "0"])  # fmt: skip
    refs.assert_usage_errors(_benchmark().parse_args, bad)
