"""benchmarks/host_malloc.py: each side in its own process, with and without the tunable,
the same loss, timed, sized and counted."""

import json
import math

import refs

from tlflax import host_malloc


def test_tiny_run_compares_the_two_sides_in_their_own_processes(capsys, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=4")
    bench = refs.load_benchmark("host_malloc")
    bench.main(["--models", "efficientnet_lite_tiny@32:4", "--kinds", "full", "--iters", "1"])
    out = capsys.readouterr().out
    rows = json.loads(out.split("RESULT ", 1)[1])["rows"]
    assert [(r["kind"], r["side"]) for r in rows] == [("full", "default"), ("full", "hugetlb")]
    # The caller's other tunables stay; only the huge-page one differs.
    assert rows[0]["glibc_tunables"] == "glibc.malloc.arena_max=4"
    assert rows[1]["glibc_tunables"] == f"glibc.malloc.arena_max=4:{host_malloc.SETTING}"
    assert rows[0]["value"] == rows[1]["value"]
    assert abs(rows[0]["value"] - math.log(10)) > 1e-4  # a random head: not log(classes)
    for r in rows:
        assert r["step_s"] > 0 and r["compile_s"] > 0 and r["step_bytes"] > 0
        assert r["minor_faults"] >= 0 and r["sys_s"] >= 0
    assert "efficientnet_lite_tiny | 32 | 4 | full |" in out


def test_bad_arguments_exit_with_usage():
    bench = refs.load_benchmark("host_malloc")
    argvs = (["--rounds", "0"], ["--side", "other"], ["--models", "lite0@x"], ["--iters", "0"])
    refs.assert_usage_errors(bench.parse_args, argvs)
