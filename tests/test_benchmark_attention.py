"""benchmarks/attention.py: both ViT forms are timed, agree, and the switch is undone."""

import numpy as np
import refs


def _benchmark():
    return refs.load_benchmark("attention")


def test_ops_of_both_forms_agree_and_are_timed():
    bench = _benchmark()
    shapes = bench.model_shapes("vit_tiny", px=32, batch=2)
    assert shapes == {"attention": (2, 17, 3, 4, 8), "gelu": (2, 17, 128)}
    for op, shape in shapes.items():
        row = bench.op_row(op, shape, iters=1)
        assert all(row[f"{s}_{t}_ms"] > 0 for s in bench.SIDES for t in ("fwd", "grad"))
        assert row["max_diff_out"] < 1e-5 and row["max_diff_grad"] < 1e-5


def test_old_forms_are_jax_own_while_they_apply_and_restored_after():
    bench = _benchmark()
    vit = bench.vit
    attention, gelu = vit.attention, vit.gelu
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    with bench.SIDES["old"](None):
        assert vit.gelu is bench.erfc_gelu and vit.attention.keywords == {"impl": "xla"}
    assert (vit.attention, vit.gelu) == (attention, gelu)
    with bench.SIDES["new"](None):
        assert (vit.attention, vit.gelu) == (attention, gelu)
    np.testing.assert_allclose(bench.erfc_gelu(x), vit.gelu(x), atol=1e-6)


def test_steps_of_both_sides_give_the_same_first_losses(capsys):
    bench = _benchmark()
    result = bench.run(["--models", "vit_tiny@32:2", "--kinds", "full", "--iters", "1",
                        "--op-iters", "1"])  # fmt: skip
    old, new = result["rows"]
    assert (old["side"], new["side"]) == ("old", "new") and new["step_s"] > 0
    assert abs(old["value"] - new["value"]) < 1e-5 and old["step_bytes"] > 0
    assert [r["op"] for r in result["ops"]] == ["attention", "gelu"]
    bench.print_tables(result)
    assert "vit_tiny @32 | attention | (2, 17, 3, 4, 8)" in capsys.readouterr().out


def test_only_vit_models_are_taken():
    bench = _benchmark()
    refs.assert_usage_errors(bench.parse_args, (["--models", "resnet50@224:16"],))
