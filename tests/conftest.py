"""Test-suite guarantees: CPU only, 8 fake devices, and no network, ever."""

import os
import pathlib

# Before jax is imported anywhere: 8 fake CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras models are references in tests (tests/test_keras_weights.py): on JAX, never TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")
# One persistent XLA compilation cache for the suite, its pytest-xdist workers and the CLI
# processes the tests start (they inherit the environment): most tests build the same tiny
# models, so a step compiled once is read back instead of compiled again (on 2 cores the
# suite spends more time compiling than computing). TLFLAX_TEST_JIT_CACHE=0 turns it off.
if os.environ.get("TLFLAX_TEST_JIT_CACHE", "1") != "0":
    _jit_cache = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_jit_cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# TensorFlow (TFDS tests) and torch's triton (the torchvision / timm references) crash the
# process when TensorFlow's libraries load first (segfault inside triton's import; TF 2.20,
# torch 2.14). Loading torch's side first avoids it.
try:  # noqa: SIM105
    import torchvision  # noqa: E402, F401
except ImportError:
    pass

import ipaddress  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


class NetworkAccessError(RuntimeError):
    pass


def _is_local(address) -> bool:
    if isinstance(address, tuple):
        host = address[0]
    else:  # AF_UNIX path
        return True
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if not _is_local(address):
        raise NetworkAccessError(f"tests must not use the network (tried {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise NetworkAccessError(f"tests must not use the network (tried {address!r})")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost") and not _is_local((host,)):
        raise NetworkAccessError(f"tests must not use the network (looked up {host!r})")
    return _real_getaddrinfo(host, *args, **kwargs)


def pytest_configure(config):
    # Installed for the whole session (not per test) so that import-time and
    # fixture-time code is covered as well.
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo


def pytest_collection_modifyitems(config, items):
    if SHARED_DATA.is_dir():
        return
    if os.environ.get("TLFLAX_REQUIRE_SHARED_DATA"):
        raise pytest.UsageError(f"TLFLAX_REQUIRE_SHARED_DATA is set but {SHARED_DATA} is missing")
    skip = pytest.mark.skip(reason=f"needs real images in {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    return SHARED_DATA
