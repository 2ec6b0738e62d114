"""Workdirs and caches on any filesystem: local paths, gs://, s3:// through `etils.epath`.

`pathlib.Path('gs://b/run')` is the local folder `gs:/b/run`: a run written there vanishes
with the machine. Every read and write of a workdir, a cache or a report goes through
`path()`, which returns an `epath.Path` for the schemes epath can open and raises a
`FileSystemError` (one clear line) for any other scheme, never a local folder named after it.

Object stores have no append and no atomic rename of folders: writers here rewrite whole
files (`write_bytes` / `write_text`), and orbax handles its own commit protocol on gs://.
"""

from __future__ import annotations

import io
import os
import re
import uuid

from etils import epath

from tlflax.errors import UserError

# Schemes epath opens (gs, s3 and az through tf.io.gfile or fsspec); hf:// is read-only.
WRITABLE_SCHEMES = ("gs", "s3", "az")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class FileSystemError(UserError, ValueError):
    """A path that cannot be opened; the message says which path, why and what to do."""


def scheme_of(text: str | os.PathLike) -> str | None:
    match = _SCHEME.match(os.fspath(text))
    return match.group(1).lower() if match else None


def path(text: str | os.PathLike, *, what: str = "path") -> epath.Path:
    """An epath for `text`: an absolute local path, or a remote URI of a writable scheme."""
    text = os.fspath(text)
    scheme = scheme_of(text)
    if scheme is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if scheme not in WRITABLE_SCHEMES:
        raise FileSystemError(
            f"{what} {text!r}: the scheme '{scheme}://' cannot be opened (tlflax writes to "
            f"local paths and {', '.join(s + '://' for s in WRITABLE_SCHEMES)}); "
            "use one of those, or a mounted folder"
        )
    return epath.Path(text)


def is_remote(p: str | os.PathLike) -> bool:
    return scheme_of(p) is not None


def check_writable(directory: epath.Path, *, what: str) -> epath.Path:
    """Create `directory` and prove it takes a file, so that a missing filesystem library,
    credentials or bucket fail at the start of a run, not at its first checkpoint."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".tlflax_write_check-{uuid.uuid4().hex}"  # one per process
        probe.write_text("ok")
        probe.unlink()
    except ImportError as e:  # epath without tensorflow / gcsfs / s3fs for this scheme
        raise FileSystemError(
            f"{what} {directory}: no library to open {scheme_of(directory)}:// paths ({e}); "
            "install tensorflow or gcsfs (gs://), s3fs (s3://), adlfs (az://)"
        ) from e
    except (OSError, NotImplementedError) as e:
        raise FileSystemError(f"{what} {directory} is not writable: {e}") from e
    return directory


def write_text_atomic(p: epath.Path, text: str) -> None:
    """Readers never see half a file: local files are written aside and renamed; object
    stores publish an object whole when its upload ends."""
    if is_remote(p):
        p.write_text(text)
        return
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)


def save_figure(fig, p: epath.Path, **kwargs) -> epath.Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=p.suffix.lstrip(".") or "png", **kwargs)
    p.write_bytes(buffer.getvalue())
    return p


class _EventFile:
    """A TensorBoard event file on an object store: buffered, the whole file rewritten on
    flush (object stores have no append). tensorboardX flushes every flush_secs."""

    def __init__(self, p: str):
        self._path = epath.Path(p)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFileFactory:
    def open(self, p: str) -> _EventFile:
        return _EventFile(p)

    def directory_check(self, p: str) -> None:
        epath.Path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard_writers() -> None:
    """tensorboardX's own gs:// writer needs google-cloud-storage; write through epath."""
    from tensorboardX import record_writer

    for scheme in WRITABLE_SCHEMES:
        record_writer.register_writer_factory(scheme, _EventFileFactory())
