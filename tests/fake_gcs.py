"""An offline gs:// for tests: epath's gs backend and orbax's TensorStore GCS driver pointed
at a local folder, with an object store's limits (no append, no read-write open).

    python tests/fake_gcs.py ROOT train --config ... --workdir gs://bucket/run

runs `tlflax` with gs://bucket/x stored as ROOT/bucket/x. Everything above epath and orbax is
the real code path of a gs:// workdir: the scheme is never a local folder, and tlflax's own
writes must work without appending (a GCS object is written whole).
"""

from __future__ import annotations

import os
import sys

PREFIX = "gs://"


def install(root: str) -> None:
    """Route gs:// to `root` in this process (before any gs:// path is used)."""
    os.environ["EPATH_USE_TF"] = "false"  # tensorflow's gfile would go to the real GCS
    from etils.epath import backend, gpath
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(root)

    def local(path) -> str:
        text = os.fspath(path)
        if not text.startswith(PREFIX):
            raise ValueError(f"fake gs:// got a non-gs path {text!r}")
        return os.path.join(root, text[len(PREFIX) :])

    def remote(path) -> str:
        return PREFIX + os.path.relpath(os.fspath(path), root)

    class FakeGcsBackend(backend._OsPathBackend):  # noqa: SLF001 (the test double)
        def open(self, path, mode):
            if "a" in mode or "+" in mode:
                raise OSError(f"gs:// objects are written whole: open({path!r}, {mode!r})")
            if "w" in mode:
                os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # no folders on GCS
            return super().open(local(path), mode)

        def glob(self, path):
            return [remote(p) for p in super().glob(local(path))]

        def walk(self, top, **kwargs):
            for dirpath, dirs, files in super().walk(local(top), **kwargs):
                yield remote(dirpath), dirs, files

    def mapped(name):
        method = getattr(backend._OsPathBackend, name)  # noqa: SLF001

        def call(self, path, *args, **kwargs):
            args = [local(a) if str(a).startswith(PREFIX) else a for a in args]
            return method(self, local(path), *args, **kwargs)

        return call

    for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "rmtree", "remove",
                 "rename", "replace", "copy", "stat"):  # fmt: skip
        setattr(FakeGcsBackend, name, mapped(name))
    gpath._PREFIX_TO_BACKEND["gs"] = FakeGcsBackend()  # noqa: SLF001
    # orbax writes arrays through TensorStore's own GCS driver: the same folder, as files.
    gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": local(path)}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


def main(argv: list[str]) -> int:
    root, *args = argv
    install(root)
    from tlflax import main as tlflax_main

    return tlflax_main.main(["tlflax", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
