"""benchmarks/remat.py: the trainer's steps with model.remat off and on, the same loss,
timed and sized."""

import json
import math

import refs


def test_tiny_run_compares_remat_off_and_on(capsys):
    bench = refs.load_benchmark("remat")
    bench.main(["--models", "efficientnet_lite_tiny@32:4", "--kinds", "full", "--iters", "1"])
    out = capsys.readouterr().out
    rows = json.loads(out.split("RESULT ", 1)[1])["rows"]
    assert [(r["kind"], r["side"]) for r in rows] == [("full", "off"), ("full", "on")]
    assert abs(rows[0]["value"] - rows[1]["value"]) < 1e-5
    assert abs(rows[0]["value"] - math.log(10)) > 1e-4  # a random head: not log(classes)
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 and r["step_bytes"] > 0 for r in rows)
    assert "efficientnet_lite_tiny | 32 | 4 | full |" in out


def test_bad_arguments_exit_with_usage():
    bench = refs.load_benchmark("remat")
    argvs = (["--kinds", "eval"], ["--models", "lite0@x"], ["--iters", "0"])
    refs.assert_usage_errors(bench.parse_args, argvs)
