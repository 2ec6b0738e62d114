"""benchmarks/remat.py: the trainer's steps with model.remat off and on, the same loss,
timed and sized."""

import importlib.util
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("remat", ROOT / "benchmarks/remat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_compares_remat_off_and_on(capsys):
    bench = _benchmark()
    bench.main(["--models", "efficientnet_lite_tiny@32:4", "--kinds", "full", "--iters", "1"])
    out = capsys.readouterr().out
    rows = json.loads(out.split("RESULT ", 1)[1])["rows"]
    assert [(r["kind"], r["side"]) for r in rows] == [("full", "off"), ("full", "on")]
    assert abs(rows[0]["value"] - rows[1]["value"]) < 1e-5
    assert abs(rows[0]["value"] - math.log(10)) > 1e-4  # a random head: not log(classes)
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 and r["step_bytes"] > 0 for r in rows)
    assert "efficientnet_lite_tiny | 32 | 4 | full |" in out


def test_bad_arguments_exit_with_usage():
    bench = _benchmark()
    for argv in (["--kinds", "eval"], ["--models", "lite0@x"], ["--iters", "0"]):
        try:
            bench.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
