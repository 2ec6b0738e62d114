"""The `tlflax` command re-executes itself with glibc's huge-page tunable (host_malloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tlflax import host_malloc
from tlflax import main as tlflax_main

GLIBC = (2, 36)


def tuned(environ, *, platform="linux", glibc=GLIBC, thp="madvise"):
    return host_malloc.tuned_environ(environ, platform=platform, glibc=glibc, thp=thp)


def test_tuned_environ_adds_the_tunable():
    env = tuned({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert tuned({}, thp="always")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_tuned_environ_keeps_the_users_tunables():
    env = tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, kwargs",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's choice stands
        ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"}, {}),  # re-executed already
        ({"TLFLAX_HOST_MALLOC": "0"}, {}),
        ({"TLFLAX_HOST_MALLOC": "off"}, {}),
        ({}, {"platform": "darwin"}),
        ({}, {"glibc": None}),  # musl
        ({}, {"glibc": (2, 34)}),  # no hugetlb tunable before 2.35
        ({}, {"thp": "never"}),
        ({}, {"thp": None}),  # no transparent huge pages in this kernel
    ],
)
def test_tuned_environ_does_nothing(environ, kwargs):
    assert tuned(environ, **kwargs) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_malloc.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert host_malloc.thp_mode(str(path)) == "always"
    assert host_malloc.thp_mode(str(tmp_path / "missing")) is None


def test_only_the_command_reexecutes(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(host_malloc, "reexec_tuned", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["tlflax", "--help"])
    assert tlflax_main.main() == 0
    assert calls == [1]
    assert tlflax_main.main(["tlflax", "--help"]) == 0  # a call from Python: left alone
    assert calls == [1]
    capsys.readouterr()


# A child that re-executes itself, then reports what it runs with and the page faults that
# filling 256 MiB from glibc's malloc costs it.
CHILD = r"""
import ctypes, json, os, resource, sys
from tlflax import host_malloc
print("start", flush=True)
host_malloc.reexec_tuned()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(p, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "faults": faults}))
"""


def child(**env):
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env={**environ, **env},
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = out.splitlines()
    return proc.pid, lines[:-1], json.loads(lines[-1])


needs_glibc_thp = pytest.mark.skipif(
    host_malloc.tuned_environ(
        {}, platform=sys.platform, glibc=host_malloc.glibc_version(), thp=host_malloc.thp_mode()
    )
    is None,  # fmt: skip
    reason="needs Linux, glibc >= 2.35 and transparent huge pages",
)


@needs_glibc_thp
def test_the_reexecuted_process_gets_huge_pages():
    pid, before, tuned_run = child()
    # One process throughout (a launcher's pid stays valid); the first run printed "start"
    # before it re-executed, the second again.
    assert tuned_run["pid"] == pid and before == ["start", "start"]
    assert tuned_run["tunables"] == host_malloc.SETTING
    _, before, plain = child(TLFLAX_HOST_MALLOC="0")
    assert before == ["start"] and plain["tunables"] is None
    if host_malloc.thp_mode() == "madvise":  # 'always' gives huge pages either way
        assert plain["faults"] > 50_000  # 4 KiB pages: 65,536 for 256 MiB
        assert tuned_run["faults"] < plain["faults"] / 10


def test_with_tunable_sets_or_clears_only_its_key():
    environ = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
    on = host_malloc.with_tunable(environ, True)
    assert on["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    off = host_malloc.with_tunable(on, False)
    assert off == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert host_malloc.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False) == {}
    assert environ["GLIBC_TUNABLES"].startswith("glibc.malloc.hugetlb=0")  # not changed
