"""benchmarks/throughput.py: every step kind measured, and FLOPs that see what is frozen."""

import importlib.util
import json
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_fit_keeps_the_per_step_part_constant():
    bench = _benchmark()
    # 6 FLOPs per example plus 4 per step (the optimizer's update does not grow with the batch)
    counts = {("m", 32, "full", 2): 16.0, ("m", 32, "full", 4): 28.0}
    config = types.SimpleNamespace(model=types.SimpleNamespace(name="m"))
    run = types.SimpleNamespace(prep=types.SimpleNamespace(resolution=32))
    fitted, proportional = bench.FlopCounter([2, 4]), bench.FlopCounter([2])
    fitted.cache = proportional.cache = counts
    assert fitted.per_step(config, run, "full", 256) == 4.0 + 6.0 * 256
    assert proportional.per_step(config, run, "full", 256) == 16.0 * 128


@pytest.mark.slow  # four CPU compilations of the trainer's step: 30-60 s on two busy cores
def test_tiny_run_measures_every_step_kind_and_frozen_backward_is_dropped():
    bench = _benchmark()
    argv = "--models resnet_tiny --resolution 32 --batch-sizes 2 --steps 1 --warmup 1"
    result = bench.run([*argv.split(), "--no-torch"])
    result = json.loads(json.dumps(result))  # what the RESULT line carries
    rows = {row["step"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(bench.KINDS)
    for row in rows.values():
        assert "error" not in row, row
        assert row["tlflax_img_s"] > 0 and row["tlflax_input_img_s"] > 0
        assert row["flops_per_step"] > 0 and row["compile_s"] > 0
        assert "torch_img_s" not in row  # --no-torch, and resnet_tiny has no torch twin
    flops = {kind: row["flops_per_step"] for kind, row in rows.items()}
    # XLA drops the backward pass that only frozen leaves need.
    assert flops["eval"] < flops["linear_probe"] < flops["last_k"] < flops["full"]
    assert flops["linear_probe"] < 0.6 * flops["full"]
    trainable = {kind: rows[kind]["tlflax_trainable"] for kind in ("linear_probe", "full")}
    assert trainable["linear_probe"] < trainable["full"]
    assert result["env"]["flops_method"].startswith("XLA cost analysis")
    assert result["env"]["compute"].startswith("float32 compute")  # auto, on the CPU


def test_cpu_preset_per_model_batches_and_the_compute_dtype_of_both_sides():
    bench = _benchmark()
    args = bench.parse_args(["--preset", "cpu"])
    assert args.entries == [
        ("efficientnet_lite0", 224, [32]),
        ("resnet50", 224, [16]),
        ("vit_b16", 224, [16]),
    ]
    assert (args.compute_dtype, args.steps, args.torch_compile) == ("float32", 3, False)
    # Flags given with the preset override it; an entry without ':' takes --batch-sizes.
    args = bench.parse_args(["--preset", "cpu", "--steps", "5", "--models", "resnet50,vit_b16:8"])
    assert args.steps == 5 and args.entries == [("resnet50", 224, [64, 128, 256]),
                                                ("vit_b16", 224, [8])]  # fmt: skip
    # auto: float32 on the CPU (this suite's backend), bfloat16 on an accelerator; resolved
    # in the parent, so the torch child (CPU-only JAX) computes in the same dtype.
    assert bench.parse_args([]).compute_dtype == "float32"
    config = bench.make_config("resnet_tiny", px=32, batch=2, kind="full", num_classes=10,
                               compute_dtype="bfloat16")  # fmt: skip
    assert config.model.compute_dtype == "bfloat16"
