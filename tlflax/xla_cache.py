"""A persistent XLA compilation cache for the `tlflax` command.

A run compiles its steps before it trains: on 2 CPU cores the demo's fine-tuning step takes
12 s alone (22 s beside the probe), and large models take minutes on accelerators. jax can
keep what it compiled on disk and read it back when the same step (same program, shapes,
devices, options and jax version) is compiled again: the next run of a config, the seeds
and variants of a sweep that share shapes, a resumed run.

The `tlflax` command turns jax's cache on in `${XDG_CACHE_HOME:-~/.cache}/tlflax/xla`,
at most MAX_BYTES (jax drops the least recently used entries beyond it), for compilations
of a second or more (jax's threshold). Only there: importing tlflax as a library changes
nothing. TLFLAX_XLA_CACHE=0 turns it off; TLFLAX_XLA_CACHE=DIR puts it in another local
folder. Where JAX_COMPILATION_CACHE_DIR is set, jax's own setting wins (a gs:// cache for a
TPU pod goes there). A folder that cannot be written is logged and the run goes on without
the cache.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

OPT = "TLFLAX_XLA_CACHE"
MAX_BYTES = 4 * 2**30
OFF = ("0", "off", "false", "no")


def cache_dir(environ) -> str | None:
    """The folder the command's cache goes in, or None for none of tlflax's (turned off,
    or jax's own JAX_COMPILATION_CACHE_DIR set)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = environ.get(OPT, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tlflax", "xla")


def enable(environ=None) -> str | None:
    """Turn jax's persistent compilation cache on in cache_dir(environ) before anything is
    compiled; returns the folder, or None where nothing was turned on."""
    environ = os.environ if environ is None else environ
    path = cache_dir(environ)
    if path is None:
        return None
    if "://" in environ.get(OPT, ""):
        log.warning(
            "%s=%s: a local folder only; set JAX_COMPILATION_CACHE_DIR for jax's own cache "
            "(gs:// included). This run compiles without a cache.", OPT, environ[OPT],
        )  # fmt: skip
        return None
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {path}")
    except OSError as e:
        log.warning("XLA compilation cache off: %s (%s=DIR picks another folder)", e, OPT)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    log.info("XLA compilation cache: %s (%s=0 turns it off)", path, OPT)
    return path
