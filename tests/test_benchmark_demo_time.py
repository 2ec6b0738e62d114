"""benchmarks/demo_time.py: an older commit's training command against this checkout's, in
turn, timed from the first log line, with their tables."""

import json
import pathlib
import subprocess

import pytest
import refs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _in_git() -> bool:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow  # two tiny training runs in fresh processes
@pytest.mark.skipif(not _in_git(), reason="needs the git history of the checkout")
def test_tiny_config_against_head(tmp_path, capsys):
    bench = refs.load_benchmark("demo_time")
    argv = ["--against", "HEAD", "--rounds", "1", "--config", "tests/tiny_config.py",
            "--root", str(tmp_path), "--set", "train.log_every=1"]  # fmt: skip
    try:
        result = bench.main(argv)
    finally:
        for tree in tmp_path.glob("tree-*"):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)  # fmt: skip
    out = capsys.readouterr().out
    rows = result["rows"]
    assert [(r["side"], r["exit"]) for r in rows] == [("older", 0), ("this", 0)]
    for r in rows:
        assert 0 < r["log_to_table_s"] <= r["total_s"]
        assert r["table"], r["log"]  # the result table was found
    assert rows[0]["table"] == rows[1]["table"]  # HEAD against this checkout: the same run
    assert json.loads(out.split("RESULT ", 1)[1])["env"]["overrides"] == [
        "--config.train.log_every=1"
    ]
    assert "1 | " in out and "| True" in out


def test_bad_arguments_exit_with_usage():
    bench = refs.load_benchmark("demo_time")
    refs.assert_usage_errors(bench.parse_args, (["--rounds", "0"], ["--set", "novalue"]))


def test_an_unknown_commit_is_refused(tmp_path):
    bench = refs.load_benchmark("demo_time")
    with pytest.raises(SystemExit, match="not a commit"):
        bench.worktree("no-such-rev-xyz", tmp_path)


def test_runs_compile_without_any_persistent_cache(monkeypatch):
    bench = refs.load_benchmark("demo_time")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "10")
    monkeypatch.setenv("TLFLAX_XLA_CACHE", "/elsewhere")
    env = bench.fresh_compile_env()
    assert env["TLFLAX_XLA_CACHE"] == "0" and env["PATH"]
    assert not any(k.startswith("JAX_COMPILATION_CACHE") for k in env)
