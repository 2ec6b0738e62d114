"""The `tlflax` command's persistent XLA compilation cache (tlflax/xla_cache.py)."""

import logging
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tlflax import xla_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "tiny_config.py")


def test_folder_rules():
    home = os.path.expanduser("~")
    assert xla_cache.cache_dir({}) == os.path.join(home, ".cache", "tlflax", "xla")
    assert xla_cache.cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/tlflax/xla"
    assert xla_cache.cache_dir({"TLFLAX_XLA_CACHE": "~/x"}) == os.path.join(home, "x")
    assert xla_cache.cache_dir({"TLFLAX_XLA_CACHE": "rel"}) == os.path.abspath("rel")
    for off in ("0", "off", "False", " no "):
        assert xla_cache.cache_dir({"TLFLAX_XLA_CACHE": off}) is None
    # jax's own setting wins, whatever tlflax's says
    both = {"JAX_COMPILATION_CACHE_DIR": "/j", "TLFLAX_XLA_CACHE": "/t"}
    assert xla_cache.cache_dir(both) is None


@pytest.fixture
def updates(monkeypatch):
    """jax.config.update calls, recorded instead of made (the suite keeps its own cache)."""
    calls = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    return calls


def test_enable_makes_the_folder_and_turns_jax_cache_on(tmp_path, updates, caplog):
    folder = tmp_path / "a" / "b"
    with caplog.at_level(logging.INFO, logger="tlflax.xla_cache"):
        assert xla_cache.enable({"TLFLAX_XLA_CACHE": str(folder)}) == str(folder)
    assert folder.is_dir()
    assert updates == {
        "jax_compilation_cache_dir": str(folder),
        "jax_compilation_cache_max_size": xla_cache.MAX_BYTES,
    }
    assert "TLFLAX_XLA_CACHE=0 turns it off" in caplog.text
    updates.clear()
    env = {"TLFLAX_XLA_CACHE": str(folder), "JAX_COMPILATION_CACHE_MAX_SIZE": "10"}
    xla_cache.enable(env)  # the user's own size limit stays jax's
    assert updates == {"jax_compilation_cache_dir": str(folder)}


def test_nothing_where_off_or_jax_has_its_own(updates):
    assert xla_cache.enable({"TLFLAX_XLA_CACHE": "0"}) is None
    assert xla_cache.enable({"JAX_COMPILATION_CACHE_DIR": "/j"}) is None
    assert updates == {}


def test_a_folder_that_cannot_be_made_or_a_url_is_logged_and_skipped(tmp_path, updates, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="tlflax.xla_cache"):
        assert xla_cache.enable({"TLFLAX_XLA_CACHE": str(blocker / "sub")}) is None
        assert xla_cache.enable({"TLFLAX_XLA_CACHE": "gs://bucket/xla"}) is None
    assert "XLA compilation cache off" in caplog.text and "TLFLAX_XLA_CACHE=DIR" in caplog.text
    assert "gs://bucket/xla: a local folder only; set JAX_COMPILATION_CACHE_DIR" in caplog.text
    assert updates == {} and not (pathlib.Path.cwd() / "gs:").exists()


def test_library_calls_of_main_leave_the_cache_alone(tmp_path, monkeypatch):
    from tlflax import main

    monkeypatch.setattr(xla_cache, "enable", lambda *a: pytest.fail("enabled from Python"))
    monkeypatch.setenv("TLFLAX_XLA_CACHE", str(tmp_path / "c"))
    assert main.main(["tlflax", "inspect", "--config", TINY]) == 0


def _command(args, env, cwd):
    tlflax = pathlib.Path(sys.executable).parent / "tlflax"
    if not tlflax.exists():
        pytest.skip(f"no tlflax command next to {sys.executable}")
    return subprocess.run([str(tlflax), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow  # two runs of the command, each compiling its steps in a fresh process
def test_the_command_writes_its_steps_once_and_reads_them_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cache = tmp_path / "cache"
    env.update(TLFLAX_XLA_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    entries = []
    for run in ("a", "b"):
        done = _command(["train", "--config", TINY, "--workdir", str(tmp_path / run)], env,
                        tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"XLA compilation cache: {cache}" in done.stderr
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert entries[0], "the first run cached nothing"
    assert entries[1] == entries[0], "the second run compiled something the first did not"
