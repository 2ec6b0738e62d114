"""One image file -> uint8 RGB (S, S, 3): the single decode path of folders and `predict`.

Every readable image becomes RGB the same way (documented once, here):
- grayscale / bilevel / 16-bit: replicated to 3 channels; 16-bit values are scaled by 255/65535;
- CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB;
- alpha (RGBA, LA, palette with transparency): composited on white, so transparent
  backgrounds look like the white product shots they usually are (dropping alpha would
  expose whatever colour the transparent pixels happen to hold, often black);
- EXIF orientation is applied before anything else;
- animated GIF / WebP: the first frame.
Then the short side is resized to S and the centre S x S is cut (one resample, bicubic,
antialiased). JPEGs are first DCT-downscaled by PIL's draft mode, but never below twice the
target size, so the final resample still sees enough pixels (as Image.thumbnail does).

Files that cannot be decoded raise `BadImageError` with a short `reason` code; the folder
source counts and lists them instead of stopping.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlflax.errors import UserError

DECODE_VERSION = 1  # bump when the pixels this module produces change (invalidates caches)
_EXIF_ORIENTATION = 0x0112
_DRAFT_GAP = 2.0  # draft never shrinks a JPEG below this multiple of the target size
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Reason codes written in the manifest (the exception text goes along as `detail`).
REASONS = ("empty_file", "not_an_image", "too_large", "truncated", "corrupt", "unreadable")
# ... and "crashed_decoder" when the decoding process itself died on the file.


class BadImageError(UserError, ValueError):
    """A file that is not a decodable image; `reason` is one of REASONS."""

    def __init__(self, path, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def _own_pixel_limit():
    # PIL's global MAX_IMAGE_PIXELS would warn, or raise, before our own limit is checked;
    # switch it off while opening (this module checks `max_pixels` itself).
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path, *, resize: int, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> np.ndarray:
    """The file at `path` as uint8 (resize, resize, 3); BadImageError if it cannot be read.

    `max_pixels`: images with more pixels (width * height) are refused as `too_large`
    (decompression bombs); the trainer passes config.data.max_image_pixels.
    """
    if resize < 1:
        raise ValueError(f"load_image: resize must be >= 1, got {resize}")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImageError(path, "unreadable", str(e)) from e
    if size == 0:
        raise BadImageError(path, "empty_file", "0 bytes")
    with _own_pixel_limit():
        try:
            with Image.open(path) as img:
                return _decode_open_image(img, path=path, resize=resize, max_pixels=max_pixels)
        except BadImageError:
            raise
        except UnidentifiedImageError as e:
            raise BadImageError(path, "not_an_image", str(e)) from e
        except Exception as e:
            # Format plugins signal broken data with many types (OSError, SyntaxError,
            # struct.error from bad EXIF, ...): all of them make the file bad, not the run.
            reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
            raise BadImageError(path, reason, f"{type(e).__name__}: {e}") from e


def _decode_open_image(img: Image.Image, *, path, resize: int, max_pixels: int) -> np.ndarray:
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        raise BadImageError(
            path,
            "too_large",
            f"{width}x{height} = {width * height} pixels > max_image_pixels={max_pixels}",
        )
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
        target = int(resize * _DRAFT_GAP)
        img.draft(img.mode, (target, target))  # both sides >= target after the DCT scaling
    img.load()
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return resize_centre_crop(to_rgb(img), resize=resize)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as the module docstring says."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        narrow = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    if img.mode == "F":
        narrow = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    return img.convert("RGB")


def resize_centre_crop(img: Image.Image, *, resize: int) -> np.ndarray:
    """Short side to `resize`, centre `resize` x `resize` crop, in one bicubic resample."""
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    box = (left, top, left + side, top + side)  # the centre square, in source pixels
    if side == resize and width == height:
        out = img
    else:
        out = img.resize((resize, resize), Image.Resampling.BICUBIC, box=box)
    array = np.asarray(out, dtype=np.uint8)
    if array.shape != (resize, resize, 3):
        raise BadImageError("<in memory>", "corrupt", f"decoded to shape {array.shape}")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- many files

N_DECODED = 0  # files decoded by this process's decode_files (tests check cache reuse with it)


def n_workers(requested: int) -> int:
    """config.data.workers -> a process count (0: every core this process may use)."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _decode_chunk(paths, resize, max_pixels):
    """Worker: (images of the good files, [(position, reason, detail)] of the bad ones)."""
    images, bad = [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, resize=resize, max_pixels=max_pixels))
        except BadImageError as e:
            images.append(None)
            bad.append((i, e.reason, e.detail))
    return images, bad


def decode_files(paths, *, resize: int, max_pixels: int, workers: int, chunk: int = 0):
    """Decode `paths` over `workers` processes: (uint8 (n_good, S, S, 3), good mask, bad list).

    The bad list holds dicts {'path', 'reason', 'detail'} in `paths` order. `workers=1`
    decodes in this process; `chunk`: files per job (0: chosen from the counts). The workers
    are fresh interpreters that import only this module (see _WorkerPool), not forks of a
    process that may run JAX's threads.
    """
    global N_DECODED
    paths = [str(p) for p in paths]
    # Chunks: large enough to amortise the pipe, small enough that workers finish together.
    chunk = chunk or int(np.clip(len(paths) // (8 * n_workers(workers)), 1, 32))
    out = np.empty((len(paths), resize, resize, 3), np.uint8)
    good = np.zeros(len(paths), bool)
    bad = []
    jobs = [(start, paths[start : start + chunk]) for start in range(0, len(paths), chunk)]
    for start, (images, chunk_bad) in _run_jobs(jobs, resize, max_pixels, workers):
        for i, image in enumerate(images):
            if image is not None:
                out[start + i] = image
                good[start + i] = True
        bad.extend((start + i, reason, detail) for i, reason, detail in chunk_bad)
    N_DECODED += len(paths)
    bad = [{"path": paths[i], "reason": r, "detail": d} for i, r, d in sorted(bad)]
    return (out if good.all() else out[good]), good, bad


def _run_jobs(jobs, resize: int, max_pixels: int, workers: int):
    workers = min(n_workers(workers), max(1, len(jobs)))
    if workers == 1:
        for start, paths in jobs:
            yield start, _decode_chunk(paths, resize, max_pixels)
        return
    with _WorkerPool(workers) as pool:
        yield from pool.run(jobs, resize=resize, max_pixels=max_pixels)


class _WorkerPool:
    """`n` Python processes decoding chunks sent over pipes.

    Fresh interpreters (not multiprocessing's fork or spawn): forking a process that runs
    JAX's threads can deadlock, and spawn re-imports the caller's main script. A worker
    that dies on a file (a crash inside a decoder) is replaced; its chunk is retried one file
    at a time so only the culprit is marked bad ('crashed_decoder').
    """

    def __init__(self, n: int):
        self.n = n
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or "." for p in sys.path))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _start(self):
        return subprocess.Popen(
            [sys.executable, "-c", "from tlflax.data import decode; decode._serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
        )

    def run(self, jobs, *, resize: int, max_pixels: int):
        todo: queue.Queue = queue.Queue()
        for job in jobs:
            todo.put(job)
        done: queue.Queue = queue.Queue()
        threads = [
            threading.Thread(target=self._drive, args=(todo, done, resize, max_pixels), daemon=True)
            for _ in range(self.n)
        ]
        for thread in threads:
            thread.start()
        for _ in range(len(jobs)):
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            yield from item
        for thread in threads:
            thread.join()

    def _drive(self, todo, done, resize, max_pixels):
        worker = None
        try:
            while True:
                try:
                    start, paths = todo.get_nowait()
                except queue.Empty:
                    return
                worker = worker or self._start()
                try:
                    pickle.dump((paths, resize, max_pixels), worker.stdin)
                    worker.stdin.flush()
                    done.put([(start, pickle.load(worker.stdout))])
                except (EOFError, OSError, pickle.UnpicklingError):
                    worker.kill()
                    worker.wait()
                    worker = None
                    done.put(self._after_crash(start, paths, resize, max_pixels))
        except BaseException as e:  # surfaced in run(), not lost in this thread
            done.put(e)
        finally:
            if worker is not None:
                worker.stdin.close()
                worker.wait()

    def _after_crash(self, start, paths, resize, max_pixels):
        if len(paths) > 1:  # retry singly in a fresh pool of one to find the culprit
            singles = [(start + i, [p]) for i, p in enumerate(paths)]
            return list(_WorkerPool(1).run(singles, resize=resize, max_pixels=max_pixels))
        crash = (0, "crashed_decoder", "the decoding process died on this file")
        return [(start, ([None], [crash]))]


def _serve() -> None:
    """Worker loop: pickled (paths, resize, max_pixels) in, _decode_chunk's result out."""
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    requests = sys.stdin.buffer
    while True:
        try:
            paths, resize, max_pixels = pickle.load(requests)
        except EOFError:
            return
        pickle.dump(_decode_chunk(paths, resize, max_pixels), reply, protocol=5)
        reply.flush()
