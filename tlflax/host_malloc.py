"""Transparent huge pages for the host's large allocations (Linux, glibc >= 2.35).

XLA's CPU runtime allocates each execution's temporary buffer (the activations of a training
step: 0.3-1.6 GiB for Lite0 and ResNet-50) with posix_memalign from a worker thread. glibc
serves that with a fresh mmap, and the step then faults it in 4 KiB at a time, zeroing
every page in the kernel:
Lite0's full step at 224 px, batch 32, took 386,000 page faults and 0.7 s of system time per
1.7 s step on 2 cores. With glibc's tunable `glibc.malloc.hugetlb=1`, malloc advises the
kernel to back such mappings with 2 MiB pages (madvise(MADV_HUGEPAGE)): 2,400-2,800 faults
and 0.16 s; Lite0's full and eval steps 1.24-1.36x faster, ResNet-50's full step
1.07-1.09x (benchmarks/host_malloc.py).

glibc reads its tunables once, when the process starts, so the `tlflax` command sets the
tunable and re-executes itself (the same process id, arguments and descriptors) before it
imports anything heavy. Only there: importing tlflax as a library changes nothing.
TLFLAX_HOST_MALLOC=0 keeps the environment as it is. Where glibc is older, the kernel has no
transparent huge pages, or GLIBC_TUNABLES already sets the key, nothing happens.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "TLFLAX_HOST_MALLOC"
THP_MODES = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS, Windows)
        return None
    if name != "glibc":
        return None
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def thp_mode(path: str = THP_MODES) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), None when it
    has none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tuned_environ(environ, *, platform: str, glibc: tuple[int, int] | None,
                  thp: str | None) -> dict | None:  # fmt: skip
    """The environment to re-execute with, or None where it would change nothing or is
    turned off."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not platform.startswith("linux") or glibc is None or glibc < (2, 35):
        return None
    if thp not in ("always", "madvise"):
        return None
    if any(t.split("=", 1)[0] == TUNABLE for t in environ.get("GLIBC_TUNABLES", "").split(":")):
        return None  # set already: by us before the re-execution, or by the user
    return with_tunable(environ, True)


def with_tunable(environ, on: bool) -> dict:
    """A copy of `environ` whose GLIBC_TUNABLES sets glibc.malloc.hugetlb=1 (on) or leaves
    it at glibc's default (off), the other tunables kept."""
    environ = dict(environ)
    kept = [t for t in environ.pop("GLIBC_TUNABLES", "").split(":")
            if t and t.split("=", 1)[0] != TUNABLE]  # fmt: skip
    if on:
        kept.append(SETTING)
    if kept:
        environ["GLIBC_TUNABLES"] = ":".join(kept)
    return environ


def reexec_tuned() -> None:
    """Re-execute this process with tuned_environ's environment, where it applies. Returns
    only when nothing is done (or the exec fails: the run goes on as it is)."""
    env = tuned_environ(os.environ, platform=sys.platform, glibc=glibc_version(), thp=thp_mode())
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return
