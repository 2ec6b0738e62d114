"""benchmarks/depthwise.py: the three depthwise forms agree and each is timed and sized."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("depthwise", ROOT / "benchmarks/depthwise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_row_times_every_form_that_agrees():
    bench = _benchmark()
    row = bench.layer_row(9, 8, 3, 2, batch=2, iters=1)  # asserts the three agree to 1e-4
    for impl in bench.IMPLS:
        assert row[f"{impl}_s"] > 0 and row[f"{impl}_temp_bytes"] >= 0
    bench.print_tables({"env": {"batch": 2}, "layers": [row], "steps": []})


def test_step_patch_swaps_the_depthwise_form_and_restores_it():
    bench = _benchmark()
    shifts = bench.layers.depthwise_by_shifts
    with bench.depthwise_impl(bench.autodiff_shifts):
        assert bench.layers.depthwise_by_shifts is bench.autodiff_shifts
    assert bench.layers.depthwise_by_shifts is shifts
